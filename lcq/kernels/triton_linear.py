"""Fused Triton kernels for y = x @ W^T with a packed LCQ weight W.

Both kernels unpack a (BLOCK_K, BLOCK_N) tile of indices from the kmajor bit planes (one
coalesced load of BLOCK_K / 32 * bits rows of N-contiguous words), turn it into weights with
the group's codebook w = sum_k S[n, j, k] * V[k, q] - B[n, j] in fp32 registers, and reduce:
- decode (M <= 64): split-K over the groups so that a single token fills the GPU; every
  weight is read once (evict_first); the K slices meet through an fp32 workspace and the last
  program of each N tile to finish sums them (one launch, no memset);
- decode at one row of a 2-bit layer, where it was timed faster: the products come from an activation-side
  table of every pair of inputs with every pair of indices (pair_table), one load per 4-bit field and rank;
- gemm (prefill): tiles of BLOCK_M x BLOCK_N, tl.dot with fp32 accumulation;
- from DENSE_MIN_M rows on, a dequantize kernel writes the weight in the activation dtype and
  cuBLAS multiplies: the weight's bytes are then small next to the product's arithmetic, and
  cuBLAS's tensor-core pipeline beats a tile loop that also spends its issue slots dequantizing.
A tile never straddles a group (BLOCK_K divides the group size), so S and B are one vector per
tile. V is read from the layer's tiny gather table (L1 resident: V with the entries first and
the ranks padded to a power of two, fp32), one vector load for all ranks of an index; fused
layers pick their part's table through v_index. See docs/kernels.md for why this form was chosen.
"""
from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

from lcq.format import PackedLinear

from .arrival_counters import arrival_counters
from .dependent_launch import dependent_launch, wait_for_earlier_kernels
from .experts import ExpertRoutes, PackedExperts
from .gpu_timing import graph_time

# Triton 3.6 (the GPU image's) lays out a gather whose addresses have no known contiguity along its
# first dimension, 3.7 and later along its last: the V gather runs (columns, depth) on 3.6 and
# (depth, columns) after, so that threads run along the columns either way. The other orientation
# moves every dequantized tile through shared memory (sm_90 builds, bench/kernels.py --sass: W4 r1
# decode 13.7 against 9.9 instructions per weight on 3.6, 12.8 against 10.0 on 3.9).
GATHER_COLUMNS_FIRST = tl.constexpr(tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7))

DECODE_MAX_M = 64
# H100, bench/kernels.py: at 64 rows the split-K decode kernel (59-98 us on the 7B MLP shapes at
# W2 r2 / W4 r1 g128) and dequantize + cuBLAS (83-105 us) both beat the tiled GEMM kernel
# (94-487 us), which has too few programs to fill the GPU at that M; above 64 rows the decode
# kernel's tiles spill and cuBLAS's tensor-core pipeline wins.
DENSE_MIN_M = DECODE_MAX_M + 1
MAX_SPLIT_K = 16


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
        entries = tl.arange(0, 1 << BITS)
        book = tl.zeros((BLOCK_N, 1 << BITS), dtype=tl.float32) - b[:, None]
        for k in tl.static_range(RANK):
            s = _rank_scale(s_codes, ss_ptr, k, offs_n, n_mask, N)
            book += s[:, None] * tl.load(v_ptr + v_base[:, None] + entries[None, :] * RANKS + k)
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
def _byte_permute(low, high, selector, ASM: tl.constexpr):
    """Byte i of the result is byte (nibble i of selector) of the 8 bytes of low (0-3) and high (4-7), for nibbles
    0-7 (int32 tensors): one PTX prmt on a GPU (ASM), shifts and masks in the interpreter."""
    if ASM:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [low, high, selector],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        picked = tl.zeros_like(selector)
        for i in tl.static_range(4):
            pick = (selector >> (4 * i)) & 7
            picked |= ((tl.where(pick < 4, low, high) >> (8 * (pick & 3))) & 0xFF) << (8 * i)
        return picked


