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
The pieces of a tile are in triton_tiles.py, the products with 8-bit operands in triton_bytes.py, the pair
table in triton_pair_table.py and the autotuner's configs in triton_configs.py; this module holds the kernels
and chooses among them.
"""
from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl

from lcq.format import PackedLinear

from . import linear
from .arrival_counters import arrival_counters
from .compile_ahead import compile_ahead
from .dependent_launch import dependent_launch, wait_for_earlier_kernels
from .elementwise import GATED_CODES, gated_activation
from .experts import ExpertRoutes, PackedExperts
from .gpu_timing import graph_time
from .triton_bytes import (_book_weights, _in_selector_order, _int8_book, _int8_products, byte_slots,
                           input_bytes)
from .triton_configs import (DECODE_CONFIGS, GEMM_CONFIGS, GROUPED_WIDE_CONFIGS, INTERPRETER_DECODE_CONFIG,
                             INTERPRETER_GEMM_CONFIG, MAX_SPLIT_K, _decode_configs_for, max_split_k)
from .triton_pair_table import _lut_products, pair_table
from .triton_tiles import (COLUMN_BOOKS, _dequant_tile, _dot, _gather_table, _group_codes, _table_offsets, _tile_indices,
                           _tile_inputs, _tile_weights, _tile_words, _within_k, block_k, stream_scales, uses_select)
from .tuned_configs import take_pretuned

DECODE_MAX_M = 64
# H100, bench/kernels.py: at 64 rows the split-K decode kernel (59-98 us on the 7B MLP shapes at
# W2 r2 / W4 r1 g128) and dequantize + cuBLAS (83-105 us) both beat the tiled GEMM kernel
# (94-487 us), which has too few programs to fill the GPU at that M; above 64 rows the decode
# kernel's tiles spill and cuBLAS's tensor-core pipeline wins.
DENSE_MIN_M = DECODE_MAX_M + 1


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


ROW_PART = tl.constexpr(linear.ROW_PART)  # (RESIDUAL, NORMED)


@triton.jit
def _store_output(acc, out_ptr, out_offs, out_mask, bias_ptr, offs_n, n_mask, res_ptr, partials_ptr, rows, m_mask,
                  pid_n, PARTIALS, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """A tile's finished sums (plus the bias), rounded to the output dtype, stored; with RESIDUAL the stream at
    res_ptr added first (and the sum rounded once more, as the norm's residual add), and each row's sums of squares
    of the new stream's columns by ROW_PART written to partials_ptr (PARTIALS a row)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :]
    y = acc.to(out_ptr.dtype.element_ty)
    if RESIDUAL:
        stream = tl.load(res_ptr + out_offs, mask=out_mask, other=0.0)
        s = (y.to(tl.float32) + stream.to(tl.float32)).to(y.dtype)
        tl.store(out_ptr + out_offs, s, mask=out_mask)
        squares = tl.where(out_mask, s.to(tl.float32) * s.to(tl.float32), 0.0)
        PARTS: tl.constexpr = BLOCK_N // ROW_PART
        sums = tl.sum(tl.reshape(squares, (BLOCK_M, PARTS, ROW_PART)), axis=2)
        part = pid_n * PARTS + tl.arange(0, PARTS)
        tl.store(partials_ptr + rows[:, None] * PARTIALS + part[None, :], sums,
                 mask=m_mask[:, None] & (part < PARTIALS)[None, :])
    else:
        tl.store(out_ptr + out_offs, y, mask=out_mask)


@triton.jit(do_not_specialize=["SPLIT_K"])
def _decode_kernel(x_ptr, qw_ptr, sq_ptr, ss_ptr, bq_ptr, bs_ptr, v_ptr, vi_ptr, bias_ptr, out_ptr,
                   ws_ptr, counter_ptr, rows_ptr, experts_ptr, lut_ptr, slots_ptr, M, N, K, stride_xm, stride_om,
                   ROWS_PER_INPUT,
                   TABLES, PAIRS, norm_ptr, res_ptr, partials_ptr, eps, PARTIALS, SPLIT_K,
                   BITS: tl.constexpr, RANK: tl.constexpr, RANKS: tl.constexpr, GROUP: tl.constexpr,
                   HAS_BIAS: tl.constexpr,
                   SELECT: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   REDUCE_K: tl.constexpr = False, PREFETCH: tl.constexpr = False, GROUPED: tl.constexpr = False,
                   LUT: tl.constexpr = False, PDL: tl.constexpr = False, BOOK: tl.constexpr = False,
                   INT8: tl.constexpr = False, BYTE_BOOK: tl.constexpr = False, ASM: tl.constexpr = False,
                   PREPARED: tl.constexpr = False, STAGES: tl.constexpr = None, PARTIAL_GROUP: tl.constexpr = False,
                   GATED: tl.constexpr = 0, NORMED: tl.constexpr = False, NORM_PARTS: tl.constexpr = 1,
                   RESIDUAL: tl.constexpr = False):
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
    the tiles PREFETCH loads first are requested before the wait for the kernels that wrote x.
    PARTIAL_GROUP (K not a multiple of GROUP): the tl.dot forms' weight tiles are zero past K (_within_k).
    GATED (elementwise.GATED_CODES; not with LUT or PREPARED, whose inputs come from their own kernels): x's rows
    are an MLP's [gate, up], 2 K wide, and the inputs act(gate) * up (_tile_inputs).
    RESIDUAL (1-2 rows; the residual stream's products: attention's output and the MLP's down): out is the product
    plus the stream at res_ptr (rounded to the dtype as a norm's residual add rounds it), the next stream, and each
    row's sums of squares of it by ROW_PART columns go to partials_ptr (PARTIALS a row), which the next NORMED
    product reads. (A launch run again gives the same output: the autotuner may time it.)
    NORMED (1-2 rows, not PREPARED, whose kernel then computes it; the products a norm feeds: QKV and the MLP's
    gate/up): x_ptr is the stream and the inputs its RMSNorm by the weight at norm_ptr and eps, each row's scale from
    its NORM_PARTS (a power of two, at least PARTIALS) partial sums (_tile_inputs): the norm's kernel need not run."""
    tl.static_assert(not (PDL and GROUPED))
    tl.static_assert(not INT8 or (BLOCK_M < 16 and not LUT and not BOOK))
    tl.static_assert(not PREPARED or INT8)
    tl.static_assert(GATED == 0 or not (LUT or PREPARED))
    tl.static_assert(not (NORMED or RESIDUAL) or (BLOCK_M < 16 and not (LUT or GROUPED)))
    tl.static_assert(not (NORMED and (GATED or PREPARED)))
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
    norm_scales = None
    if NORMED:
        norm_scales = stream_scales(partials_ptr, x_rows, m_mask, PARTIALS, K, eps, NORM_PARTS)
    if PREFETCH:
        inputs = _tile_inputs(x_ptr, lut_ptr, x_rows, m_mask, stride_xm, start * BLOCK_K, K, PAIRS, LUT, BLOCK_K,
                              FP32_INPUTS, SELECTOR_ORDER, PREPARED, GATED, norm_ptr, norm_scales, NORMED)
    if PREFETCH == 2:
        inputs_2 = _tile_inputs(x_ptr, lut_ptr, x_rows, m_mask, stride_xm, (start + 1) * BLOCK_K, K, PAIRS, LUT,
                                BLOCK_K, FP32_INPUTS, SELECTOR_ORDER, PREPARED, GATED, norm_ptr, norm_scales, NORMED)
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
                                       FP32_INPUTS, SELECTOR_ORDER, PREPARED, GATED, norm_ptr, norm_scales, NORMED)
        if not CARRIED_WORDS:
            words, top_words = _tile_words(qw_ptr, k0, offs_n, n_mask, N, BITS, BLOCK_K, PICKS)
        if not PREFETCH:
            s_codes, b_codes = _group_codes(sq_ptr, bq_ptr, k0, offs_n, n_mask, N, RANK, GROUP)
            inputs = _tile_inputs(x_ptr, lut_ptr, x_rows, m_mask, stride_xm, k0, K, PAIRS, LUT, BLOCK_K, FP32_INPUTS,
                                  SELECTOR_ORDER, PREPARED, GATED, norm_ptr, norm_scales, NORMED)
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
                if PARTIAL_GROUP:
                    w = _within_k(w, k0, K, BLOCK_K)
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
            _store_output(acc, out_ptr, out_offs, out_mask, bias_ptr, offs_n, n_mask, res_ptr, partials_ptr, rows,
                          m_mask, pid_n, PARTIALS, HAS_BIAS, RESIDUAL, BLOCK_M, BLOCK_N)
            # ready for the next launch; relaxed: nothing waits on our stores to land first (a later kernel
            # reads this one's output only once it has finished)
            tl.atomic_xchg(counter_ptr + counter, 0, sem="relaxed")
    else:
        _store_output(acc, out_ptr, out_offs, out_mask, bias_ptr, offs_n, n_mask, res_ptr, partials_ptr, rows, m_mask,
                      pid_n, PARTIALS, HAS_BIAS, RESIDUAL, BLOCK_M, BLOCK_N)


@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, sq_ptr, ss_ptr, bq_ptr, bs_ptr, v_ptr, vi_ptr, bias_ptr, out_ptr,
                 M, N, K, stride_xm, stride_om, M_BUCKET,
                 BITS: tl.constexpr, RANK: tl.constexpr, RANKS: tl.constexpr, GROUP: tl.constexpr,
                   HAS_BIAS: tl.constexpr,
                 SELECT: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 PARTIAL_GROUP: tl.constexpr = False):
    """Tiled product (dispatched for no row count, DENSE_MIN_M: the fused alternative bench/kernels.py times from 65
    rows as fused_us): each program dequantizes its weight tiles once per BLOCK_M rows, each weight from
    its column's codebook (BOOK, where COLUMN_BOOKS), a warp shuffle: at 3-4 bits per weight a gather of V had been pipelined as 4-byte
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
                          BITS, RANK, RANKS, GROUP, SELECT, BLOCK_K, BLOCK_N, COLUMN_BOOKS)
        if PARTIAL_GROUP:
            w = _within_k(w, k0, K, BLOCK_K)
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
    (BOOK) where COLUMN_BOOKS: sm_90 SASS, Triton 3.6, r2 g128, 13.1 and 10.4 instructions per weight against the V
    gathers' 16.9 and 12.8 (bench/kernels.py --sass); on Triton 3.9 the V gathers' 16.8 and 12.6 against 24.8 and
    20.8; at 2 bits the selects (8.9)."""
    offs_n = first_n + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < end_n
    k0 = tl.program_id(0) * BLOCK_K
    k_idx = k0 + tl.arange(0, BLOCK_K)
    v_base = _table_offsets(vi_ptr, offs_n, n_mask, BITS, RANKS)
    w = _dequant_tile(qw_ptr, sq_ptr, ss_ptr, bq_ptr, bs_ptr, v_ptr, v_base, k0, offs_n, n_mask, N,
                      BITS, RANK, RANKS, GROUP, SELECT, BLOCK_K, BLOCK_N, COLUMN_BOOKS and not SELECT)
    tl.store(out_ptr + k_idx[:, None] * stride_out + (offs_n - first_n)[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(k_idx[:, None] < K) & n_mask[None, :])


_KEY = ["N", "K", "BITS", "RANK", "GROUP"]
DEQUANT_BLOCK_N = 128
# Configs are timed as the engine runs them (graph_time: no launch overhead, weights cold in L2):
# timed with launches, a product shorter than its launch (a small layer, or a 2-bit layer at the
# bandwidth limit: ~2 us for 4096x4096) would be timed as the launch and the choice would be noise.
# Timings are kept on disk (Triton >= 3.4, in TRITON_CACHE_DIR, keyed on the kernel source, the GPU
# architecture and the tuning key), so a restarted server skips the tuning of its warm-up.
_KEEP_TIMINGS = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
_decode_tuned = triton.autotune(DECODE_CONFIGS,
                                key=_KEY + ["BLOCK_M", "GROUPED", "LUT", "INT8", "BYTE_BOOK", "PREPARED", "GATED",
                                            "NORMED", "RESIDUAL"],
                                do_bench=graph_time,
                                prune_configs_by={"early_config_prune": _decode_configs_for},
                                **_KEEP_TIMINGS)(_decode_kernel)
_grouped_wide_tuned = triton.autotune(GROUPED_WIDE_CONFIGS, key=_KEY + ["BLOCK_M", "INT8", "BYTE_BOOK"],
                                      do_bench=graph_time,
                                      **_KEEP_TIMINGS)(_decode_kernel)
_gemm_tuned = triton.autotune(GEMM_CONFIGS, key=_KEY + ["M_BUCKET"], do_bench=graph_time, **_KEEP_TIMINGS)(_gemm_kernel)


def _tuned_launch(tuner, grid, args: tuple, constants: dict) -> None:
    """tuner[grid](*args, **constants), with this GPU's pre-tuned config where its table has the launch's key
    (tuned_configs), else the configs it will time compiled side by side first during a warm-up (compile_ahead): the
    decode autotuner's after its prune, the others' all."""
    prune = _decode_configs_for if tuner is _decode_tuned else lambda configs, named, **kwargs: configs
    candidates = lambda: prune(tuner.configs, {}, **constants)  # noqa: E731
    if not take_pretuned(tuner, args, constants, candidates):
        compile_ahead(tuner, candidates, args, constants)
    tuner[grid](*args, **constants)


def decode_block_m(m: int) -> int:
    """M bucket of the decode kernel: 1 and 2 rows reduce with FMAs, 3 to 64 rows through tl.dot in
    tiles of 16, 32 or 64 rows (from 4 rows on, the FMA form's BLOCK_M x BLOCK_K x BLOCK_N products
    spill registers)."""
    return m if m <= 2 else max(16, triton.next_power_of_2(m))


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
                DOT_IN_FP32=not x.is_cuda and x.dtype == torch.bfloat16,
                PARTIAL_GROUP=layer.in_features % layer.group_size != 0)


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


BYTE_BOOK_MAX_M = 32  # at 64 rows the inputs' sums and the steps applied per tile cost as much as the dot form
# (7.0-8.5 instructions per weight, sm_90)


def _byte_book_dtype(x: torch.Tensor) -> bool:
    """Whether weights from byte codebooks serve x's dtype on its device: fp16, or bf16 where the GPU converts fp32
    pairs to it (cvt.rn.bf16x2, compute capability 8.0 and later; ptxas refuses the bf16 build for a T4's sm_75)."""
    return x.dtype == torch.float16 or x.dtype == torch.bfloat16 and (not x.is_cuda or _from_ampere(x.device.index))


@functools.cache
def _from_ampere(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)


def byte_book_decode(x: torch.Tensor, block_m: int, bits: int) -> bool:
    """Whether a launch on CUDA whose rows fill tiles of block_m takes its weights from byte codebooks
    (_book_weights): up to BYTE_BOOK_MAX_M rows of fp16, or bf16 from sm_80 (1 and 2 rows in tiles of 16 where
    products of bytes do not serve; a mixture's blocks of 16 or 32), by default for BYTE_BOOK_DEFAULT. The weights
    then differ from the exact ones by their codebooks' rounding to bytes (byte_products.byte_book_weights), the
    same at every batch size it serves. sm_90 SASS, W2 r2 g128, 16 rows: 4.0 instructions per weight against 8.1
    for the tl.dot form; on an H100 the 7B W2 model decoded 1,639 tokens/s at 8 sequences with them, 1,489 without
    (docs/kernels.md)."""
    return x.is_cuda and block_m <= BYTE_BOOK_MAX_M and _byte_book_dtype(x) \
        and _asked("LCQ_BYTE_BOOK", (bits, x.dtype) in BYTE_BOOK_DEFAULT)


def byte_book_block_m(m: int) -> int:
    """Tile of rows of a launch from byte codebooks: the tl.dot form's (decode_block_m), 16 for 1-2 rows too."""
    return max(16, decode_block_m(m))


def _check_byte_book(x: torch.Tensor, block_m: int) -> None:
    if block_m < 16 or not _byte_book_dtype(x):
        raise ValueError(f"weights from byte codebooks serve tiles of 16 rows or more of fp16 inputs, or bf16 on GPUs "
                         f"of compute capability 8.0 or later, not {block_m} rows of {x.dtype}")


def decode(x: torch.Tensor, layer: PackedLinear, config: dict | None = None, lut: bool | None = None,
           int8: bool | None = None, byte_book: bool | None = None, prepared: bool | None = None,
           gated: str | None = None, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
           squares: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) with M <= 64, contiguous rows -> (M, N). config skips autotuning: BLOCK_N and
    SPLIT_K, optionally BLOCK_M, BLOCK_K (dividing the group), REDUCE_K, PREFETCH, STAGES, num_warps and
    num_stages. lut: products from the activation-side pair table (one row at 2 bits) or not; by default
    where it was timed faster for the shape (lut_wins), autotuned on CUDA, but not for gated inputs. int8: products
    of bytes (1-2 rows; by default int8_decode). byte_book: weights from byte codebooks (fp16 or bf16; by default
    byte_book_decode, but not where int8 or lut is asked for). prepared: with int8, the inputs rounded to bytes once
    by a kernel of their own (input_bytes), not in every program; by default where LCQ_INT8_INPUTS=1. gated (an
    activation of elementwise.GATED): x (M, 2 K) is an MLP's [gate, up], and the product's inputs act(gate) * up,
    computed where the kernel loads them at 1-2 rows (FMA rows, products of bytes), else by gated_activation first.
    At 1-2 rows (not with lut), the decoder's residual stream: norm_weight (and eps) makes x the stream
    and the inputs its RMSNorm, each row's sum of squares from squares (rows, cdiv(K, ROW_PART)) fp32, which the
    product that last added into the stream wrote; residual (rows, N), the stream: the product plus it is returned,
    the next stream, and its rows' sums of squares go to squares for the next normed product."""
    m = x.shape[0]
    k = layer.in_features
    if x.shape[1] != (2 * k if gated else k):
        raise ValueError(f"the layer takes {k} inputs{' as gate and up halves' if gated else ''}, not {x.shape[1]}")
    n = layer.out_features
    if int8 is None:
        int8 = int8_decode(x, decode_block_m(m), layer.bits)
    stream = norm_weight is not None or residual is not None
    if byte_book is None:  # (not for the stream's products: 1-2 rows would take tiles of 16)
        byte_book = not (int8 or lut or stream) and byte_book_decode(x, byte_book_block_m(m), layer.bits)
    block_m = byte_book_block_m(m) if byte_book else decode_block_m(m)
    if byte_book:
        _check_byte_book(x, block_m)
    if lut is None:
        lut = not (int8 or byte_book) and x.is_cuda and config is None and m == 1 and layer.bits == 2 \
            and gated is None and not stream and lut_wins(x, layer)
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
    if stream and (lut or block_m >= 16):
        raise ValueError(f"the residual stream's products serve 1-2 rows without the pair table, not {m} rows"
                         + (" with the pair table" if lut else ""))
    if gated and (lut or block_m >= 16):  # the pair table's kernel reads the inputs as they are; the tl.dot forms
        # would compute each input's activation in every column tile (sm_90 SASS at 16-32 rows: 1.5-1.9x the loop's
        # instructions, against 1.02-1.09x at 1-2 rows)
        x, gated = gated_activation(x, gated), None
    if residual is not None and (residual.shape != (m, n) or residual.stride() != (n, 1) or residual.dtype != x.dtype):
        raise ValueError(f"the stream a product adds to is {m} contiguous rows of {n} in {x.dtype}, not "
                         f"{tuple(residual.shape)} in {residual.dtype}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    ws = torch.empty(max_split_k(block_m), m, n, dtype=torch.float32, device=x.device)
    counters = arrival_counters(x.device, triton.cdiv(n, 16))
    pairs = triton.cdiv(k, layer.group_size) * layer.group_size // 2
    table = pair_table(x, layer, pairs) if lut else ws  # (unread without LUT)
    parts = triton.cdiv(k if norm_weight is not None else n, ROW_PART.value)
    if stream and (squares is None or squares.shape != (m, parts)):
        raise ValueError(f"the stream's sums of squares are ({m}, {parts}) fp32, not "
                         f"{None if squares is None else tuple(squares.shape)}")
    normed = norm_weight is not None and not prepared  # (prepared: input_bytes computes the norm)
    inputs = input_bytes(x, layer, gated, None if norm_weight is None else (norm_weight, eps, squares)) \
        if prepared else x
    args = (inputs, *_layer_args(layer), out, ws, counters, counters, counters, table, byte_slots(x.device), m, n, k,
            inputs.stride(0), out.stride(0),
            1, 0, pairs, ws if norm_weight is None else norm_weight, ws if residual is None else residual,
            ws if squares is None else squares, eps, parts)
    consts = dict(_constants(x, layer), BLOCK_M=block_m, GROUPED=False, LUT=lut, INT8=int8,  # (in the tuning key)
                  BYTE_BOOK=byte_book, ASM=x.is_cuda, PREPARED=prepared,
                  GATED=0 if prepared else GATED_CODES[gated], NORMED=normed,
                  NORM_PARTS=triton.next_power_of_2(parts) if normed else 1,
                  RESIDUAL=residual is not None, **dependent_launch(x))
    if config is None and not x.is_cuda:
        config = INTERPRETER_DECODE_CONFIG
    if config is None:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        _tuned_launch(_decode_tuned, grid, args, _without_depth(consts))
    else:
        launch = {**consts, **config}
        if layer.group_size % launch["BLOCK_K"] or launch["SPLIT_K"] > max_split_k(launch["BLOCK_M"]) \
                or launch["BLOCK_M"] < m:
            raise ValueError(f"decode config {config} does not fit M={m}, group size {layer.group_size}")
        _decode_kernel[(triton.cdiv(n, launch["BLOCK_N"]), launch["SPLIT_K"])](*args, **launch)
    return out


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
            out.stride(0), rows_per_input, experts.tables, 0, ws, ws, ws, 0.0, 1)
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
            _tuned_launch(_grouped_wide_tuned, grid, args, consts)
        else:
            _tuned_launch(_decode_tuned, grid, args, _without_depth(consts))
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
        _tuned_launch(_gemm_tuned, grid, args, consts)
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
# But a prompt's products run eagerly, not from CUDA graphs, and each slab is two launches from Python (a Triton
# launch took ~14 us of self time in the H100's 128-token prefill profile, under cProfile): a 7B layer's four products
# are 26 slabs at 16 MB, where the whole W^T is 4, and at 128 rows a slab's product is a few microseconds of the
# GPU's, so the host would pace it. The TTFT of 20.8 ms (H100, 128-token prompt) was measured with the whole W^T;
# slabs by default only from this many rows (the engine's default prefill budget: a long prompt's full chunks), where
# a slab's product (2,048 x 4,096 at 1,024 rows: 17 GFLOP) outlasts its launches. bench/generate.py --variants
# slab-dense times 128-token prompts in slabs (LCQ_DENSE_SLAB_MB set: slabs at every row count).
DENSE_SLAB_MIN_M = 1024


def dense_slab_columns(layer: PackedLinear, dtype: torch.dtype, budget: int | None = None,
                       rows: int | None = None) -> int:
    """Columns of W^T per slab of dense_product, for a slab of about `budget` bytes (by default LCQ_DENSE_SLAB_MB,
    or DENSE_SLAB_BYTES where a product has `rows` >= DENSE_SLAB_MIN_M, or None given; 0: all columns): whole tiles
    of the dequantize kernel, at least one."""
    if budget is None:
        asked = os.environ.get("LCQ_DENSE_SLAB_MB")
        if asked is None and rows is not None and rows < DENSE_SLAB_MIN_M:
            return layer.out_features
        budget = int(float(asked or DENSE_SLAB_BYTES / 2**20) * 2**20)
    n = layer.out_features
    if budget <= 0:
        return n
    row_bytes = layer.in_features * torch.empty((), dtype=dtype).element_size()
    return min(n, max(DEQUANT_BLOCK_N, budget // row_bytes // DEQUANT_BLOCK_N * DEQUANT_BLOCK_N))


def dense_product(x: torch.Tensor, layer: PackedLinear, slab_bytes: int | None = None) -> torch.Tensor:
    """x (M, K) -> (M, N) through a dequantized W^T and torch's matmul (cuBLAS on a GPU), a slab of its columns
    at a time (dense_slab_columns(layer, x.dtype, slab_bytes, M)), each slab's product written straight into its
    columns of the output."""
    m, n = x.shape[0], layer.out_features
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    slab = dense_slab_columns(layer, x.dtype, slab_bytes, m)
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


def triton_linear(x: torch.Tensor, layer: PackedLinear, gated: str | None = None, **stream) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x (..., K): the decode kernel up to DECODE_MAX_M rows, the fused GEMM
    kernel below DENSE_MIN_M rows, dequantize + cuBLAS from there on. gated (an activation of elementwise.GATED):
    x (..., 2 K) is an MLP's [gate, up] and the product's inputs act(gate) * up, which the decode kernel computes
    as it loads them at 1-2 rows (a launch a layer fewer), the others from gated_activation's output. stream: decode's
    norm_weight, eps, squares and residual (1-2 rows of the residual stream)."""
    width = 2 * layer.in_features if gated else layer.in_features
    if x.shape[-1] != width:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {width}")
    if x.numel() == 0:
        return x.new_zeros(*x.shape[:-1], layer.out_features)
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    if m <= DECODE_MAX_M:
        out = decode(rows, layer, gated=gated, **stream)
    elif stream:
        raise ValueError(f"the residual stream's products serve 1-2 rows, not {m}")
    else:
        if gated:
            rows = gated_activation(rows, gated)
        out = gemm(rows, layer) if m < DENSE_MIN_M else dense_product(rows, layer)
    return out.reshape(*x.shape[:-1], layer.out_features)
