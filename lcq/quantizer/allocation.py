"""Each decoder layer's width chosen for a budget of bits per weight (`--target-bits`).

Widening a layer costs a known number of stored bits (lcq.format.stored_bytes) and lowers the model's
loss by an amount estimated before anything is tuned: to second order, the next-token loss grows by
1/2 sum_ij F_ij (W_ij - Q(W)_ij)^2 when a layer's weights move by their quantization error, F being
the diagonal of the empirical Fisher. Per token t a linear layer's weight gradient is g_t x_t^T (g_t
the loss gradient at its output, x_t its input), so F = sum_t (g_t^2)(x_t^2)^T: one backward pass of
the full-precision model over calibration windows, streamed block by block like the rest of the
quantizer, gives it for every layer. Q(W) is the layer's starting fit at each width (the codebooks
the block-wise stage starts from).

The estimates of different layers add up (to that order), so the choice is a knapsack solved
greedily: every unit that must share one width (q/k/v and gate/up run fused) starts at --bits, and
the unit whose next bit buys the largest estimated loss drop per stored byte is widened, one bit at a
time, while the budget lasts.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable

import torch

from lcq.errors import UserError
from lcq.format import SUPPORTED_BITS, CheckpointReader, stored_bytes

from .blockwise import BlockCall, block_call, run_block

# Layers that must share a width, each under the --layer-bits name that sets them together.
UNITS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o_proj": ("self_attn.o_proj",),
         "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down_proj": ("mlp.down_proj",)}
FISHER_WINDOWS = 16  # calibration windows of the backward pass; every block's input is held for them
WIDEST = max(SUPPORTED_BITS)


@dataclass
class Unit:
    """Layers of one decoder layer that share a width, with their stored bytes and estimated loss increase
    at each width from --bits up."""

    layer: int
    name: str  # a key of UNITS
    stored: dict[int, int]
    loss: dict[int, float]

    def rule(self, bits: int) -> str:
        return f"{self.name}@{self.layer}={bits}"


def linear_shapes(reader: CheckpointReader, num_layers: int) -> dict[tuple[int, str], tuple[int, int]]:
    """(out_features, in_features) of every decoder linear layer, from the files' headers."""
    return {(layer, linear): reader.shape(f"model.layers.{layer}.{linear}.weight")
            for layer in range(num_layers) for linears in UNITS.values() for linear in linears}


def unit_bytes(shapes: dict[tuple[int, str], tuple[int, int]], layer: int, name: str, bits: int, rank: int,
               group_size: int) -> int:
    """Stored bytes of a unit's layers at `bits` (each is stored as its own matrix)."""
    return sum(stored_bytes(*shapes[layer, linear], bits, rank, group_size) for linear in UNITS[name])


def bits_per_weight_range(shapes: dict[tuple[int, str], tuple[int, int]], bits: int, rank: int,
                          group_size: int) -> tuple[float, float]:
    """The decoder's stored bits per weight with every layer at `bits`, and with every layer at the widest."""
    weights = sum(n * k for n, k in shapes.values())
    return tuple(8 * sum(stored_bytes(n, k, width, rank, group_size) for n, k in shapes.values()) / weights
                 for width in (bits, WIDEST))


def check_target(shapes: dict[tuple[int, str], tuple[int, int]], target: float, bits: int, rank: int,
                 group_size: int) -> None:
    """Refuse a budget below every layer at --bits, or at or above every layer at the widest."""
    low, high = bits_per_weight_range(shapes, bits, rank, group_size)
    if not low <= target < high:
        raise UserError(f"--target-bits {target}: with --bits {bits}, rank {rank} and group size {group_size} this "
                        f"model stores {low:.3f} to {high:.3f} bits per weight; choose a target in that range "
                        f"(below {high:.3f}: at that, use --bits {WIDEST})")