@triton.jit
def _dot4(a, b, acc, ASM: tl.constexpr):
    """acc + the dot product of the 4 signed bytes of a and of b (int32 tensors): one PTX dp4a on a GPU (ASM)."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, acc], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        for i in tl.static_range(4):
            acc += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
        return acc


@triton.jit
def _to_bytes(values, scale_inverse, offset: tl.constexpr = 0):
    """values * scale_inverse (within +-127) rounded to the nearest integer (ties to even, as byte_products.to_int8),
    plus offset, in the low byte of an int32: adding 1.5 * 2^23 leaves the integer in the float's low mantissa bits,
    one FMA where a rounding conversion took five instructions (sm_90)."""
    return (values * scale_inverse + (12582912.0 + offset)).to(tl.int32, bitcast=True) & 0xFF


@triton.jit
def _int8_book(s_codes, b_codes, ss_ptr, bs_ptr, v_ptr, v_base, offs_n, n_mask, N, BITS: tl.constexpr,
               RANK: tl.constexpr, RANKS: tl.constexpr, BLOCK_N: tl.constexpr, OFFSET: tl.constexpr = 0):
    """A tile's column codebooks in bytes: entry e of column n in byte e % 4 of int32 e // 4 of row n, each
    column's 2^BITS entries S . V - B less their midrange, scaled by 127 / half their range, rounded, plus
    OFFSET. Returns (books (BLOCK_N, 2^BITS / 4), steps, midranges): entry e is midrange + step * (byte e as a
    signed byte, or less OFFSET). (Scaled by their largest magnitude instead, a codebook off zero, as B makes many,
    was rounded up to twice as coarsely, and the error, the same for every weight of the group that takes the
    entry, added up along the product: SmolLM2 W2 r2 g128 perplexity +0.6% with only the codebooks in bytes,
    bench/byte_products_quality.py.)"""
    ENTRIES: tl.constexpr = 1 << BITS
    entries = tl.arange(0, ENTRIES)
    book = -(b_codes.to(tl.float32) * tl.load(bs_ptr + offs_n, mask=n_mask, other=0).to(tl.float32))[:, None] \
        + tl.zeros((1, ENTRIES), dtype=tl.float32)
    for k in tl.static_range(RANK):
        s = _rank_scale(s_codes, ss_ptr, k, offs_n, n_mask, N)
        book += s[:, None] * tl.load(v_ptr + v_base[:, None] + entries[None, :] * RANKS + k)
    highest = tl.max(book, axis=1)
    lowest = tl.min(book, axis=1)
    midrange = (highest + lowest) * 0.5
    half_range = (highest - lowest) * 0.5
    scale = tl.math.div_rn(tl.full((BLOCK_N,), 127.0, tl.float32), tl.maximum(half_range, 1e-30))  # as torch's
    codes = _to_bytes(book - midrange[:, None], scale[:, None], OFFSET)
    bytes_in_words = tl.reshape(codes, (BLOCK_N, ENTRIES // 4, 4)) << (8 * tl.arange(0, 4))[None, None, :]
    books = tl.sum(bytes_in_words, axis=2)  # disjoint bytes: the sum is their or
    return books, half_range / 127.0, midrange


@triton.jit
def _picked_bytes(words, tops, books, SHIFT: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    """The codebook bytes (_int8_book's books, (1, BLOCK_N, 2^BITS / 4)) of 4 of each word's indices, one int32
    per word (_int8_products). 2 bits: (word >> SHIFT) & 0x3333 holds the indices SHIFT / 2 + 2i in its
    nibbles, a prmt selector over the 4 entries. 3 bits: the same low bits, and the indices' top bits (tops,
    _tile_words' TOPS_PER_ROW: bit j for index j) spread from bits 2i to 4i + 2 in two shift-or-mask steps,
    select among 8 entries. 4 bits: the indices SHIFT / 4 + i, each 3 low bits selecting among entries 0-7 and,
    by a second prmt, 8-15; a third takes byte i from the second where index i's top bit is set
    ((word >> (SHIFT + 1)) & 0x4444 adds 4 to nibble i of the selector 0x3210)."""
    if BITS == 2:
        book = tl.reshape(books, books.shape[:2])
        return _byte_permute(book, book, (words >> SHIFT) & 0x3333, ASM)
    elif BITS == 3:
        entries_0_3, entries_4_7 = tl.split(books)
        top = (tops >> (SHIFT // 2)) & 0x55
        top = (top | (top << 4)) & 0x0F0F
        top = (top | (top << 2)) & 0x3333
        return _byte_permute(entries_0_3, entries_4_7, ((words >> SHIFT) & 0x3333) | (top << 2), ASM)
    else:
        first, second = tl.split(tl.reshape(books, (1, books.shape[1], 2, 2)))  # words (0, 2), (1, 3)
        entries_0_3, entries_8_11 = tl.split(first)
        entries_4_7, entries_12_15 = tl.split(second)
        selector = (words >> SHIFT) & 0x7777
        low = _byte_permute(entries_0_3, entries_4_7, selector, ASM)
        high = _byte_permute(entries_8_11, entries_12_15, selector, ASM)
        return _byte_permute(low, high, ((words >> (SHIFT + 1)) & 0x4444) | 0x3210, ASM)


@triton.jit
def _row(values, m: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row m of values (BLOCK_M, ...), without its first dimension."""
    if BLOCK_M == 1:
        return tl.reshape(values, values.shape[1:])
    else:
        rows = tl.arange(0, BLOCK_M).expand_dims(1)
        return tl.sum(tl.where(rows == m, values, 0), axis=0)


@triton.jit
def _prepared_fields(inputs, BITS: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr):
    """The fields of a tile's prepared inputs (int32 (BLOCK_M, BLOCK_K / 2), input_bytes()): per run of an index
    word's inputs its 4 input bytes per int32 (4 of them at 2 and 3 bits, 2 at 4: x_c and x_d are then
    unused), their scale and their sum as fp32 bits. Returns x_a, x_b, x_c, x_d, scales (BLOCK_M, ROWS) and the
    tile's input sums (BLOCK_M,)."""
    if BITS == 4:  # fields q0 q1 scale sum: f[a, b] = 2a + b
        low, high = tl.split(tl.reshape(inputs, (BLOCK_M, ROWS, 2, 2)))
        x_a, scales = tl.split(low)
        x_b, sums = tl.split(high)
        x_c, x_d = x_a, x_b
    else:  # fields q0 q1 q2 q3 scale sum - -: f[h, a, b] = 4h + 2a + b
        b0, b1 = tl.split(tl.reshape(inputs, (BLOCK_M, ROWS, 2, 2, 2)))
        b0a0, b0a1 = tl.split(b0)
        b1a0, b1a1 = tl.split(b1)
        x_a, scales = tl.split(b0a0)
        x_c, _ = tl.split(b0a1)
        x_b, sums = tl.split(b1a0)
        x_d, _ = tl.split(b1a1)
    return x_a, x_b, x_c, x_d, scales.to(tl.float32, bitcast=True), tl.sum(sums.to(tl.float32, bitcast=True), axis=1)


@triton.jit
def _int8_products(words, tops, books, steps, midranges, inputs, BITS: tl.constexpr, ASM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PREPARED: tl.constexpr = False):
    """A tile's products with 8-bit operands, fp32 (BLOCK_M, BLOCK_N): the inputs of each index word of a row (16
    at 2 and 3 bits, where the word is the 2-bit plane's, 8 at 4) scaled to bytes by their largest magnitude,
    each weight its column's codebook byte (_int8_book). Word r of a column holds the indices from r times that
    count, index i in its bits from 2i (4i at 4 bits); prmt picks the codebook bytes of 4 of them into one int32
    (_picked_bytes), and dp4a multiplies it by the matching 4 input bytes and sums: per 16 weights at 2 bits 4
    selectors (7 instructions), 4 prmt and 4 dp4a, at 3 bits about 16 more for the selectors, at 4 bits about
    10, 12 and 4; then per word a conversion and an FMA. Each column's step scales those sums and its
    midrange multiplies the sum of the tile's inputs (exact, fp32). The products stay in the words' layout (a
    3-d tensor of rows, words and columns moved every weight through shared memory in the sm_90 build).
    inputs: the tile's (BLOCK_M, BLOCK_K) activations, at 2 and 3 bits in the order of the selectors
    (_tile_inputs)."""
    PER_WORD: tl.constexpr = 8 if BITS == 4 else 16
    ROWS: tl.constexpr = BLOCK_K // PER_WORD
    if PREPARED:
        x_a, x_b, x_c, x_d, scales, input_sums = _prepared_fields(inputs, BITS, BLOCK_M, ROWS)
    else:
        x = tl.reshape(inputs, (BLOCK_M, ROWS, PER_WORD))
        largest = tl.max(tl.abs(x), axis=2)
        scales = largest / 127.0
        input_sums = tl.sum(inputs, axis=1)
        codes = _to_bytes(x, (127.0 / tl.maximum(largest, 1e-30))[:, :, None])
        quads = tl.sum(tl.reshape(codes, (BLOCK_M, ROWS, PER_WORD // 4, 4))
                       << (8 * tl.arange(0, 4))[None, None, None, :], axis=3)  # 4 input bytes each, in selector order
        if BITS == 4:
            x_a, x_b = tl.split(quads)
        else:
            even, odd = tl.split(tl.reshape(quads, (BLOCK_M, ROWS, 2, 2)))
            x_a, x_c = tl.split(even)
            x_b, x_d = tl.split(odd)
    books = books[None, :, :]
    if BITS == 4:
        w_a = _picked_bytes(words, tops, books, 0, BITS, ASM)
        w_b = _picked_bytes(words, tops, books, 16, BITS, ASM)
    else:
        w_a = _picked_bytes(words, tops, books, 0, BITS, ASM)
        w_b = _picked_bytes(words, tops, books, 2, BITS, ASM)
        w_c = _picked_bytes(words, tops, books, 16, BITS, ASM)
        w_d = _picked_bytes(words, tops, books, 18, BITS, ASM)
    products = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m in tl.static_range(BLOCK_M):
        dots = _dot4(w_a, _row(x_a, m, BLOCK_M)[:, None] + tl.zeros_like(words), tl.zeros_like(words), ASM)
        dots = _dot4(w_b, _row(x_b, m, BLOCK_M)[:, None] + tl.zeros_like(words), dots, ASM)
        if BITS != 4:
            dots = _dot4(w_c, _row(x_c, m, BLOCK_M)[:, None] + tl.zeros_like(words), dots, ASM)
            dots = _dot4(w_d, _row(x_d, m, BLOCK_M)[:, None] + tl.zeros_like(words), dots, ASM)
        sums = tl.sum(dots.to(tl.float32) * _row(scales, m, BLOCK_M)[:, None], axis=0)
        products += tl.where(tl.arange(0, BLOCK_M)[:, None] == m, sums[None, :], 0.0)
    return products * steps[None, :] + input_sums[:, None] * midranges[None, :]


@triton.jit
def _book_weights(words, tops, books, slots, BITS: tl.constexpr, DTYPE: tl.constexpr, ASM: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """A tile's weights' codes (_int8_book's, stored plus 128) as DTYPE values, transposed
    (BLOCK_N, BLOCK_K), k in the order of the selectors (_in_selector_order at 2 and 3 bits): in fp16 the code plus
    the kernel's RAW (1152), in bf16 the code, exact either way, so that the product of a tile with them is
    step * (that product - RAW * the inputs' sum) + midrange * the inputs' sum, per column.
    prmt picks 4 weights' codes into an int32 (_picked_bytes), broadcast to the 4 k it holds; then per 2 weights
    one inline assembly instance (3 instructions in fp16, 5 in bf16). Which byte of its word a weight takes comes
    with it, from slots (byte_slots(), loaded: with positions from tl.arange, Triton 3.6 no longer built the
    weights where the tensor cores read them but stored each through shared memory, sm_90), so that any 2
    weights Triton's layout hands an instance are right: slot k % 4 has the prmt selector of byte k % 4 for a
    pair's first weight in its low byte and for its second in its next. (The steps and midranges are applied
    after the product for the same reason: as operands here, they too took the weights through shared memory.)
    Codes of 63 levels, 128 + the code under bf16's own exponent byte, cost SmolLM2's perplexity 0.6% at W3 and
    1.0% at W4 against fp16's 8-bit ones (docs/kernels.md), hence the fp32 exponent for bf16."""
    books = books[None, :, :]
    if BITS == 4:
        picks = tl.join(_picked_bytes(words, tops, books, 0, BITS, ASM), _picked_bytes(words, tops, books, 16, BITS, ASM))
    else:  # shifts 0, 2, 16 and 18 pick the indices (0 2 4 6), (1 3 5 7), (8 ...) and (9 ...) of each word
        a = _picked_bytes(words, tops, books, 0, BITS, ASM)
        b = _picked_bytes(words, tops, books, 2, BITS, ASM)
        c = _picked_bytes(words, tops, books, 16, BITS, ASM)
        d = _picked_bytes(words, tops, books, 18, BITS, ASM)
        picks = tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), (words.shape[0], BLOCK_N, 4))
    copies = tl.reshape(tl.permute(picks[:, :, :, None] + tl.zeros((1, 1, 1, 4), dtype=tl.int32), (1, 0, 2, 3)),
                        (BLOCK_N, BLOCK_K))  # each pick once for each of its 4 weights
    slot = tl.reshape(tl.permute(tl.zeros_like(picks)[:, :, :, None] + slots[None, None, None, :], (1, 0, 2, 3)),
                      (BLOCK_N, BLOCK_K))
    if ASM and DTYPE == tl.float16:  # a lop3 joins the pair's slots, a prmt takes their codes, a lop3 sets the
        # exponent byte 0x64 above each: 1024 + the stored code, the code + 1152
        return tl.inline_asm_elementwise(
            "{ .reg .b32 s, t; lop3.b32 s, $3, $4, 0xFF, 0xE4; prmt.b32 t, $1, $2, s;"
            " lop3.b32 $0, t, 0x00FF00FF, 0x64006400, 0xEA; }",
            "=r,r,r,r,r", [copies, slot], dtype=tl.float16, is_pure=True, pack=2)
    elif ASM:  # bf16, whose 8-bit significand holds no 1024 + a byte: a prmt per weight puts its code under the fp32
        # exponent 0x4B (2^23 + the stored code), a subtraction leaves the code and one cvt rounds both (exactly)
        return tl.inline_asm_elementwise(
            "{ .reg .b32 a, b; prmt.b32 a, $1, 0x4B000000, $3; prmt.b32 b, $2, 0x4B000000, $4;"
            " sub.f32 a, a, 0f4B000080; sub.f32 b, b, 0f4B000080; cvt.rn.bf16x2.f32 $0, b, a; }",
            "=r,r,r,r,r", [copies, (slot & 3) | 0x7540], dtype=tl.bfloat16, is_pure=True, pack=2)
    else:  # the same values: the code plus 1152 (fp16) or the code (bf16)
        raw = ((copies >> (8 * (slot & 3))) & 0xFF) - (128 if DTYPE == tl.bfloat16 else -1024)
        return raw.to(tl.float32).to(DTYPE)  # through fp32: the interpreter takes integers to bf16 wrongly


@triton.jit
def _in_selector_order(inputs, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """A tile's inputs (BLOCK_M, BLOCK_K) in the order of _book_weights' k: at 2 and 3 bits input 16 r + 8 h +
    2 i + l in place 16 r + 8 h + 4 l + i (_tile_inputs' SELECTOR_ORDER), permuted where they are, not gathered in
    that order (a gather's elements took one store each on their way to the tensor cores, sm_90)."""
    if BITS == 4:
        return inputs
    else:
        runs = tl.reshape(inputs, (BLOCK_M, BLOCK_K // 8, 4, 2))
        return tl.reshape(tl.permute(runs, (0, 1, 3, 2)), (BLOCK_M, BLOCK_K))


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
    (the interpreter of Triton 3.9 misreads bf16 tl.dot operands as integers)."""
    if DOT_IN_FP32:
        return tl.dot(x.to(tl.float32), w.to(x.dtype).to(tl.float32), acc)
    return tl.dot(x, w.to(x.dtype), acc)


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
def _tile_inputs(x_ptr, lut_ptr, x_rows, m_mask, stride_xm, k0, K, PAIRS, LUT: tl.constexpr, BLOCK_K: tl.constexpr,
                 FP32: tl.constexpr, SELECTOR_ORDER: tl.constexpr, PREPARED: tl.constexpr = False):
    """What a tile's weights multiply: the activations (BLOCK_M, BLOCK_K), in fp32 with FP32, or at one row from
    the pair table (LUT) their sum, which the table starts with in runs of 32 (0 past them).
    FP32 (one row, and products of bytes): converted where they are loaded, a tile ahead with PREFETCH, each
    thread converts a few and hands the tile to the threads that multiply; converted after that hand-over, every
    thread converted every input of its columns, one instruction per weight (sm_90, W2 r2: 7.1 instructions per
    weight and 80 registers, 6.1 and 64 so). At two rows the fp32 tile took 255 registers and spilled.
    SELECTOR_ORDER (products of bytes at 2 bits): in the order _int8_products multiplies them, slot 4j + i of each
    16 input (j & 1) + 8 (j >> 1) + 2i of that 16.
    PREPARED (products of bytes): x_ptr holds the inputs as input_bytes() prepared them, int32 (BLOCK_M, BLOCK_K / 2)
    a tile (_prepared_fields)."""
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
        inputs = tl.load(x_ptr + x_rows[:, None] * stride_xm + k_idx[None, :],
                         mask=m_mask[:, None] & (k_idx[None, :] < K), other=0.0)
        if FP32:
            inputs = inputs.to(tl.float32)
    return inputs


@triton.jit
def _input_bytes_kernel(x_ptr, out_ptr, K, RUNS, stride_xm, stride_om, BITS: tl.constexpr, BLOCK_RUNS: tl.constexpr,
                        PDL: tl.constexpr = False):
    """Row program_id(0)'s inputs as products of bytes take them (PREPARED, _prepared_fields): per run of an index
    word's inputs (16 at 2 and 3 bits, in the selectors' order, _tile_inputs; 8 at 4) FIELDS int32: the run's
    bytes 4 to an int32 (_int8_products' rounding), its scale (largest magnitude / 127) and its sum, fp32 bits, and
    zeros to FIELDS. RUNS runs a row, past K zeros."""
    PER_WORD: tl.constexpr = 8 if BITS == 4 else 16
    QUADS: tl.constexpr = PER_WORD // 4
    FIELDS: tl.constexpr = PER_WORD // 2
    row = tl.program_id(0)
    runs = tl.program_id(1) * BLOCK_RUNS + tl.arange(0, BLOCK_RUNS)
    slot = tl.arange(0, PER_WORD)
    if BITS == 4:
        k = runs[:, None] * PER_WORD + slot[None, :]
    else:
        k = runs[:, None] * PER_WORD + ((slot // 4) % 2 + 8 * (slot // 8) + 2 * (slot % 4))[None, :]
    wait_for_earlier_kernels(PDL)  # x is an earlier kernel's output
    x = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
    largest = tl.max(tl.abs(x), axis=1)
    codes = _to_bytes(x, (127.0 / tl.maximum(largest, 1e-30))[:, None])
    quads = tl.sum(tl.reshape(codes, (BLOCK_RUNS, QUADS, 4)) << (8 * tl.arange(0, 4))[None, None, :], axis=2)
    after = tl.arange(0, QUADS)[None, :]  # the fields after the quads: scale, sum, zeros
    after = tl.where(after == 0, (largest / 127.0).to(tl.int32, bitcast=True)[:, None],
                     tl.where(after == 1, tl.sum(x, axis=1).to(tl.int32, bitcast=True)[:, None], 0))
    values = tl.reshape(tl.permute(tl.join(quads, after), (0, 2, 1)), (BLOCK_RUNS, FIELDS))
    field = tl.arange(0, FIELDS)[None, :]
    tl.store(out_ptr + row * stride_om + runs[:, None] * FIELDS + field, values, mask=(runs < RUNS)[:, None])


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


@triton.jit
def _sum_of_partials(ws_ptr, ws_offs, mask, slice_stride, SPLIT_K, TOGETHER: tl.constexpr):
    """The split-K slices' partial sums at ws_offs, added in slice order. TOGETHER loads are issued before
    their adds, so that the last program waits on one L2 round trip per TOGETHER slices, not per slice (a
    rolled loop, which ptxas unrolled 4 ways, waited 8 round trips at 32 slices while the rest of the GPU
    sat idle)."""
    acc = tl.zeros(ws_offs.shape, dtype=tl.float32)
    for first in range(0, SPLIT_K, TOGETHER):
        for slot in tl.static_range(TOGETHER):
            split = tl.full(ws_offs.shape, first + slot, tl.int32)
            acc += tl.load(ws_ptr + split * slice_stride + ws_offs, mask=mask & (split < SPLIT_K), other=0.0,
                           cache_modifier=".cg")
    return acc


@triton.jit(do_not_specialize=["SPLIT_K"])
def _decode_kernel(x_ptr, qw_ptr, sq_ptr, ss_ptr, bq_ptr, bs_ptr, v_ptr, vi_ptr, bias_ptr, out_ptr,
                   ws_ptr, counter_ptr, rows_ptr, experts_ptr, lut_ptr, slots_ptr, M, N, K, stride_xm, stride_om,
                   ROWS_PER_INPUT,
                   TABLES, PAIRS, SPLIT_K,
                   BITS: tl.constexpr, RANK: tl.constexpr, RANKS: tl.constexpr, GROUP: tl.constexpr,
                   HAS_BIAS: tl.constexpr,
                   SELECT: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   REDUCE_K: tl.constexpr = False, PREFETCH: tl.constexpr = False, GROUPED: tl.constexpr = False,
                   LUT: tl.constexpr = False, PDL: tl.constexpr = False, BOOK: tl.constexpr = False,
                   INT8: tl.constexpr = False, BYTE_BOOK: tl.constexpr = False, ASM: tl.constexpr = False,
                   PREPARED: tl.constexpr = False, STAGES: tl.constexpr = None):
    """Skinny product for M <= BLOCK_M <= 64: program (n tile, k slice) reduces its slice of groups.
    SPLIT_K, the number of slices, is a run-time argument (one build serves every split), so that the
    autotuner tries many splits for the price of their timings (DECODE_CONFIGS).
    The FMA form (BLOCK_M < 16) keeps every product of a tile in registers and reduces over K once,
    after the loop; REDUCE_K reduces each tile's products in the loop instead (more adds, far fewer
    registers: sm_90 W2 r1, 128 columns per 4 warps, 163 -> 93). PREFETCH (1 or 2) loads the words, codes
    and activations of the tile that many ahead before multiplying this one, which Triton's pipeliner does
    not do for loads that do not feed tl.dot (see DECODE_CONFIGS). STAGES (the byte forms' configs): the loop's
    tl.range num_stages, with which the pipeliner does copy the words of tiles ahead into shared memory; PREFETCH
    then carries the codes and activations only.
    GROUPED (a mixture's experts, experts.py): the layer's tensors are every expert's, stacked, and
    program (n tile, k slice, block) multiplies the BLOCK_M rows rows_ptr lists for the block (-1: none)
    by the weights of the expert experts_ptr names for it (-1: none, the program only arrives); row r
    reads input row r // ROWS_PER_INPUT. M is then the number of rows, TABLES the V tables per expert.
    LUT (2 bits, one row): the products come from the row's pair table at lut_ptr (_pair_table_kernel, PAIRS
    pairs per V table) instead of dequantized weights (sm_90: 3.6 instructions per weight at rank 1, against
    6.9 for the FMA form).
    BOOK (3-4 bits, and 2 bits from 16 rows): the weights from each column's codebook entries, built once a
    tile (_tile_weights).
    INT8 (1-2 rows): products of bytes, the inputs of each index word and each column's codebook
    entries scaled to bytes (_int8_products); ASM: through PTX prmt and dp4a (CUDA), else their emulation (the
    interpreter).
    BYTE_BOOK (tiles of 16 or 32 rows, fp16 or bf16): each column's codebook in bytes (_int8_book), its codes made
    fp16 or bf16 values (_book_weights, with byte_slots() at slots_ptr) and multiplied by the inputs as they are
    through tl.dot with the weights first (on sm_90 a wgmma whose weights stay in registers), each column's step
    and midrange applied after the product.
    PDL (dependent_launch.py; not with GROUPED, whose rows come from earlier kernels): the words and codes of
    the tiles PREFETCH loads first are requested before the wait for the kernels that wrote x."""
    tl.static_assert(not (PDL and GROUPED))
    tl.static_assert(not INT8 or (BLOCK_M < 16 and not LUT and not BOOK))
    tl.static_assert(not PREPARED or INT8)
    tl.static_assert(not BYTE_BOOK or (BLOCK_M >= 16 and not INT8 and not LUT and not BOOK))
    FP32_INPUTS: tl.constexpr = BLOCK_M == 1 or INT8  # converted as they are loaded (_tile_inputs)
    PICKS: tl.constexpr = INT8 or BYTE_BOOK  # weights' codebook bytes picked by prmt (_picked_bytes)
    SELECTOR_ORDER: tl.constexpr = INT8 and BITS != 4
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    tiles = tl.cdiv(K, GROUP) * (GROUP // BLOCK_K)
    if GROUPED:
        block = tl.program_id(2)
        expert = tl.load(experts_ptr + block)
        rows = tl.load(rows_ptr + block * BLOCK_M + offs_m)
        m_mask = rows >= 0
        x_rows = rows // ROWS_PER_INPUT
        counter = block * tl.num_programs(0) + pid_n
        live = expert >= 0
        at = tl.maximum(expert, 0).to(tl.int64)  # each tensor holds the experts one after another
        groups = tl.cdiv(K, GROUP)
        qw_ptr += at * (groups * GROUP // 32 * BITS) * N
        sq_ptr += at * groups * RANK * N
        ss_ptr += at * RANK * N
        bq_ptr += at * groups * N
        bs_ptr += at * N
        v_ptr += at * TABLES * (RANKS << BITS)
        vi_ptr += at * N
        bias_ptr += at * N
    else:
        rows = offs_m
        m_mask = offs_m < M
        x_rows = offs_m
        counter = pid_n
        live = pid_n >= 0
    v_base = _table_offsets(vi_ptr, offs_n, n_mask, BITS, RANKS)
    lut_base = tl.load(vi_ptr + offs_n, mask=n_mask, other=0) * (PAIRS * 16 * RANKS)
    per_split = tl.cdiv(tiles, SPLIT_K)
    start = pid_k * per_split
    end = tl.where(live, tl.minimum(start + per_split, tiles), start)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if BYTE_BOOK:
        slots = tl.load(slots_ptr + tl.arange(0, 4))
        # what _book_weights' values are more than the codes: 1024 + 128 in fp16, none in bf16
        RAW: tl.constexpr = 1152 if x_ptr.dtype.element_ty == tl.float16 else 0
    TILE_SUMS: tl.constexpr = BLOCK_M >= 16 or REDUCE_K or LUT or INT8  # else products summed after the loop
    products = tl.zeros((BLOCK_M, 1 if TILE_SUMS else BLOCK_K, BLOCK_N), dtype=tl.float32)
    # STAGES: Triton's pipeliner copies the words of tiles ahead into shared memory (cp.async), so PREFETCH carries
    # only the codes and activations in registers
    CARRIED_WORDS: tl.constexpr = PREFETCH and STAGES is None
    if PREFETCH:  # PREFETCH tiles ahead (1 or 2): their loads are in flight while this one is multiplied
        first = offs_n < tl.where(start < end, N, 0)  # an empty slice loads nothing
        if CARRIED_WORDS:
            words, top_words = _tile_words(qw_ptr, start * BLOCK_K, offs_n, first, N, BITS, BLOCK_K, PICKS)
        s_codes, b_codes = _group_codes(sq_ptr, bq_ptr, start * BLOCK_K, offs_n, first, N, RANK, GROUP)
    if PREFETCH == 2:
        second = offs_n < tl.where(start + 1 < end, N, 0)
        if CARRIED_WORDS:
            words_2, top_words_2 = _tile_words(qw_ptr, (start + 1) * BLOCK_K, offs_n, second, N, BITS, BLOCK_K,
                                                 PICKS)
        s_codes_2, b_codes_2 = _group_codes(sq_ptr, bq_ptr, (start + 1) * BLOCK_K, offs_n, second, N, RANK, GROUP)
    wait_for_earlier_kernels(PDL)  # x, and the pair table, are earlier kernels' outputs
    if PREFETCH:
        inputs = _tile_inputs(x_ptr, lut_ptr, x_rows, m_mask, stride_xm, start * BLOCK_K, K, PAIRS, LUT, BLOCK_K,
                              FP32_INPUTS, SELECTOR_ORDER, PREPARED)
    if PREFETCH == 2:
        inputs_2 = _tile_inputs(x_ptr, lut_ptr, x_rows, m_mask, stride_xm, (start + 1) * BLOCK_K, K, PAIRS, LUT,
                                BLOCK_K, FP32_INPUTS, SELECTOR_ORDER, PREPARED)
    AHEAD: tl.constexpr = 2 if PREFETCH == 2 else 1
    for tile in tl.range(start, end, num_stages=STAGES):
        k0 = tile * BLOCK_K
        if PREFETCH:
            ahead = k0 + AHEAD * BLOCK_K
            following = offs_n < tl.where(tile + AHEAD < end, N, 0)
            if CARRIED_WORDS:
                next_words, next_top_words = _tile_words(qw_ptr, ahead, offs_n, following, N, BITS, BLOCK_K, PICKS)
            next_s_codes, next_b_codes = _group_codes(sq_ptr, bq_ptr, ahead, offs_n, following, N, RANK, GROUP)
            next_inputs = _tile_inputs(x_ptr, lut_ptr, x_rows, m_mask, stride_xm, ahead, K, PAIRS, LUT, BLOCK_K,
                                       FP32_INPUTS, SELECTOR_ORDER, PREPARED)
        if not CARRIED_WORDS:
            words, top_words = _tile_words(qw_ptr, k0, offs_n, n_mask, N, BITS, BLOCK_K, PICKS)
        if not PREFETCH:
            s_codes, b_codes = _group_codes(sq_ptr, bq_ptr, k0, offs_n, n_mask, N, RANK, GROUP)
            inputs = _tile_inputs(x_ptr, lut_ptr, x_rows, m_mask, stride_xm, k0, K, PAIRS, LUT, BLOCK_K, FP32_INPUTS,
                                  SELECTOR_ORDER, PREPARED)
        if LUT:
            scaled, b = _lut_products(words, s_codes, b_codes, lut_ptr + PAIRS // 16, lut_base, k0, ss_ptr, bs_ptr,
                                      offs_n, n_mask, N, RANK, RANKS, BLOCK_K, BLOCK_N)
            acc += scaled[None, :] - inputs * b[None, :]
        elif INT8:
            books, steps, midranges = _int8_book(s_codes, b_codes, ss_ptr, bs_ptr, v_ptr, v_base, offs_n, n_mask, N,
                                                 BITS, RANK, RANKS, BLOCK_N)
            acc += _int8_products(words, top_words, books, steps, midranges, inputs, BITS, ASM, BLOCK_M, BLOCK_K,
                                  BLOCK_N, PREPARED)
        elif BYTE_BOOK:
            books, steps, midranges = _int8_book(s_codes, b_codes, ss_ptr, bs_ptr, v_ptr, v_base, offs_n, n_mask, N,
                                                 BITS, RANK, RANKS, BLOCK_N, 128)
            w = _book_weights(words, top_words, books, slots, BITS, x_ptr.dtype.element_ty, ASM, BLOCK_K, BLOCK_N)
            x = tl.trans(_in_selector_order(inputs, BITS, BLOCK_M, BLOCK_K))
            if DOT_IN_FP32:
                raw = tl.dot(w.to(tl.float32), x.to(tl.float32))
            else:
                raw = tl.dot(w, x)
            sums = tl.sum(inputs.to(tl.float32), axis=1)
            acc += tl.trans(raw) * steps[None, :] + sums[:, None] * (midranges - RAW * steps)[None, :]
        else:
            q = _tile_indices(words, top_words, BITS, BLOCK_K, BLOCK_N)
            w = _tile_weights(q, s_codes, b_codes, ss_ptr, bs_ptr, v_ptr, v_base, offs_n, n_mask, N,
                              BITS, RANK, RANKS, SELECT, BOOK, BLOCK_K, BLOCK_N)
            if BLOCK_M >= 16:
                acc = _dot(inputs, w, acc, DOT_IN_FP32)
            elif REDUCE_K:
                acc += tl.sum(inputs.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
            else:
                products += inputs.to(tl.float32)[:, :, None] * w[None, :, :]
        if PREFETCH == 2:
            if CARRIED_WORDS:
                words, top_words, words_2, top_words_2 = words_2, top_words_2, next_words, next_top_words
            s_codes, b_codes, inputs = s_codes_2, b_codes_2, inputs_2
            s_codes_2, b_codes_2, inputs_2 = next_s_codes, next_b_codes, next_inputs
        elif PREFETCH:
            if CARRIED_WORDS:
                words, top_words = next_words, next_top_words
            s_codes, b_codes, inputs = next_s_codes, next_b_codes, next_inputs
    if not TILE_SUMS:
        acc = tl.sum(products, axis=1)
    out_offs = rows[:, None] * stride_om + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        ws_offs = rows[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k * M * N + ws_offs, acc, mask=out_mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + counter, 1)  # acq_rel: our partial is visible to the last one
        if arrived == SPLIT_K - 1:
            acc = _sum_of_partials(ws_ptr, ws_offs, out_mask, M * N, SPLIT_K, 16 if BLOCK_M < 16 else 4)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :]
            tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
            # ready for the next launch; relaxed: nothing waits on our stores to land first (a later kernel
            # reads this one's output only once it has finished)
            tl.atomic_xchg(counter_ptr + counter, 0, sem="relaxed")
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, sq_ptr, ss_ptr, bq_ptr, bs_ptr, v_ptr, vi_ptr, bias_ptr, out_ptr,
                 M, N, K, stride_xm, stride_om, M_BUCKET,
                 BITS: tl.constexpr, RANK: tl.constexpr, RANKS: tl.constexpr, GROUP: tl.constexpr,
                   HAS_BIAS: tl.constexpr,
                 SELECT: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Tiled product (dispatched for no row count, DENSE_MIN_M: the fused alternative bench/kernels.py times from 65
    rows as fused_us): each program dequantizes its weight tiles once per BLOCK_M rows, each weight from
    its column's codebook (BOOK), a warp shuffle: at 3-4 bits per weight a gather of V had been pipelined as 4-byte
    cp.async copies (70 a loop at 64 x 128 W4 r2, sm_90 Triton 3.6; 6 now), and sm_90 SASS counts 12.8 -> 9.9
    instructions per weight there, 12.0 -> 7.1 at W2 r2 against the selects (bench/kernels.py --sass)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_band = GROUP_M * tiles_n  # neighbouring programs share weight tiles in L2
    band = pid // per_band
    first_m = band * GROUP_M
    band_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_band) % band_m
    pid_n = (pid % per_band) // band_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    v_base = _table_offsets(vi_ptr, offs_n, n_mask, BITS, RANKS)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, GROUP) * GROUP, BLOCK_K):
        k_idx = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k_idx[None, :],
                    mask=m_mask[:, None] & (k_idx[None, :] < K), other=0.0)
        w = _dequant_tile(qw_ptr, sq_ptr, ss_ptr, bq_ptr, bs_ptr, v_ptr, v_base, k0, offs_n, n_mask, N,
                          BITS, RANK, RANKS, GROUP, SELECT, BLOCK_K, BLOCK_N, True)
        acc = _dot(x, w, acc, DOT_IN_FP32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=out_mask)


@triton.jit
def _dequant_kernel(qw_ptr, sq_ptr, ss_ptr, bq_ptr, bs_ptr, v_ptr, vi_ptr, out_ptr, N, K, first_n, end_n,
                    stride_out, BITS: tl.constexpr, RANK: tl.constexpr, RANKS: tl.constexpr, GROUP: tl.constexpr,
                    SELECT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns first_n .. end_n - 1 of W^T (K, N) in out_ptr's dtype, rows stride_out apart (column first_n at
    out_ptr), one (BLOCK_K, BLOCK_N) tile per program: stores run along N. At 3-4 bits from each column's codebook
    (BOOK): sm_90 SASS, Triton 3.6, r2 g128, 13.1 and 10.4 instructions per weight against the V gathers' 16.9 and
    12.8 (bench/kernels.py --sass); at 2 bits the selects (8.9)."""
    offs_n = first_n + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < end_n
    k0 = tl.program_id(0) * BLOCK_K
    k_idx = k0 + tl.arange(0, BLOCK_K)
    v_base = _table_offsets(vi_ptr, offs_n, n_mask, BITS, RANKS)
    w = _dequant_tile(qw_ptr, sq_ptr, ss_ptr, bq_ptr, bs_ptr, v_ptr, v_base, k0, offs_n, n_mask, N,
                      BITS, RANK, RANKS, GROUP, SELECT, BLOCK_K, BLOCK_N, not SELECT)
    tl.store(out_ptr + k_idx[:, None] * stride_out + (offs_n - first_n)[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(k_idx[:, None] < K) & n_mask[None, :])


# Decode tiles, from two H200 runs of 2026-12-04 (bench/results/kernels-nvidia-h200.json, docs/kernels.md):
# - 64 columns per 2 warps and 128 per 4 (the H100's --explore: 256 per 8 warps never won).
# - Splits 8 to 64 at 1-2 rows. ncu of the 8-way split at one row (4096x11008 W2 r2, 128 columns, 167
#   registers) saw 0.65 waves, 12% achieved occupancy, issue slots 32% busy and DRAM at 8% of its peak; yet
#   with more slices the autotuner still chose 8 or 16 at W2 (32 once, W4 r1): occupancy alone was not it.
# - REDUCE_K (sum each tile over K in the loop: 93 registers instead of 167) and PREFETCH (the next tile's
#   words and codes loaded while this one is multiplied; Triton's pipeliner moves only loads that feed
#   tl.dot unless a loop asks, STAGES below) each way: REDUCE_K won 7 of the 8 one-row cases, PREFETCH 7 of them
#   and 21 of 24 tl.dot rows.
#   PREFETCH 2 loads two tiles ahead (9 registers more, sm_90): on the H200 it was not chosen and changed no
#   time. PREFETCH now loads each tile's activations ahead too: the sm_90 loop issued the tile's x load and
#   stored it to shared memory a few barriers later, so every tile waited for it (not yet timed).
# - Tiles 128 deep at 2 bits (REDUCE_K only: otherwise the products spill): each column's 4 codebook
#   entries are built once per tile, so deeper tiles spend fewer instructions per weight (sm_90, Triton
#   3.6, W2 r2, 64 columns per 2 warps: 7.0 against 10.4). The autotuner chose them for every 2-bit shape
#   at one row: 23.0-23.3 us, where the first call's best 64-deep tiles took 27.6-28.4 and its 128-deep
#   ones (without PREFETCH, 8 slices) 24.4-28.3. At 3-4 bits their gathers take 197-255 registers.
# - One stage for the tl.dot rows (16-64): with two, Triton 3.6 pipelines the V gather that feeds the dot
#   as 4-byte cp.async copies (64 LDGSTS per W4 tile in the sm_90 SASS): W4 r1 at 16 rows took 253 us,
#   with one stage 45 us. One stage won every tl.dot row of the run, 2-bit rows too.
# - ncu of the chosen one-row tile (4096x11008 W2 r2: 128 columns per 4 warps, 128 deep, REDUCE_K, PREFETCH,
#   8 slices; H200, 2026-12-04, a later session): 256 programs, 7.1 warps per SM (24 would fit), each
#   scheduler issuing every 1.8 cycles with 0.75 warps eligible, 7.3 instructions per weight (6.1 now in the
#   sm_90 SASS: _tile_inputs). More warps for the same weights cost instructions (sm_90 SASS: 64 columns per
#   4 warps, 8.9 per weight at 128 deep, 21 at 64; 128 per 8 warps, 14.6 and 237 registers), so the list
#   stays as it was.
# - BOOK (not timed yet): each column's codebook built once a tile, then a warp shuffle per weight
#   (_tile_weights), with the settings that won most of the rows above (FMA rows, 3-4 bits: REDUCE_K and
#   PREFETCH; tl.dot rows, every width: PREFETCH, one stage).
# A config's BLOCK_K is the deepest it takes, shallower where the group or the bit width asks.
FMA_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": depth, "SPLIT_K": split, "REDUCE_K": reduce_k, "PREFETCH": prefetch},
                  num_warps=warps, num_stages=2)
    for bn, warps in ((64, 2), (128, 4)) for reduce_k, depth in ((False, 64), (True, 64), (True, 128))
    for prefetch in (False, True, 2) for split in (8, 16, 32, 64)] + [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": 64, "SPLIT_K": split, "REDUCE_K": True, "PREFETCH": True, "BOOK": True},
                  num_warps=warps, num_stages=2)
    for bn, warps in ((64, 2), (128, 4)) for split in (8, 16, 32, 64)]
DOT_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": 64, "SPLIT_K": split, "REDUCE_K": False, "PREFETCH": prefetch},
                  num_warps=4, num_stages=stages)
    for bn in (64, 128) for prefetch in (False, True, 2) for stages in (1, 2) for split in (4, 8, 16)] + [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": 64, "SPLIT_K": split, "REDUCE_K": False, "PREFETCH": True, "BOOK": True},
                  num_warps=4, num_stages=1)
    for bn in (64, 128) for split in (4, 8, 16)]
