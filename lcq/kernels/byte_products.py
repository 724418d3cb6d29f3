"""The arithmetic of the decode kernel's products of bytes (INT8 in triton_linear._decode_kernel), in torch.

At one or two rows the kernel can multiply bytes instead of fp32 values: the inputs of each index word of a
row (16 at 2 and 3 bits, 8 at 4) are scaled by 127 over their largest magnitude and rounded, and each column's
codebook of a group (S . V - B), less its midrange, by 127 over half its range; PTX prmt then picks 4 weights'
codebook bytes at once and one dp4a multiplies them by 4 input bytes and sums: 2 to 5 instructions per weight
where the fp32 forms spend 6 to 11 (docs/kernels.md).
This module states what that computes, so that tests hold the kernel to it exactly and the quality cost of
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


def byte_products_reference(x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
    """x (M, K) @ W^T as the kernel's products of bytes compute it, float64 (M, N): per group and column the
    byte codebook times its step plus its midrange, per run of 16 inputs the input bytes times their scale,
    exact integer dots; the midrange multiplies the group's inputs as they are."""
    entries = 1 << layer.bits
    run = 8 if layer.bits == 4 else 16  # inputs sharing a scale: one index word's (at 3 bits the 2-bit plane's)
    s, v = decoded_s(layer), layer.v.float()[layer.v_index.long()]  # (N, G, r), (N, r, entries)
    books = -decoded_b(layer).unsqueeze(-1).expand(-1, -1, entries)  # (N, G, entries), in the kernel's order:
    for k in range(layer.rank):  # an entry halfway between two bytes must round alike
        books = books + s[..., k:k + 1] * v[:, None, k]
    highest, lowest = books.amax(dim=-1), books.amin(dim=-1)
    midrange, half_range = (highest + lowest) * 0.5, (highest - lowest) * 0.5
    codes = to_int8(books - midrange.unsqueeze(-1), half_range.unsqueeze(-1))
    indices = unpack_indices(layer.qweight, layer.bits)  # (N, K_pad)
    n, k_pad = indices.shape
    weights = torch.gather(codes, 2, indices.view(n, layer.num_groups, layer.group_size)).view(n, -1, run)
    runs = torch.nn.functional.pad(x.float(), (0, k_pad - x.shape[1])).view(x.shape[0], -1, run)
    x_largest = runs.abs().amax(dim=-1)
    x_bytes = to_int8(runs, x_largest.unsqueeze(-1)).float()
    # integer dots of at most 16 byte products stay below 2^24, exact in fp32: one batched matmul per run
    dots = torch.bmm(x_bytes.transpose(0, 1), weights.float().permute(1, 2, 0)).permute(1, 2, 0).double()
    per_run = dots * (x_largest.double() / 127.0).unsqueeze(1)  # (M, N, runs)
    per_group = per_run.view(x.shape[0], n, layer.num_groups, -1).sum(dim=-1)
    group_sums = runs.double().view(x.shape[0], 1, layer.num_groups, -1).sum(dim=-1)  # (M, 1, G)
    y = (per_group * (half_range.double() / 127.0) + group_sums * midrange.double()).sum(dim=-1)
    return y if layer.bias is None else y + layer.bias.double()