def choose_widths(units: list[Unit], bits: int, budget_bytes: float) -> dict[tuple[int, str], int]:
    """(layer, unit name) -> width: the greedy knapsack of the module docstring. A step that no longer fits is
    skipped, not the end: a smaller unit's may still fit."""
    widths = {(u.layer, u.name): bits for u in units}

    def step(index: int, width: int) -> tuple[float, int, int]:
        u = units[index]
        return -(u.loss[width] - u.loss[width + 1]) / (u.stored[width + 1] - u.stored[width]), index, width

    heap = [step(i, bits) for i in range(len(units)) if bits < WIDEST]
    heapq.heapify(heap)
    spent = 0
    while heap:
        gain, index, width = heapq.heappop(heap)
        u = units[index]
        cost = u.stored[width + 1] - u.stored[width]
        if gain >= 0 or spent + cost > budget_bytes:  # gain is the negated drop: >= 0 buys nothing
            continue
        spent += cost
        widths[u.layer, u.name] = width + 1
        if width + 1 < WIDEST:
            heapq.heappush(heap, step(index, width + 1))
    return widths


def describe_widths(rules: list[str], bits: int) -> str:
    """The chosen rules in a line: each unit and width with its layers, e.g. "qkv=3 in layers 0-3, 7"."""
    layers: dict[str, list[int]] = {}
    for rule in rules:
        unit, rest = rule.split("@")
        layer, width = rest.split("=")
        layers.setdefault(f"{unit}={width}", []).append(int(layer))
    if not layers:
        return f"every layer at {bits} bits"
    return "; ".join(f"{unit} in layers {_ranges(sorted(found))}" for unit, found in layers.items()) + \
        f"; the rest at {bits} bits"


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def fisher_pass(source, tokens: torch.Tensor, head: torch.Tensor, batch: int,
                on_block: Callable[[int, torch.nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]], None]
                ) -> None:
    """The full-precision model forward over `tokens` (S, T), block by block, holding each block's input;
    the next-token loss (summed) at the top; then back down block by block, each recomputed with its
    gradient, calling on_block(index, block, fisher, importance) with every linear layer's F (N, K)
    and mean x_k^2 (K,). `source`: the pipeline's block-by-block reader of the model."""
    hidden = source.embed(tokens)
    inputs = []
    for index in range(source.num_layers):
        inputs.append(hidden)
        hidden = run_block(block_call(source.block(index), source.block_inputs(index)), {}, hidden, batch)
    grad = _head_gradient(source, hidden, tokens.to(hidden.device), head)
    for index in reversed(range(source.num_layers)):
        block = source.block(index).requires_grad_(False)
        fisher, importance, grad = _block_backward(block_call(block, source.block_inputs(index)), block,
                                                   inputs.pop(), grad, batch)
        on_block(index, block, fisher, importance)


def _head_gradient(source, hidden: torch.Tensor, tokens: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """d(summed next-token cross-entropy)/d(last hidden states), one window at a time (the logits of a
    large vocabulary are the biggest tensor here)."""
    grads = []
    for window, ids in zip(hidden, tokens):
        h = window.unsqueeze(0).clone().requires_grad_()
        logits = source.final_norm(h)[0, :-1] @ head.t()
        torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").backward()
        grads.append(h.grad)
    return torch.cat(grads)


def _block_backward(call: BlockCall, block: torch.nn.Module, inputs: torch.Tensor, grad_out: torch.Tensor,
                    batch: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """One block's F and input importance per linear layer, and the gradient at its input."""
    linears = [linear for names in UNITS.values() for linear in names]
    seen: dict[str, list[torch.Tensor]] = {}
    fisher: dict[str, torch.Tensor] = {}
    importance: dict[str, torch.Tensor] = {}

    def hook(module, args, output, name):
        seen[name] = [args[0].detach().flatten(0, -2).pow(2)]
        output.register_hook(lambda g: seen[name].append(g.detach().flatten(0, -2).pow(2)))
    hooks = [block.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
             for name in linears]
    grads_in = []
    try:
        for start in range(0, inputs.shape[0], batch):
            x = inputs[start:start + batch].clone().requires_grad_()
            call({}, x).backward(grad_out[start:start + batch])
            grads_in.append(x.grad)
            for name, (x_squared, g_squared) in seen.items():
                fisher[name] = fisher.get(name, 0) + g_squared.t() @ x_squared
                importance[name] = importance.get(name, 0) + x_squared.sum(0)
    finally:
        for h in hooks:
            h.remove()
    tokens = inputs.shape[0] * inputs.shape[1]
    return fisher, {name: total / tokens for name, total in importance.items()}, torch.cat(grads_in)