# The pair table at one row (LUT, 2 bits): 64, 128 or 256 columns per 2, 4 or 8 warps, tiles 64 or 128 deep,
# PREFETCH none, one or two tiles ahead, split 8 to 32. H200 (bench/results/kernels-pair-table-nvidia-h200.json,
# with one tile ahead at most): with its table's kernel 0.2-2.7 us faster than the FMA form at rank 1, slower
# at ranks 2 (by 1.6-6.5 us) and 4, so decode() times both (lut_wins).
LUT_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": depth, "SPLIT_K": split, "REDUCE_K": False, "PREFETCH": prefetch},
                  num_warps=warps, num_stages=2)
    for bn, warps in ((64, 2), (128, 4), (256, 8)) for depth in (64, 128) for prefetch in (False, True, 2)
    for split in (8, 16, 32)]
# Products of bytes (INT8: 2 and 4 bits, 1-2 rows; each tile is summed in the loop, so REDUCE_K), not yet timed.
# sm_90 SASS (Triton 3.6, g128, one row, 128 deep, PREFETCH, bench/kernels.py --sass), instructions per weight:
# W2 r2 128 columns per 4 warps 3.1, 256 per 2 warps 2.2, 512 per 4 warps 2.1 (255 registers; 168 without
# PREFETCH), against 6.1 for the fp32 form's chosen tile: the wider tiles keep a column's words in one thread,
# so that the sum over them needs no shuffles, and spread the inputs' conversion over more weights. W4 r2, its
# 16-entry codebooks built once a tile: 64 columns per 2 warps 5.3, 128 per 4 warps 5.2 (168 registers), 64
# deep 6.6, against 8.2 for the fp32 form with column codebooks (BOOK); wider tiles spill there, so at 4 bits
# a thread takes one column (_decode_configs_for).
# STAGES 3 (2026-12-06, not yet timed): Triton's pipeliner copies the next two tiles' words into shared memory
# (cp.async, 16 bytes a thread a copy) while this one is multiplied, where without it a program loaded each tile
# when it came to it and waited (the H100's autotuner chose no PREFETCH for every shape of the products of bytes:
# it carries the words in registers); PREFETCH then carries only the codes and activations. sm_90 SASS (Triton 3.6):
# up to 8% fewer instructions in the loop, as many registers or fewer, 16 bytes spilled by some of the widest tiles.
INT8_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": 128, "SPLIT_K": split, "REDUCE_K": True, "PREFETCH": prefetch,
                   **({"STAGES": stages} if stages else {})}, num_warps=warps, num_stages=2)
    for bn, warps in ((64, 2), (128, 4), (256, 2), (512, 4)) for prefetch in (False, True) for stages in (None, 3)
    for split in (8, 16, 32, 64)]
