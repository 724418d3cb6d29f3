"""The arithmetic of the decode kernel's byte codebooks (INT8 and BYTE_BOOK in triton_linear._decode_kernel), in torch.

At one or two rows the kernel can multiply bytes instead of fp32 values: the inputs of each index word of a
row (16 at 2 and 3 bits, 8 at 4) are scaled by 127 over their largest magnitude and rounded, and each column's
codebook of a group (S . V - B), less its midrange, by 127 over half its range; PTX prmt then picks 4 weights'
codebook bytes at once and one dp4a multiplies them by 4 input bytes and sums: 2 to 5 instructions per weight
where the fp32 forms spend 6 to 11 (docs/kernels.md).
From 16 rows the kernel can instead multiply the inputs as they are by the codes of the same codebooks in bytes,
made into fp16 or bf16 values by a prmt and a lop3 for 2 weights, through its tensor cores, and apply each
column's step and midrange after (byte_book_weights).
This module states what both compute, so that tests hold the kernel to it exactly and the quality cost of
the rounding can be measured on CPU.
"""
from __future__ import annotations

import torch

from lcq.format import PackedLinear, decoded_b, decoded_s, unpack_indices

# Rounding to bytes costs each product about 1/254 of its 16 inputs' largest magnitude and of its codebook's
# range; on random layers and inputs the products are well under 1% off the exact ones (tests/test_kernels.py).
ROUNDING_BOUND = 2e-2


def to_int8(values: torch.Tensor, half_range: torch.Tensor) -> torch.Tensor:
    """values scaled by 127 / half_range (fp32, as the kernel) and rounded to the nearest integer, ties to even."""
    return torch.round(values.float() * (127.0 / half_range.float().clamp_min(1e-30))).long()


def _codebooks(layer: PackedLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each column's codebook of each group, S . V - B, fp32 (N, G, 2^bits) summed in the kernel's order (an
    entry halfway between two bytes must round alike), and its midrange and half range (N, G)."""
    entries = 1 << layer.bits
    s, v = decoded_s(layer), layer.v.float()[layer.v_index.long()]  # (N, G, r), (N, r, entries)
    books = -decoded_b(layer).unsqueeze(-1).expand(-1, -1, entries)
    for k in range(layer.rank):
        books = books + s[..., k:k + 1] * v[:, None, k]
    highest, lowest = books.amax(dim=-1), books.amin(dim=-1)
    return books, (highest + lowest) * 0.5, (highest - lowest) * 0.5


def _weights_of(codes: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
    """Each weight's entry of codes (N, G, 2^bits), (N, K_pad)."""
    indices = unpack_indices(layer.qweight, layer.bits)  # (N, K_pad)
    n = indices.shape[0]
    return torch.gather(codes, 2, indices.view(n, layer.num_groups, layer.group_size)).view(n, -1)


def byte_products_reference(x: torch.Tensor, layer: PackedLinear, run: int | None = None) -> torch.Tensor:
    """x (M, K) @ W^T as the kernel's products of bytes compute it, float64 (M, N): per group and column the
    byte codebook times its step plus its midrange, per run of inputs the input bytes times their scale,
    exact integer dots; the midrange multiplies the group's inputs as they are. run: the inputs sharing a scale,
    by default one index word's (16, at 3 bits the 2-bit plane's; 8 at 4 bits)."""
    run = run or (8 if layer.bits == 4 else 16)
    books, midrange, half_range = _codebooks(layer)
    codes = to_int8(books - midrange.unsqueeze(-1), half_range.unsqueeze(-1))
    weights = _weights_of(codes, layer)
    n, k_pad = weights.shape
    weights = weights.view(n, -1, run)
    runs = torch.nn.functional.pad(x.float(), (0, k_pad - x.shape[1])).view(x.shape[0], -1, run)
    x_largest = runs.abs().amax(dim=-1)
    x_bytes = to_int8(runs, x_largest.unsqueeze(-1)).float()
    # integer dots of up to 1040 byte products stay below 2^24, exact in fp32: one batched matmul per run
    dots = torch.bmm(x_bytes.transpose(0, 1), weights.float().permute(1, 2, 0)).permute(1, 2, 0).double()
    per_run = dots * (x_largest.double() / 127.0).unsqueeze(1)  # (M, N, runs)
    per_group = per_run.view(x.shape[0], n, layer.num_groups, -1).sum(dim=-1)
    group_sums = runs.double().view(x.shape[0], 1, layer.num_groups, -1).sum(dim=-1)  # (M, 1, G)
    y = (per_group * (half_range.double() / 127.0) + group_sums * midrange.double()).sum(dim=-1)
    return y if layer.bias is None else y + layer.bias.double()


def byte_book_weights(layer: PackedLinear) -> torch.Tensor:
    """W (N, K) float64 as the decode kernel's weights from byte codebooks (BYTE_BOOK) stand: each column's codebook
    of a group rounded to 127 levels either side of its midrange, fp32 steps and midranges as the kernel applies
    them after its product (the same for fp16 and bf16 inputs)."""
    books, midrange, half_range = _codebooks(layer)
    scale = torch.full_like(half_range, 127.0) / half_range.clamp_min(1e-30)  # fp32, as the kernel
    codes = torch.round((books - midrange.unsqueeze(-1)) * scale.unsqueeze(-1))
    weights = codes.double() * (half_range / 127).double().unsqueeze(-1) + midrange.double().unsqueeze(-1)
    return _weights_of(weights, layer)[:, : layer.in_features]
