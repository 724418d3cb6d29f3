"""The activation-side pair table (LUT-GEMM / T-MAC) of a 2-bit layer at one row: for every pair of inputs and
every pair of 2-bit indices, the sum of their two products with V, built once per row by its own kernel
(_pair_table_kernel), so that the decode kernel takes one load per 4-bit field and rank instead of arithmetic
per weight (_lut_products). decode() times it against the direct form per shape (triton_linear.lut_wins).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lcq.format import PackedLinear

from .dependent_launch import dependent_launch, wait_for_earlier_kernels
from .triton_tiles import GATHER_COLUMNS_FIRST, _gather_table, _rank_scale

PAIR_TABLE_BLOCK = 64


@triton.jit
def _pair_table_kernel(x_ptr, v_ptr, out_ptr, K, PAIRS, RANKS: tl.constexpr, BLOCK_P: tl.constexpr,
                       PDL: tl.constexpr):
    """The activation-side table of a 2-bit layer for one row x: the sum of each 32 inputs (PAIRS / 16 values),
    then for each pair of inputs p and each of the 16 index pairs c (c & 3 the first input's index, c >> 2 the
    second's), x[2p] V[t, c & 3] + x[2p + 1] V[t, c >> 2] for every rank, fp32 (tables, PAIRS, 16, RANKS);
    program (block of pairs, table t). Inputs past K are 0."""
    wait_for_earlier_kernels(PDL)
    table = tl.program_id(1)
    pairs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    first = tl.load(x_ptr + 2 * pairs, mask=2 * pairs < K, other=0.0).to(tl.float32)
    second = tl.load(x_ptr + 2 * pairs + 1, mask=2 * pairs + 1 < K, other=0.0).to(tl.float32)
    runs = tl.program_id(0) * (BLOCK_P // 16) + tl.arange(0, BLOCK_P // 16)
    tl.store(out_ptr + runs, tl.sum(tl.reshape(first + second, (BLOCK_P // 16, 16)), axis=1),
             mask=runs < tl.where(table == 0, PAIRS // 16, 0))  # written once, by table 0's programs
    out_ptr += PAIRS // 16
    combos = tl.arange(0, 16)
    ranks = tl.arange(0, RANKS)
    v = v_ptr + table * (4 * RANKS) + ranks[None, :]
    v_first = tl.load(v + (combos & 3)[:, None] * RANKS)  # (16, RANKS)
    v_second = tl.load(v + (combos >> 2)[:, None] * RANKS)
    entries = first[:, None, None] * v_first[None, :, :] + second[:, None, None] * v_second[None, :, :]
    at = ((table * PAIRS + pairs[:, None, None]) * 16 + combos[None, :, None]) * RANKS + ranks[None, None, :]
    tl.store(out_ptr + at, entries, mask=(pairs < PAIRS)[:, None, None])


@triton.jit
def _lut_products(words, s_codes, b_codes, lut_ptr, lut_base, k0, ss_ptr, bs_ptr, offs_n, n_mask, N,
                  RANK: tl.constexpr, RANKS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """A 2-bit tile's products at one row from the pair table (_pair_table_kernel): each 4-bit field of the
    index words holds two indices, and one load per rank of its entry brings the sum of their two products;
    S applies once per tile. Returns (sum_r S[n, r] sum_k x[k] V[r, q[n, k]], B[n]), fp32 (BLOCK_N,) each:
    the tile's products are the first less B[n] times the tile's sum of x."""
    ROWS: tl.constexpr = BLOCK_K // 16  # words of 16 indices, consecutive in k (_plane_words)
    # each column's pointer to the tile's first pair, then a constant per field (the loads' immediate offsets);
    # (columns, fields) in the gather's orientation (GATHER_COLUMNS_FIRST), so that threads run along the columns
    tile = lut_ptr + lut_base + (k0 // 2) * (16 * RANKS)
    if GATHER_COLUMNS_FIRST:
        fields = (tl.trans(words)[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 15  # (BLOCK_N, ROWS, 8)
        pairs = tl.arange(0, ROWS)[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
        entries = tl.reshape((tile[:, None, None] + pairs * (16 * RANKS)) + fields * RANKS, (BLOCK_N, ROWS * 8))
        AXIS: tl.constexpr = 1
    else:
        fields = (words[:, None, :] >> (4 * tl.arange(0, 8))[None, :, None]) & 15  # (ROWS, 8, BLOCK_N)
        pairs = tl.arange(0, ROWS)[:, None, None] * 8 + tl.arange(0, 8)[None, :, None]
        entries = tl.reshape((tile[None, None, :] + pairs * (16 * RANKS)) + fields * RANKS, (ROWS * 8, BLOCK_N))
        AXIS: tl.constexpr = 0
    b = b_codes.to(tl.float32) * tl.load(bs_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)
    scaled = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in tl.static_range(RANK):  # one load per rank at a constant offset from the same address
        scaled += tl.sum(tl.load(entries + k), axis=AXIS) * _rank_scale(s_codes, ss_ptr, k, offs_n, n_mask, N)
    return scaled, b


def pair_table(x: torch.Tensor, layer: PackedLinear, pairs: int) -> torch.Tensor:
    """The pair table of a 2-bit layer for the row x (1, K) (_pair_table_kernel), fp32: the sum of each 32
    inputs (pairs / 16 values), then (tables, pairs, 16, ranks padded to a power of two), 64 bytes a pair at
    rank 1."""
    gather = _gather_table(layer)
    tables, ranks = gather.shape[0], gather.shape[2]
    table = torch.empty(pairs // 16 + tables * pairs * 16 * ranks, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(pairs, PAIR_TABLE_BLOCK), tables)
    _pair_table_kernel[grid](x, gather, table, x.shape[1], pairs, RANKS=ranks, BLOCK_P=PAIR_TABLE_BLOCK, num_warps=4,
                             **dependent_launch(x))
    return table