# Weights from byte codebooks (BYTE_BOOK: 1-32 rows, fp16 or bf16), not yet timed. sm_90 SASS (Triton 3.6, r2 g128,
# 128 deep, PREFETCH, bench/kernels.py --sass), instructions per weight, 128 columns per 4 warps: 16 rows W2 4.3 (4.0
# without PREFETCH, 3.9 with 256 columns per 8 warps), W3 6.4, W4 6.6; 32 rows W2 5.2, W4 7.5; against 8.1 (W2)
# and 10.6 (W4) for the tl.dot form's column codebooks (BOOK) at 16 rows. 64 rows spill at 128 columns per 4 warps
# and take 7.0-8.5 (W2) otherwise, the inputs' sums and each tile's steps applied to 64 x 128 outputs.
# STAGES 3 as for the products of bytes (not yet timed; sm_90 SASS, Triton 3.6: only 16-byte copies, no gathers,
# registers within 8 of before).
BYTE_BOOK_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": 128, "SPLIT_K": split, "REDUCE_K": False, "PREFETCH": prefetch,
                   **({"STAGES": stages} if stages else {})}, num_warps=warps, num_stages=1)
    for bn, warps in ((64, 4), (128, 4), (256, 8)) for prefetch in (False, True) for stages in (None, 3)
    for split in (2, 4, 8, 16)]
