"""A tile of a packed LCQ weight in a Triton program's registers: the index words of its bit planes, its group's
S and B codes, the weights w = S . V[:, q] - B per column in fp32, and the activations they multiply. Shared by
the decode, GEMM and dequantize kernels (triton_linear.py); the per-weight forms are compared in docs/kernels.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lcq.format import PackedLinear

from .elementwise import load_inputs, rms_normed

# Triton 3.6 (the GPU image's) lays out a gather whose addresses have no known contiguity along its
# first dimension, 3.7 and later along its last: the V gather runs (columns, depth) on 3.6 and
# (depth, columns) after, so that threads run along the columns either way. The other orientation
# moves every dequantized tile through shared memory (sm_90 builds, bench/kernels.py --sass: W4 r1
# decode 13.7 against 9.9 instructions per weight on 3.6, 12.8 against 10.0 on 3.9).
TRITON_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])
GATHER_COLUMNS_FIRST = tl.constexpr(TRITON_VERSION < (3, 7))
# A weight's entry taken from its column's codebook (BOOK: tl.gather) is one warp shuffle up to Triton 3.8. Triton
# 3.9 gives the tile's indices 4 to a thread along the gathered axis, and each weight took 4 shuffles and 3 selects
# (sm_90 SASS, bench/kernels.py --sass: the dequantize kernel W4 r2 20.8 instructions per weight against 10.4 on
# 3.6-3.8 and 12.6 from V's gathers on 3.9; the one-row decode tile W4 r1 18.7 against 8.1-8.6, and 9.7 from V's
# gathers). From 3.9 no kernel takes column codebooks.
COLUMN_BOOKS = tl.constexpr(TRITON_VERSION < (3, 9))


@triton.jit
def _plane_words(qw_ptr, k0, offs_n, mask, N, BITS: tl.constexpr, WIDTH: tl.constexpr, WORD_OFFSET: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """The words of one bit plane holding the indices k0 .. k0 + BLOCK_K - 1 of columns offs_n,
    int32 (BLOCK_K / 32 * WIDTH, BLOCK_N)."""
    ROWS: tl.constexpr = BLOCK_K // 32 * WIDTH
    block = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    rows = tl.reshape(block[:, None] * BITS + WORD_OFFSET + tl.arange(0, WIDTH)[None, :], (ROWS,))
    return tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=mask[None, :], other=0,
                   eviction_policy="evict_first")


@triton.jit
def _unpack(words, WIDTH: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The WIDTH-bit fields of a plane's words (_plane_words) as int32 (BLOCK_K, BLOCK_N)."""
    PER_WORD: tl.constexpr = 32 // WIDTH
    shifts = tl.arange(0, PER_WORD) * WIDTH
    parts = (words[:, None, :] >> shifts[None, :, None]) & ((1 << WIDTH) - 1)
    return tl.reshape(parts, (BLOCK_K, BLOCK_N))


@triton.jit
def _table_offsets(vi_ptr, offs_n, n_mask, BITS: tl.constexpr, RANKS: tl.constexpr):
    """Where each column's table starts in the gather table (_gather_table)."""
    return tl.load(vi_ptr + offs_n, mask=n_mask, other=0) * (RANKS << BITS)


