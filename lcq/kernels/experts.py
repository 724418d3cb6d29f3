"""The experts of a mixture as one product: every expert's matrix of one kind (gate/up, or down) stacked,
and each (token, slot) row multiplied by the expert its router chose.

A mixture run one expert at a time asks the host which experts were chosen (a device-to-host copy
per layer) and launches a kernel per expert: on a GPU that is hundreds of launches and a stall per
layer for a 2-bit model that should stream its chosen experts' weights in a few microseconds, and a
CUDA graph cannot replay it, since it would replay the experts chosen when it was captured. Here the
routing is laid out on the device (ExpertRoutes, tensor ops only) and one launch of the decode
kernel reads it: each program multiplies one block of rows routed to one expert, reading that
expert's weights once for all of them. The same launch serves prefill (no host sync anywhere), so
a mixture runs in CUDA graphs like a dense model.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lcq.format import PackedLinear

from .linear import lcq_linear

_STACKED = ("qweight", "s_q", "s_scale", "b_q", "b_scale", "v", "v_index")


@dataclass
class PackedExperts:
    """The same LCQ matrix of every expert: `stacked` holds each tensor of theirs stacked along a leading
    expert dimension, so that expert e's tensors are the contiguous views [e] (expert(e), an ordinary
    PackedLinear) and the grouped kernel finds expert e at e times each tensor's per-expert size."""

    stacked: PackedLinear

    @staticmethod
    def stack(layers: list[PackedLinear]) -> "PackedExperts":
        first = layers[0]
        shape = (first.in_features, first.out_features, first.bits, first.rank, first.group_size, first.v.shape[0])
        for layer in layers[1:]:
            if (layer.in_features, layer.out_features, layer.bits, layer.rank, layer.group_size,
                    layer.v.shape[0]) != shape or (layer.bias is None) != (first.bias is None):
                raise ValueError("a mixture's experts are stacked only when their matrices share shape, width, "
                                 "rank, group size and tables")
        stacked = {name: torch.stack([getattr(layer, name) for layer in layers]) for name in _STACKED}
        bias = None if first.bias is None else torch.stack([layer.bias for layer in layers])
        return PackedExperts(replace(first, **stacked, bias=bias))

    @property
    def num_experts(self) -> int:
        return self.stacked.qweight.shape[0]

    @property
    def tables(self) -> int:
        """V tables per expert (2 for a fused gate/up matrix)."""
        return self.stacked.v.shape[1]

    def expert(self, e: int) -> PackedLinear:
        bias = self.stacked.bias
        return replace(self.stacked, **{name: getattr(self.stacked, name)[e] for name in _STACKED},
                       bias=None if bias is None else bias[e])

    def to(self, device: torch.device | str) -> "PackedExperts":
        return PackedExperts(self.stacked.to(device))


def rows_per_block(rows: int, num_experts: int) -> int:
    """The grouped kernel's rows per block, from the mean rows per expert: 1 or 2 (its FMA form), else
    16 to 64 (tl.dot). Known on the host from shapes alone, as a captured graph needs."""
    mean = -(-rows // num_experts)
    if mean <= 2:
        return max(mean, 1)
    return min(64, max(16, 1 << (mean - 1).bit_length()))


@dataclass
class ExpertRoutes:
    """Rows t * k + slot (token t's slot-th choice) sorted by expert into blocks of block_m rows of one
    expert each: rows (capacity,) int32 with -1 where a block is not full, experts (capacity // block_m,)
    int32, -1 for the blocks past the last expert's (capacity is the most blocks any routing needs)."""

    chosen: torch.Tensor
    block_m: int
    rows: torch.Tensor
    experts: torch.Tensor

    @property
    def rows_count(self) -> int:
        return self.chosen.numel()

    @staticmethod
    def of(chosen: torch.Tensor, num_experts: int, block_m: int | None = None) -> "ExpertRoutes":
        """chosen: (T, k) expert ids. Tensor ops only: no value is read back to the host."""
        ids = chosen.reshape(-1)
        count = ids.numel()
        block_m = block_m or rows_per_block(count, num_experts)
        per_expert = torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(
            0, ids, torch.ones_like(ids))
        padded = (per_expert + block_m - 1) // block_m * block_m
        ends = padded.cumsum(0)
        order = torch.argsort(ids, stable=True)
        expert_of_sorted = ids[order]
        # a sorted row's place: its expert's first block, plus how many rows of that expert precede it
        rank_in_expert = torch.arange(count, device=ids.device) - (per_expert.cumsum(0) - per_expert)[expert_of_sorted]
        places = (ends - padded)[expert_of_sorted] + rank_in_expert
        # every expert with rows wastes at most block_m - 1 places
        capacity = -(-(count + min(num_experts, count) * (block_m - 1)) // block_m) * block_m
        rows = torch.full((capacity,), -1, dtype=torch.int32, device=ids.device)
        rows[places] = order.to(torch.int32)
        block_starts = torch.arange(0, capacity, block_m, device=ids.device)
        experts = torch.searchsorted(ends, block_starts, right=True)
        experts = torch.where(experts < num_experts, experts, -1).to(torch.int32)
        return ExpertRoutes(chosen, block_m, rows, experts)


def expert_linear(x: torch.Tensor, experts: PackedExperts, routes: ExpertRoutes, rows_per_input: int
                  ) -> torch.Tensor:
    """y[r] = x[r // rows_per_input] @ W_e^T (+ b_e) for every routed row r, e the expert routes gives it:
    (T * k, N). rows_per_input is k where each token's input serves all its choices (gate/up), 1 where
    each row has its own (down). CUDA: one grouped kernel launch; CPU: each chosen expert's product."""
    if x.is_cuda:
        from .triton_linear import grouped_decode
        return grouped_decode(x, experts, routes, rows_per_input)
    ids = routes.chosen.reshape(-1)
    out = x.new_empty(ids.numel(), experts.stacked.out_features)
    for e in ids.unique().tolist():
        rows = (ids == e).nonzero().squeeze(1)
        out[rows] = lcq_linear(x[rows // rows_per_input], experts.expert(e))
    return out


class LCQExperts(torch.nn.Module):
    """PackedExperts as a module; .to(device) moves the stacked tensors."""

    def __init__(self, experts: PackedExperts):
        super().__init__()
        self.experts = experts

    def _apply(self, fn, recurse=True):
        self.experts = self.experts.to(fn(torch.empty(0, device=self.experts.stacked.qweight.device)).device)
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, routes: ExpertRoutes, rows_per_input: int) -> torch.Tensor:
        return expert_linear(x, self.experts, routes, rows_per_input)