DECODE_CONFIGS = FMA_DECODE_CONFIGS + DOT_DECODE_CONFIGS + LUT_DECODE_CONFIGS + INT8_DECODE_CONFIGS \
    + BYTE_BOOK_DECODE_CONFIGS
FMA_MAX_SPLIT_K = 64  # its workspace: 64 slices x 2 rows x N fp32


def max_split_k(block_m: int, grouped: bool = False) -> int:
    """Most K slices a decode launch may use: its fp32 workspace holds slices x rows x N partial sums."""
    return FMA_MAX_SPLIT_K if block_m < 16 and not grouped else MAX_SPLIT_K


def _decode_configs_for(configs: list, named_args: dict, **kwargs) -> list:
    """The autotuner's early prune: the configs of products of bytes for INT8 (at 4 bits those giving a thread
    one column: INT8_DECODE_CONFIGS), the pair table's for LUT, weights from byte codebooks' for BYTE_BOOK, else
    the FMA form's for 1-2 rows and the tl.dot form's from 16, no more slices than the workspace holds, column
    codebooks (BOOK) at 2 bits only for tl.dot (at 1-2 rows the selects of 128-deep tiles cost fewer
    instructions: 6.1 against 7.3 per weight, sm_90), and each tile no deeper than the group and the bit width
    allow (configs that then coincide are timed once)."""
    form = INT8_DECODE_CONFIGS if kwargs.get("INT8") else LUT_DECODE_CONFIGS if kwargs.get("LUT") \
        else BYTE_BOOK_DECODE_CONFIGS if kwargs.get("BYTE_BOOK") \
        else FMA_DECODE_CONFIGS if kwargs["BLOCK_M"] < 16 else DOT_DECODE_CONFIGS
    most = max_split_k(kwargs["BLOCK_M"], kwargs.get("GROUPED", False))
    fallback = block_k(kwargs["GROUP"])
    deepest = 128 if kwargs["SELECT"] or kwargs.get("INT8") or kwargs.get("BYTE_BOOK") else 64
    kept: dict[tuple, triton.Config] = {}
    for c in configs:
        selected_instead = c.kwargs.get("BOOK") and kwargs["SELECT"] and form is FMA_DECODE_CONFIGS
        spills = form is INT8_DECODE_CONFIGS and not kwargs["SELECT"] and c.kwargs["BLOCK_N"] > 32 * c.num_warps
        if any(c is f for f in form) and c.kwargs["SPLIT_K"] <= most and not selected_instead and not spills:
            depth = c.kwargs["BLOCK_K"]
            depth = depth if depth <= deepest and kwargs["GROUP"] % depth == 0 else fallback
            params = {**c.kwargs, "BLOCK_K": depth}
            kept.setdefault((tuple(sorted(params.items())), c.num_warps, c.num_stages),
                            triton.Config(params, num_warps=c.num_warps, num_stages=c.num_stages))
    return list(kept.values())