@triton.jit
def _tile_words(qw_ptr, k0, offs_n, mask, N, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
                TOPS_PER_ROW: tl.constexpr = False):
    """The words of a tile's index planes: at 3 bits a 2-bit and a 1-bit plane, otherwise one (twice).
    TOPS_PER_ROW (3 bits): the 1-bit plane as one word per 2-bit word, its 16 indices' top bits in the low half."""
    if BITS == 3:
        words = _plane_words(qw_ptr, k0, offs_n, mask, N, BITS, 2, 0, BLOCK_K)
        if TOPS_PER_ROW:
            row = tl.arange(0, BLOCK_K // 16)
            top_words = tl.load(qw_ptr + ((k0 // 32 + row // 2) * BITS + 2)[:, None] * N + offs_n[None, :],
                                mask=mask[None, :], other=0, eviction_policy="evict_first") >> (16 * (row % 2))[:, None]
        else:
            top_words = _plane_words(qw_ptr, k0, offs_n, mask, N, BITS, 1, 2, BLOCK_K)
    else:
        words = _plane_words(qw_ptr, k0, offs_n, mask, N, BITS, BITS, 0, BLOCK_K)
        top_words = words
    return words, top_words


@triton.jit
def _tile_indices(words, top_words, BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The indices in a tile's words (_tile_words), int32 (BLOCK_K, BLOCK_N)."""
    if BITS == 3:
        q = _unpack(words, 2, BLOCK_K, BLOCK_N) | (_unpack(top_words, 1, BLOCK_K, BLOCK_N) << 2)
    else:
        q = _unpack(words, BITS, BLOCK_K, BLOCK_N)
    return q


@triton.jit
def _group_codes(sq_ptr, bq_ptr, k0, offs_n, mask, N, RANK: tl.constexpr, GROUP: tl.constexpr):
    """The S codes of the group holding index k0, rank k in byte k of an int32 per column (one tensor
    at every rank, so that the decode kernel can carry them a tile ahead), and its B codes."""
    group = k0 // GROUP
    s_codes = tl.zeros_like(offs_n)
    for k in tl.static_range(RANK):
        code = tl.load(sq_ptr + (group * RANK + k) * N + offs_n, mask=mask, other=0, eviction_policy="evict_first")
        s_codes |= (code.to(tl.int32) & 0xFF) << (8 * k)
    b_codes = tl.load(bq_ptr + group * N + offs_n, mask=mask, other=0, eviction_policy="evict_first")
    return s_codes, b_codes


@triton.jit
def _rank_scale(s_codes, ss_ptr, k, offs_n, n_mask, N):
    """S[n, group, k] for the columns offs_n, fp32, from _group_codes' packed codes."""
    code = (s_codes << (24 - 8 * k)) >> 24  # byte k, sign extended
    return code.to(tl.float32) * tl.load(ss_ptr + k * N + offs_n, mask=n_mask, other=0).to(tl.float32)


@triton.jit
def _table_entries(v_ptr, v_base, k, BITS: tl.constexpr, RANKS: tl.constexpr):
    """Rank k of every entry of each column's table V, fp32 (BLOCK_N, 2^BITS), gathered so that a thread holds its
    columns' entries on every Triton (GATHER_COLUMNS_FIRST): gathered (columns, entries) on Triton 3.7-3.9, the
    entries went across threads and a codebook's range took warp shuffles (sm_90, bench/kernels.py --sass: one-row
    products of bytes W2 r2 2.9-3.0 instructions per weight against 2.0-2.2 so, W4 r2 9.9 against 6.5)."""
    entries = tl.arange(0, 1 << BITS)
    if GATHER_COLUMNS_FIRST:
        return tl.load(v_ptr + v_base[:, None] + entries[None, :] * RANKS + k)
    else:
        return tl.trans(tl.load(v_ptr + v_base[None, :] + entries[:, None] * RANKS + k))


@triton.jit
def _tile_weights(q, s_codes, b_codes, ss_ptr, bs_ptr, v_ptr, v_base, offs_n, n_mask, N,
                  BITS: tl.constexpr, RANK: tl.constexpr, RANKS: tl.constexpr, SELECT: tl.constexpr,
                  BOOK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """A tile's weights as fp32 (BLOCK_K, BLOCK_N) from its indices and group codes: w = S . V[:, q] - B.
    v_ptr: the gather table (RANKS: the rank padded to a power of two), v_base: each column's table
    offset (_table_offsets). Per weight: at 2 bits (SELECT) selects among the column's 4 entries; at 3-4 bits
    a gather of V's entries for its index and their sum weighted by S; or with BOOK the column's 2^BITS
    entries first (once a tile) and per weight a tl.gather of its entry, which Triton 3.6 makes a warp
    shuffle (bench/kernels.py --sass, sm_90: one row, 64 columns per 2 warps, W4 8.1-9.0 instructions per
    weight at ranks 1-4 against 9.1-13.3, W3 r1 11.0 against 11.5; 16 rows, 64 columns per 4 warps, W4
    10.6-12.5 against 12.0-17.0, W3 r1 13.3 against 17.1, and W2 r2 with 128 columns 8.1 against the
    selects' 11.0; 34-44 more registers). The forms are in the autotuner's lists (DECODE_CONFIGS)."""
    b = b_codes.to(tl.float32) * tl.load(bs_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)
    if BOOK:  # the column's 2^BITS codebook entries S . V - B, then each weight takes its entry
        book = tl.zeros((BLOCK_N, 1 << BITS), dtype=tl.float32) - b[:, None]
        for k in tl.static_range(RANK):
            s = _rank_scale(s_codes, ss_ptr, k, offs_n, n_mask, N)
            book += s[:, None] * _table_entries(v_ptr, v_base, k, BITS, RANKS)
        w = tl.trans(tl.gather(book, tl.trans(q), axis=1))
    elif SELECT:  # 2 bits: the 4 codebook entries of each column, then selects on the index bits
        c0 = -b
        c1 = -b
        c2 = -b
        c3 = -b
        for k in tl.static_range(RANK):
            s = _rank_scale(s_codes, ss_ptr, k, offs_n, n_mask, N)
            table = v_ptr + v_base + k
            c0 += s * tl.load(table)
            c1 += s * tl.load(table + RANKS)
            c2 += s * tl.load(table + 2 * RANKS)
            c3 += s * tl.load(table + 3 * RANKS)
        low = (q & 1) != 0
        w = tl.where((q & 2) != 0, tl.where(low, c3[None, :], c2[None, :]), tl.where(low, c1[None, :], c0[None, :]))
    else:  # one vector load of every rank's entry per weight, then w = S . V[:, q] - B
        ranks = tl.arange(0, RANKS)
        scales = tl.zeros((BLOCK_N, RANKS), dtype=tl.float32)
        for k in tl.static_range(RANK):
            s = _rank_scale(s_codes, ss_ptr, k, offs_n, n_mask, N)
            scales += tl.where(ranks[None, :] == k, s[:, None], 0.0)
        if GATHER_COLUMNS_FIRST:  # (BLOCK_N, BLOCK_K, RANKS), then back to (BLOCK_K, BLOCK_N)
            v = tl.load(v_ptr + (v_base[:, None] + tl.trans(q) * RANKS)[:, :, None] + ranks[None, None, :])
            if RANK == 1:  # one FMA with B instead of a product, a one-element sum and a subtraction
                w = tl.trans(tl.reshape(v, (BLOCK_N, BLOCK_K)) * tl.reshape(scales, (BLOCK_N,))[:, None] - b[:, None])
            else:
                w = tl.trans(tl.sum(v * scales[:, None, :], axis=2) - b[:, None])
        else:
            v = tl.load(v_ptr + (v_base[None, :] + q * RANKS)[:, :, None] + ranks[None, None, :])
            if RANK == 1:
                w = tl.reshape(v, (BLOCK_K, BLOCK_N)) * tl.reshape(scales, (BLOCK_N,))[None, :] - b[None, :]
            else:
                w = tl.sum(v * scales[None, :, :], axis=2) - b[None, :]
    return w


@triton.jit
def _dequant_tile(qw_ptr, sq_ptr, ss_ptr, bq_ptr, bs_ptr, v_ptr, v_base, k0, offs_n, n_mask, N,
                  BITS: tl.constexpr, RANK: tl.constexpr, RANKS: tl.constexpr, GROUP: tl.constexpr,
                  SELECT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BOOK: tl.constexpr = False):
    """Weights W[n, k0 + i] as fp32 (BLOCK_K, BLOCK_N); the tile lies inside group k0 // GROUP. BOOK: from each
    column's codebook (_tile_weights)."""
    words, top_words = _tile_words(qw_ptr, k0, offs_n, n_mask, N, BITS, BLOCK_K)
    q = _tile_indices(words, top_words, BITS, BLOCK_K, BLOCK_N)
    s_codes, b_codes = _group_codes(sq_ptr, bq_ptr, k0, offs_n, n_mask, N, RANK, GROUP)
    return _tile_weights(q, s_codes, b_codes, ss_ptr, bs_ptr, v_ptr, v_base, offs_n, n_mask, N,
                         BITS, RANK, RANKS, SELECT, BOOK, BLOCK_K, BLOCK_N)


@triton.jit
def _dot(x, w, acc, DOT_IN_FP32: tl.constexpr):
    """acc + x @ w with w rounded to x's dtype; DOT_IN_FP32 performs the same products in fp32
    (the interpreter of Triton 3.9 misreads bf16 tl.dot operands as integers). fp32 operands multiply in
    fp32 ("ieee"), as torch's fp32 matmul does by default, not in tf32, Triton's default on a GPU."""
    if DOT_IN_FP32:
        return tl.dot(x.to(tl.float32), w.to(x.dtype).to(tl.float32), acc, input_precision="ieee")
    if x.dtype == tl.float32:
        return tl.dot(x, w, acc, input_precision="ieee")
    return tl.dot(x, w.to(x.dtype), acc)


@triton.jit
def _within_k(w, k0, K, BLOCK_K: tl.constexpr):
    """The weight tile w (BLOCK_K, BLOCK_N) from depth k0 with zeros past K, in place of a partial last group's
    padding: its indices decode to codebook entry 0, which may lie beyond fp16's range where no real weight does,
    and then inf x the masked input's 0 would make every output NaN. Only the tile that crosses K is masked.
    (Masked in every tile, an sm_90 fp16 loop at 16 rows took 700 instructions for 419.)"""
    if k0 + BLOCK_K > K:
        w = tl.where((k0 + tl.arange(0, BLOCK_K) < K)[:, None], w, 0.0)
    return w


@triton.jit
def stream_scales(partials_ptr, rows, mask, PARTIALS, K, eps, NORM_PARTS: tl.constexpr):
    """Each row's RMSNorm scale, rsqrt(sum of its squares / K + eps) (fp32, like rows), from the PARTIALS partial sums
    of squares the last product adding to the residual stream wrote (triton_linear's RESIDUAL); NORM_PARTS: a power
    of two, at least PARTIALS."""
    part = tl.arange(0, NORM_PARTS)
    squares = tl.load(partials_ptr + rows[:, None] * PARTIALS + part[None, :],
                      mask=mask[:, None] & (part < PARTIALS)[None, :], other=0.0)
    return tl.rsqrt(tl.sum(squares, axis=1) / K + eps)


@triton.jit
def _tile_inputs(x_ptr, lut_ptr, x_rows, m_mask, stride_xm, k0, K, PAIRS, LUT: tl.constexpr, BLOCK_K: tl.constexpr,
                 FP32: tl.constexpr, SELECTOR_ORDER: tl.constexpr, PREPARED: tl.constexpr = False,
                 GATED: tl.constexpr = 0, norm_ptr=None, norm_scales=None, NORMED: tl.constexpr = False):
    """What a tile's weights multiply: the activations (BLOCK_M, BLOCK_K), in fp32 with FP32, or at one row from
    the pair table (LUT) their sum, which the table starts with in runs of 32 (0 past them).
    FP32 (one row, and products of bytes): converted where they are loaded, a tile ahead with PREFETCH, each
    thread converts a few and hands the tile to the threads that multiply; converted after that hand-over, every
    thread converted every input of its columns, one instruction per weight (sm_90, W2 r2: 7.1 instructions per
    weight and 80 registers, 6.1 and 64 so). At two rows the fp32 tile took 255 registers and spilled.
    SELECTOR_ORDER (products of bytes at 2 bits): in the order _int8_products multiplies them, slot 4j + i of each
    16 input (j & 1) + 8 (j >> 1) + 2i of that 16.
    PREPARED (products of bytes): x_ptr holds the inputs as input_bytes() prepared them, int32 (BLOCK_M, BLOCK_K / 2)
    a tile (_prepared_fields).
    GATED (elementwise.GATED_CODES): x_ptr's rows are [gate, up] of width 2 K, the inputs act(gate) * up
    (elementwise.load_inputs), computed as the MLP's activation kernel computes them, which then need not run.
    NORMED: x_ptr's rows are the residual stream and the inputs its RMSNorm by the weight at norm_ptr
    (elementwise.rms_normed), each row's scale in norm_scales (BLOCK_M,: stream_scales)."""
    if PREPARED:
        inputs = tl.load(x_ptr + x_rows[:, None] * stride_xm + k0 // 2 + tl.arange(0, BLOCK_K // 2)[None, :],
                         mask=m_mask[:, None], other=0)
    elif LUT:
        inputs = tl.load(lut_ptr + k0 // 32, mask=k0 // 32 < PAIRS // 16, other=0.0)
        for run in tl.static_range(1, BLOCK_K // 32):
            inputs += tl.load(lut_ptr + k0 // 32 + run, mask=k0 // 32 + run < PAIRS // 16, other=0.0)
    else:
        k_idx = k0 + tl.arange(0, BLOCK_K)
        if SELECTOR_ORDER:
            slot = k_idx % 16
            k_idx = k_idx - slot + (slot // 4) % 2 + 8 * (slot // 8) + 2 * (slot % 4)
        inputs = load_inputs(x_ptr + x_rows[:, None] * stride_xm, k_idx[None, :],
                             m_mask[:, None] & (k_idx[None, :] < K), K, GATED)
        if NORMED:
            weight = tl.load(norm_ptr + k_idx, mask=k_idx < K, other=0.0).to(tl.float32)
            inputs = rms_normed(inputs.to(tl.float32), norm_scales[:, None], weight[None, :], inputs.dtype)
        if FP32:
            inputs = inputs.to(tl.float32)
    return inputs


def block_k(group_size: int) -> int:
    """Tile depth: 64 where it divides the group, else 32 (group sizes are multiples of 32). Deeper
    tiles would hold BLOCK_M x BLOCK_K x BLOCK_N products (FMA form) or a large fp32 weight tile
    next to a large accumulator (GEMM) in registers."""
    return 64 if group_size % 64 == 0 else 32


def uses_select(bits: int) -> bool:
    """Per-weight form (docs/kernels.md): at 2 bits, selects among the column's 4 entries cost the same
    at every rank and fewer instructions than a V gather (load, 64-bit address, conversion) even at
    rank 1; at 3 and 4 bits the select chains are longer than the gathers."""
    return bits == 2


def _gather_table(layer: PackedLinear) -> torch.Tensor:
    """V as (tables, 2^bits, ranks padded to a power of two) fp32, so that one vector load fetches
    every rank of an index (at rank 4 one 16-byte load instead of four 2-byte gathers, each with its
    64-bit address and fp16 conversion: sm_90 SASS of the M = 1 decode loop at W4 g128 went from
    20.1 to 15.2 instructions per weight, 13.5 to 11.6 at rank 2); a mixture's experts' tables one
    expert after another. Built once per layer object and device (a kernel before the first product,
    so never inside a CUDA graph capture)."""
    table = layer.__dict__.get("_gather_table")
    if table is None or table.device != layer.v.device:
        v = layer.v.reshape(-1, *layer.v.shape[-2:])
        table = torch.zeros(v.shape[0], v.shape[2], triton.next_power_of_2(layer.rank),
                            dtype=torch.float32, device=v.device)
        table[..., : layer.rank] = v.float().transpose(1, 2)
        layer.__dict__["_gather_table"] = table
    return table