GEMM_CONFIGS = [  # one stage too (not timed yet): the decode configs' gathers were slow pipelined
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3), (128, 256, 8, 3),
                         (256, 128, 8, 3), (64, 128, 4, 1), (128, 128, 8, 1)]
]
_KEY = ["N", "K", "BITS", "RANK", "GROUP"]
DEQUANT_BLOCK_N = 128
# Under TRITON_INTERPRET=1 (CPU tensors) autotuning cannot time anything: fixed small tiles.
INTERPRETER_DECODE_CONFIG = {"BLOCK_N": 32, "SPLIT_K": 2, "PREFETCH": True}
INTERPRETER_GEMM_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4}
# Configs are timed as the engine runs them (graph_time: no launch overhead, weights cold in L2):
# timed with launches, a product shorter than its launch (a small layer, or a 2-bit layer at the
# bandwidth limit: ~2 us for 4096x4096) would be timed as the launch and the choice would be noise.
# Timings are kept on disk (Triton >= 3.4, in TRITON_CACHE_DIR, keyed on the kernel source, the GPU
# architecture and the tuning key), so a restarted server skips the tuning of its warm-up.
_KEEP_TIMINGS = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
_decode_tuned = triton.autotune(DECODE_CONFIGS,
                                key=_KEY + ["BLOCK_M", "GROUPED", "LUT", "INT8", "BYTE_BOOK", "PREPARED"],
                                do_bench=graph_time,
                                prune_configs_by={"early_config_prune": _decode_configs_for},
                                **_KEEP_TIMINGS)(_decode_kernel)
# A mixture's rows past DECODE_MAX_M (prefill, large batches): enough blocks to fill the GPU without
# splitting K, whose fp32 workspace would grow with rows x columns x slices. Not yet timed on a GPU.
GROUPED_WIDE_CONFIGS = [triton.Config({"BLOCK_N": bn, "SPLIT_K": 1}, num_warps=w, num_stages=s)
                        for bn, w, s in [(64, 4, 2), (128, 4, 2), (128, 4, 3), (128, 8, 3)]]
_grouped_wide_tuned = triton.autotune(GROUPED_WIDE_CONFIGS, key=_KEY + ["BLOCK_M", "INT8", "BYTE_BOOK"],
                                      do_bench=graph_time,
                                      **_KEEP_TIMINGS)(_decode_kernel)
_gemm_tuned = triton.autotune(GEMM_CONFIGS, key=_KEY + ["M_BUCKET"], do_bench=graph_time, **_KEEP_TIMINGS)(_gemm_kernel)


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


def decode_block_m(m: int) -> int:
    """M bucket of the decode kernel: 1 and 2 rows reduce with FMAs, 3 to 64 rows through tl.dot in
    tiles of 16, 32 or 64 rows (from 4 rows on, the FMA form's BLOCK_M x BLOCK_K x BLOCK_N products
    spill registers)."""
    return m if m <= 2 else max(16, triton.next_power_of_2(m))


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


def _layer_args(layer: PackedLinear) -> tuple:
    bias = layer.bias if layer.bias is not None else layer.b_scale  # unread when HAS_BIAS is false
    return (layer.qweight, layer.s_q, layer.s_scale, layer.b_q, layer.b_scale, _gather_table(layer), layer.v_index,
            bias)


def _codebook_constants(layer: PackedLinear) -> dict:
    return dict(BITS=layer.bits, RANK=layer.rank, RANKS=triton.next_power_of_2(layer.rank), GROUP=layer.group_size,
                SELECT=uses_select(layer.bits), BLOCK_K=block_k(layer.group_size))


def _without_depth(consts: dict) -> dict:
    """The decode autotuner's configs carry their tile depth (BLOCK_K)."""
    return {name: value for name, value in consts.items() if name != "BLOCK_K"}


def _constants(x: torch.Tensor, layer: PackedLinear) -> dict:
    return dict(_codebook_constants(layer), HAS_BIAS=layer.bias is not None,
                DOT_IN_FP32=not x.is_cuda and x.dtype == torch.bfloat16)


# Where the byte forms serve by default, as (bits, activation dtype): what a GPU has checked compiled against each
# form's reference (an H100, 2026-12-05): products of bytes at 2 and 3 bits (the inputs' dtype matters only to their
# load), byte codebooks at 2 bits of fp16 inputs; not fp32 models, which ask for exact products. Elsewhere their PTX
# ran only in CI's compile-only tests, so LCQ_INT8_DECODE=1 / LCQ_BYTE_BOOK=1 ask for them; =0 turns them off.
INT8_DEFAULT = {(bits, dtype) for bits in (2, 3) for dtype in (torch.float16, torch.bfloat16)}
BYTE_BOOK_DEFAULT = {(2, torch.float16)}


def _asked(switch: str, default: bool) -> bool:
    value = os.environ.get(switch, "")
    return value == "1" or (value != "0" and default)


def int8_decode(x: torch.Tensor, block_m: int, bits: int) -> bool:
    """Whether a launch of block_m rows of a bits-wide layer on CUDA takes products of bytes (_int8_products): at
    1-2 rows a program (a decode step's, or a mixture's blocks of 1-2 rows of one expert), by default for
    INT8_DEFAULT. They change the numbers (the inputs of each index word and each column's codebook rounded to
    8 bits), as activation-quantized GEMV kernels (llama.cpp's q8_1 rows) do, at no measured cost in perplexity; on
    an H100 the 7B W2 model decoded 327 tokens/s at batch 1 with them, 245 without (docs/kernels.md)."""
    return x.is_cuda and block_m <= 2 and _asked("LCQ_INT8_DECODE", (bits, x.dtype) in INT8_DEFAULT)


BYTE_BOOK_DTYPES = (torch.float16, torch.bfloat16)
BYTE_BOOK_MAX_M = 32  # at 64 rows the inputs' sums and the steps applied per tile cost as much as the dot form
# (7.0-8.5 instructions per weight, sm_90)
_byte_slots: dict[torch.device, torch.Tensor] = {}


def byte_slots(device: torch.device) -> torch.Tensor:
    """The slots of _book_weights, int32 (4,) on device, once per device: slot j's low byte holds the prmt
    selector nibbles (j, j), its next byte (j + 4, j + 4)."""
    slots = _byte_slots.get(device)
    if slots is None:
        position = torch.arange(4, dtype=torch.int32, device=device)  # a kernel, not a host copy: capturable
        slots = _byte_slots[device] = position * 0x11 | (position + 4) * 0x1100
    return slots


def byte_book_decode(x: torch.Tensor, block_m: int, bits: int) -> bool:
    """Whether a launch on CUDA whose rows fill tiles of block_m takes its weights from byte codebooks
    (_book_weights): up to BYTE_BOOK_MAX_M rows of fp16 or bf16 (1 and 2 rows in tiles of 16 where products of
    bytes do not serve; a mixture's blocks of 16 or 32), by default for BYTE_BOOK_DEFAULT. The weights then differ
    from the exact ones by their codebooks' rounding to bytes (byte_products.byte_book_weights), the same at every
    batch size it serves. sm_90 SASS, W2 r2 g128, 16 rows: 4.0 instructions per weight against 8.1 for the tl.dot
    form; on an H100 the 7B W2 model decoded 1,639 tokens/s at 8 sequences with them, 1,489 without
    (docs/kernels.md)."""
    return x.is_cuda and block_m <= BYTE_BOOK_MAX_M and x.dtype in BYTE_BOOK_DTYPES \
        and _asked("LCQ_BYTE_BOOK", (bits, x.dtype) in BYTE_BOOK_DEFAULT)


def byte_book_block_m(m: int) -> int:
    """Tile of rows of a launch from byte codebooks: the tl.dot form's (decode_block_m), 16 for 1-2 rows too."""
    return max(16, decode_block_m(m))


def _check_byte_book(x: torch.Tensor, block_m: int) -> None:
    if block_m < 16 or x.dtype not in BYTE_BOOK_DTYPES:
        raise ValueError(f"weights from byte codebooks serve tiles of 16 rows or more of fp16 or bf16 inputs, not "
                         f"{block_m} rows of {x.dtype}")


def decode(x: torch.Tensor, layer: PackedLinear, config: dict | None = None, lut: bool | None = None,
           int8: bool | None = None, byte_book: bool | None = None, prepared: bool | None = None) -> torch.Tensor:
    """x (M, K) with M <= 64, contiguous rows -> (M, N). config skips autotuning: BLOCK_N and
    SPLIT_K, optionally BLOCK_M, BLOCK_K (dividing the group), REDUCE_K, PREFETCH, STAGES, num_warps and
    num_stages. lut: products from the activation-side pair table (one row at 2 bits) or not; by default
    where it was timed faster for the shape (lut_wins), autotuned on CUDA. int8: products of bytes (1-2 rows; by
    default int8_decode). byte_book: weights from byte codebooks (fp16 or bf16; by default byte_book_decode, but
    not where int8 or lut is asked for). prepared: with int8, the inputs rounded to bytes once by a kernel of their
    own (input_bytes), not in every program; by default where LCQ_INT8_INPUTS=1."""
    m, k = x.shape
    n = layer.out_features
    if int8 is None:
        int8 = int8_decode(x, decode_block_m(m), layer.bits)
    if byte_book is None:
        byte_book = not (int8 or lut) and byte_book_decode(x, byte_book_block_m(m), layer.bits)
    block_m = byte_book_block_m(m) if byte_book else decode_block_m(m)
    if byte_book:
        _check_byte_book(x, block_m)
    if lut is None:
        lut = not (int8 or byte_book) and x.is_cuda and config is None and m == 1 and layer.bits == 2 \
            and lut_wins(x, layer)
    if lut and (m != 1 or layer.bits != 2):
        raise ValueError(f"the pair table serves one row of a 2-bit layer, not {m} rows at {layer.bits} bits")
    if int8 and (m > 2 or lut):
        raise ValueError(f"products of bytes serve 1-2 rows, not {m}" + (" with the pair table" if lut else ""))
    if byte_book and (int8 or lut):
        raise ValueError("weights from byte codebooks take neither products of bytes nor the pair table")
    if prepared is None:
        prepared = int8 and os.environ.get("LCQ_INT8_INPUTS") == "1"
    if prepared and not int8:
        raise ValueError("prepared inputs serve products of bytes only")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    ws = torch.empty(max_split_k(block_m), m, n, dtype=torch.float32, device=x.device)
    counters = arrival_counters(x.device, triton.cdiv(n, 16))
    pairs = triton.cdiv(k, layer.group_size) * layer.group_size // 2
    table = pair_table(x, layer, pairs) if lut else ws  # (unread without LUT)
    inputs = input_bytes(x, layer) if prepared else x
    args = (inputs, *_layer_args(layer), out, ws, counters, counters, counters, table, byte_slots(x.device), m, n, k,
            inputs.stride(0), out.stride(0),
            1, 0, pairs)
    consts = dict(_constants(x, layer), BLOCK_M=block_m, GROUPED=False, LUT=lut, INT8=int8,  # (in the tuning key)
                  BYTE_BOOK=byte_book, ASM=x.is_cuda, PREPARED=prepared, **dependent_launch(x))
    if config is None and not x.is_cuda:
        config = INTERPRETER_DECODE_CONFIG
    if config is None:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        _decode_tuned[grid](*args, **_without_depth(consts))
    else:
        launch = {**consts, **config}
        if layer.group_size % launch["BLOCK_K"] or launch["SPLIT_K"] > max_split_k(launch["BLOCK_M"]) \
                or launch["BLOCK_M"] < m:
            raise ValueError(f"decode config {config} does not fit M={m}, group size {layer.group_size}")
        _decode_kernel[(triton.cdiv(n, launch["BLOCK_N"]), launch["SPLIT_K"])](*args, **launch)
    return out


PAIR_TABLE_BLOCK = 64
INPUT_BYTES_RUNS = 64  # runs of inputs a program of _input_bytes_kernel rounds


def input_bytes(x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
    """x (M, K) as products of bytes of layer take it prepared (_input_bytes_kernel): int32 (M, K_pad / 2), K_pad
    the layer's groups' width."""
    m, k = x.shape
    padded = layer.num_groups * layer.group_size
    runs = padded // (8 if layer.bits == 4 else 16)
    out = torch.empty(m, padded // 2, dtype=torch.int32, device=x.device)
    _input_bytes_kernel[(m, triton.cdiv(runs, INPUT_BYTES_RUNS))](
        x, out, k, runs, x.stride(0), out.stride(0), BITS=layer.bits, BLOCK_RUNS=INPUT_BYTES_RUNS,
        **dependent_launch(x))
    return out


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


_lut_choices: dict[tuple, bool] = {}


def lut_wins(x: torch.Tensor, layer: PackedLinear) -> bool:
    """Whether the pair table (its kernel included) beats the FMA form for this one-row 2-bit product on
    this GPU: both autotuned and timed (graph_time) once per shape and dtype, on first use (the engine's
    warm-up, before its CUDA graphs are captured; a product first met inside a capture takes the FMA form),
    and remembered for the process."""
    key = (x.device, x.dtype, layer.out_features, layer.in_features, layer.rank, layer.group_size, layer.bias is None)
    if key not in _lut_choices:
        if torch.cuda.is_current_stream_capturing():  # nothing can be timed inside a capture: the FMA form
            return False
        direct = graph_time(lambda: decode(x, layer, lut=False))
        table = graph_time(lambda: decode(x, layer, lut=True))
        _lut_choices[key] = table < direct
    return _lut_choices[key]


def grouped_decode(x: torch.Tensor, experts: PackedExperts, routes: ExpertRoutes, rows_per_input: int,
                   config: dict | None = None, int8: bool | None = None,
                   byte_book: bool | None = None) -> torch.Tensor:
    """A mixture's routed rows (experts.expert_linear): x (T, K) or (T * k, K), contiguous rows ->
    (T * k, N), one launch over the routes' blocks. config (BLOCK_N, SPLIT_K, optionally REDUCE_K,
    PREFETCH, num_warps, num_stages) skips autotuning. int8: products of bytes (blocks of 1-2 rows; by default
    int8_decode). byte_book: weights from byte codebooks (blocks of 16 rows or more; by default
    byte_book_decode)."""
    count, k = routes.rows_count, x.shape[1]
    layer = experts.stacked
    n = layer.out_features
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(count, n, dtype=x.dtype, device=x.device)
    blocks = routes.experts.numel()
    wide = count > DECODE_MAX_M
    ws = torch.empty(1 if wide else MAX_SPLIT_K * count * n, dtype=torch.float32, device=x.device)
    counters = arrival_counters(x.device, 1 if wide else blocks * triton.cdiv(n, 16))
    args = (x, *_layer_args(layer), out, ws, counters, routes.rows, routes.experts, ws, byte_slots(x.device), count,
            n, k, x.stride(0),
            out.stride(0), rows_per_input, experts.tables, 0)
    if int8 is None:
        int8 = int8_decode(x, routes.block_m, layer.bits)
    if int8 and routes.block_m > 2:
        raise ValueError(f"products of bytes serve blocks of 1-2 rows, not {routes.block_m}")
    if byte_book is None:
        byte_book = not int8 and routes.block_m >= 16 and byte_book_decode(x, routes.block_m, layer.bits)
    if byte_book:
        _check_byte_book(x, routes.block_m)
    consts = dict(_constants(x, layer), BLOCK_M=routes.block_m, GROUPED=True, INT8=int8, BYTE_BOOK=byte_book,
                  ASM=x.is_cuda)
    if config is None and not x.is_cuda:
        config = INTERPRETER_DECODE_CONFIG
    if config is None:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], blocks)  # noqa: E731
        if wide:
            _grouped_wide_tuned[grid](*args, **consts)
        else:
            _decode_tuned[grid](*args, **_without_depth(consts))
    else:
        launch = {**consts, **config}
        if launch["SPLIT_K"] > (1 if wide else MAX_SPLIT_K):
            raise ValueError(f"grouped decode config {config} splits K more than {count} rows allow")
        _decode_kernel[(triton.cdiv(n, launch["BLOCK_N"]), launch["SPLIT_K"], blocks)](*args, **launch)
    return out


def gemm(x: torch.Tensor, layer: PackedLinear, config: dict | None = None) -> torch.Tensor:
    """x (M, K), contiguous rows -> (M, N). config (BLOCK_M, BLOCK_N, GROUP_M) skips autotuning."""
    m, k = x.shape
    n = layer.out_features
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    args = (x, *_layer_args(layer), out, m, n, k, x.stride(0), out.stride(0), min(triton.next_power_of_2(m), 1024))
    consts = _constants(x, layer)
    if config is None and not x.is_cuda:
        config = INTERPRETER_GEMM_CONFIG
    if config is None:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _gemm_tuned[grid](*args, **consts)
    else:
        grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
        _gemm_kernel[grid](*args, **consts, **config)
    return out


def dequantized_transpose(layer: PackedLinear, dtype: torch.dtype, device: torch.device,
                          columns: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """W^T (K, N) in dtype, written by the dequantize kernel; columns (first, end): only those, (K, end - first),
    written into out (rows of any stride, columns contiguous) where given."""
    k, n = layer.in_features, layer.out_features
    first, end = columns or (0, n)
    if out is None:
        out = torch.empty(k, end - first, dtype=dtype, device=device)
    if out.shape != (k, end - first) or out.stride(1) != 1:
        raise ValueError(f"dequantized columns {first}..{end} need a ({k}, {end - first}) tensor with contiguous rows")
    consts = dict(_codebook_constants(layer), BLOCK_N=DEQUANT_BLOCK_N)
    grid = (triton.cdiv(k, consts["BLOCK_K"]), triton.cdiv(end - first, DEQUANT_BLOCK_N))
    _dequant_kernel[grid](*_layer_args(layer)[:-1], out, n, k, first, end, out.stride(0), **consts)
    return out


# From DENSE_MIN_M rows W^T was dequantized whole, written to device memory and read back by cuBLAS: on the H200 at
# 256 rows 0.55-0.6x fp16 cuBLAS's time, the writing most of the difference (4096x11008: 75.9 us against 45.6;
# bench/results/kernels-nvidia-h200.json). In slabs of columns of about this many bytes, each dequantized into one
# buffer that cuBLAS reads while it is still in the L2 (50 MB on an H100, 60 on an H200), the weight's fp16 form
# need not reach device memory at all. Not yet timed; LCQ_DENSE_SLAB_MB sets it, 0 for the whole W^T at once.
DENSE_SLAB_BYTES = 16 << 20


def dense_slab_columns(layer: PackedLinear, dtype: torch.dtype, budget: int | None = None) -> int:
    """Columns of W^T per slab of dense_product, for a slab of about `budget` bytes (by default LCQ_DENSE_SLAB_MB
    or DENSE_SLAB_BYTES; 0: all columns): whole tiles of the dequantize kernel, at least one."""
    if budget is None:
        budget = int(float(os.environ.get("LCQ_DENSE_SLAB_MB", DENSE_SLAB_BYTES / 2**20)) * 2**20)
    n = layer.out_features
    if budget <= 0:
        return n
    row_bytes = layer.in_features * torch.empty((), dtype=dtype).element_size()
    return min(n, max(DEQUANT_BLOCK_N, budget // row_bytes // DEQUANT_BLOCK_N * DEQUANT_BLOCK_N))


def dense_product(x: torch.Tensor, layer: PackedLinear, slab_bytes: int | None = None) -> torch.Tensor:
    """x (M, K) -> (M, N) through a dequantized W^T and torch's matmul (cuBLAS on a GPU), a slab of its columns
    at a time (dense_slab_columns(layer, x.dtype, slab_bytes)), each slab's product written straight into its
    columns of the output."""
    m, n = x.shape[0], layer.out_features
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    slab = dense_slab_columns(layer, x.dtype, slab_bytes)
    if slab >= n:
        weight_t = dequantized_transpose(layer, x.dtype, x.device)
        return x @ weight_t if bias is None else torch.addmm(bias, x, weight_t)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    buffer = torch.empty(layer.in_features, slab, dtype=x.dtype, device=x.device)
    for first in range(0, n, slab):
        end = min(first + slab, n)
        weight_t = dequantized_transpose(layer, x.dtype, x.device, (first, end), buffer[:, :end - first])
        if bias is None:
            torch.mm(x, weight_t, out=out[:, first:end])
        else:
            torch.addmm(bias[first:end], x, weight_t, out=out[:, first:end])
    return out


def triton_linear(x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x (..., K): the decode kernel up to DECODE_MAX_M rows, the fused GEMM
    kernel below DENSE_MIN_M rows, dequantize + cuBLAS from there on."""
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {layer.in_features}")
    if x.numel() == 0:
        return x.new_zeros(*x.shape[:-1], layer.out_features)
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    if m <= DECODE_MAX_M:
        out = decode(rows, layer)
    elif m < DENSE_MIN_M:
        out = gemm(rows, layer)
    else:
        out = dense_product(rows, layer)
    return out.reshape(*x.shape[:-1], layer.out_features)
