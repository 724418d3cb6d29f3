"""Triton kernels for attention over the paged KV cache (CUDA; tests run them in the interpreter).

The cache of a layer is two tensors (num_blocks, block_size, kv_heads, head_dim); token t of a
sequence sits in slot block_table[t // block_size] * block_size + t % block_size. Both attention
kernels walk a sequence's tokens in tiles of BLOCK_N, gathering each tile's slots through the
block table (so any block size works), with an online softmax in fp32:
- decode: one program per (sequence, kv head) serves all query heads of that group at once, so
  every cached K/V row is read once per group; the group is padded to 16 rows for tl.dot. Where a step
  has too few (sequence, kv head) pairs to fill the GPU (one sequence of a 7B model: 32), each context is
  split into partitions, a program each (context_partitions; flash-decoding), and the last partition of a
  sequence to finish combines their softmax states; a context within one partition is finished as before;
- prefill: one program per (sequence, head, tile of BLOCK_M new tokens); new token j of a
  sequence with n new tokens and context length L sits at position L - n + j and sees the cached
  tokens 0 .. L - n + j (a cached prefix plus the causal part of its own chunk).
With a sliding window of W (WINDOW > 0, a constant: Gemma 3's layers use one W or none) a query at
position i sees only the tokens i - W + 1 .. i; with chunks of C (WINDOW = -C: Llama 4's chunked
attention) the tokens from i - i mod C to i: the loops start at the tile holding the first token
that a program's first query sees, and the tile where a window or chunk begins is masked; WINDOW 0
compiles the full-attention kernels. SOFTCAP > 0 (Gemma 2, a constant) caps every score to
SOFTCAP * tanh(score / SOFTCAP) before the masks and the softmax; 0 compiles no cap. HAS_SINKS (gpt-oss)
reads one fp32 attention sink per query head, a key of that score (never capped) and value zero, added
once to each row's softmax sum before the division, as exp(sink - the running max); False compiles none.
A cache may be narrower than the activations (fp8 e4m3, half an fp16 cache's bytes): store_kv clamps
each value to the cache dtype's range and rounds it to it, and the attention kernels convert each
tile of K and V to the queries' dtype as they load it.
Loop bounds come from context_lens in memory, never from the host, and store_kv skips slot -1
without a host check, so a decode step can be captured in a CUDA graph (batches padded with
slot -1 and context length 0, whose output rows are zeros).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .arrival_counters import arrival_counters
from .dependent_launch import dependent_launch, wait_for_earlier_kernels
from .elementwise import rotary_launch, rotate_token

BLOCK_N = 32  # cached tokens per tile
PROGRAMS_PER_SM = 4  # decode attention splits contexts until a step has this many programs per multiprocessor
INTERPRETER_PROGRAMS = 64  # ... or this many under TRITON_INTERPRET=1 (tests: several partitions a context)
BLOCK_M = 32  # new tokens per prefill program
MIN_DOT_ROWS = 16  # tl.dot needs at least 16 rows


@triton.jit
def _store_token(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, token, stride_k, stride_v,
                 ROW: tl.constexpr, BLOCK: tl.constexpr, LIMIT: tl.constexpr):
    """The token's k and v rows (ROW values each) into its slot, unless the slot is -1. LIMIT > 0: the cache dtype's
    largest value, to which values are clamped before they are rounded to it (a narrower cache than the
    activations: fp8)."""
    slot = tl.load(slot_ptr + token)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < ROW
        k = tl.load(k_ptr + token * stride_k + offs, mask=mask)
        v = tl.load(v_ptr + token * stride_v + offs, mask=mask)
        if LIMIT > 0:  # (NaN stays NaN, as in the torch path: a clamp's fmax would make it -LIMIT)
            k = tl.minimum(tl.maximum(k, -LIMIT, propagate_nan=tl.PropagateNan.ALL), LIMIT,
                           propagate_nan=tl.PropagateNan.ALL)
            v = tl.minimum(tl.maximum(v, -LIMIT, propagate_nan=tl.PropagateNan.ALL), LIMIT,
                           propagate_nan=tl.PropagateNan.ALL)
        tl.store(k_cache_ptr + slot * ROW + offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + slot * ROW + offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_k, stride_v,
                     ROW: tl.constexpr, BLOCK: tl.constexpr, LIMIT: tl.constexpr, PDL: tl.constexpr):
    """One token a program (_store_token)."""
    wait_for_earlier_kernels(PDL)
    _store_token(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, tl.program_id(0), stride_k, stride_v, ROW, BLOCK,
                 LIMIT)


def _store_constants(k_cache: torch.Tensor, activations: torch.dtype, row: int) -> dict:
    """ROW, BLOCK and LIMIT of a store of rows of `row` values into k_cache's dtype."""
    narrower = torch.finfo(k_cache.dtype).max < torch.finfo(activations).max
    return dict(ROW=row, BLOCK=triton.next_power_of_2(row),
                LIMIT=float(torch.finfo(k_cache.dtype).max) if narrower else 0.0)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v (T, kv_heads, d) into the cache slots slot_mapping (T,); slot -1 is skipped."""
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k.stride(2) == 1 and v.stride(2) == 1
    row = k.shape[1] * k.shape[2]
    k, v = k.reshape(-1, row), v.reshape(-1, row)  # rows stay strided views of the qkv output
    _store_kv_kernel[(k.shape[0],)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                                    **_store_constants(k_cache, k.dtype, row), **dependent_launch(k))


@triton.jit
def _rotary_store_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_t, stride_c,
                            heads, KEYS_AT: tl.constexpr, HEAD_DIM: tl.constexpr, PAIRS: tl.constexpr,
                            INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
                            ROW: tl.constexpr, BLOCK: tl.constexpr, LIMIT: tl.constexpr, PDL: tl.constexpr):
    """One token a program: its queries and keys rotated in place (rotate_token), then its keys and values, which
    start KEYS_AT values into the row, stored (_store_token), once every thread's rotated values have landed."""
    wait_for_earlier_kernels(PDL)
    token = tl.program_id(0)
    rotate_token(qkv_ptr, cos_ptr, sin_ptr, token, stride_t, stride_c, heads, HEAD_DIM, PAIRS, INTERLEAVED, BLOCK_H,
                 BLOCK_P)
    tl.debug_barrier()  # the program's stores are visible to all its threads past it
    _store_token(qkv_ptr + KEYS_AT, qkv_ptr + KEYS_AT + ROW, k_cache_ptr, v_cache_ptr, slot_ptr, token, stride_t,
                 stride_t, ROW, BLOCK, LIMIT)


def rotary_store_kv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, cos: torch.Tensor,
                    sin: torch.Tensor, interleaved: bool, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """elementwise.rotary_ of the queries' and keys' heads of qkv (T, (heads + 2 kv_heads) d), then store_kv of its
    keys and values, in one launch: a decode step's kernel a layer fewer. Same contract as the two."""
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and qkv.stride(-1) == 1
    tokens, pairs = qkv.shape[0], cos.shape[-1]
    cos, sin = cos.reshape(tokens, pairs), sin.reshape(tokens, pairs)
    heads, row = num_heads + num_kv_heads, num_kv_heads * head_dim
    store = _store_constants(k_cache, qkv.dtype, row)
    rotation = rotary_launch(heads, pairs)
    rotation["num_warps"] = max(rotation["num_warps"], 4)  # as many as store_kv's launch had at least
    _rotary_store_kv_kernel[(tokens,)](qkv, cos, sin, k_cache, v_cache, slot_mapping, qkv.stride(0), cos.stride(0),
                                       heads, KEYS_AT=num_heads * head_dim, HEAD_DIM=head_dim, PAIRS=pairs,
                                       INTERLEAVED=interleaved, **rotation, **store, **dependent_launch(qkv))


@triton.jit
def _tile_slots(table_ptr, t, t_mask, BLOCK_SIZE: tl.constexpr):
    """Cache slots (int64) of a sequence's tokens t."""
    block = tl.load(table_ptr + t // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
    return block * BLOCK_SIZE + t % BLOCK_SIZE


@triton.jit
def _capped(scores, SOFTCAP: tl.constexpr):
    """scores, or with SOFTCAP > 0 SOFTCAP * tanh(scores / SOFTCAP), tanh written with exp (Triton 3.6
    has no tanh of its own): 1 - 2 / (exp(2x) + 1) is exact at both ends (exp overflows to inf: 1)."""
    if SOFTCAP > 0:
        scores = SOFTCAP * (1.0 - 2.0 / (tl.exp(scores * (2.0 / SOFTCAP)) + 1.0))
    return scores


@triton.jit
def _online_softmax_step(scores, v, m_i, l_i, acc, PRECISION: tl.constexpr, EMPTY_ROWS: tl.constexpr):
    """Fold one tile of scores (rows, BLOCK_N; masked entries -inf) and its values into the running
    max m_i, normaliser l_i and output acc. EMPTY_ROWS: a row may have seen no key yet (its window
    begins past this tile), which must leave it at zero rather than exp(-inf - -inf) = NaN."""
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    shift = m_new
    if EMPTY_ROWS:  # such a row keeps m_i -inf (a shift of 0 would underflow later scores)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(scores - shift[:, None])
    alpha = tl.exp(m_i - shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _first_key(position, WINDOW: tl.constexpr):
    """The first position a query at `position` sees: its sliding window's (WINDOW > 0), its chunk's
    (WINDOW < 0: chunks of -WINDOW positions), or 0. (Positions below 0, of padding, count as 0: the
    interpreter's integer division floors where compiled code truncates.)"""
    if WINDOW > 0:
        first = tl.maximum(position - WINDOW + 1, 0)
    elif WINDOW < 0:
        first = tl.maximum(position, 0) // -WINDOW * -WINDOW
    else:
        first = position * 0
    return first


@triton.jit
def _finish_rows(m_i, l_i, acc, sinks_ptr, heads, g_mask, out_ptr, HAS_SINKS: tl.constexpr):
    """A decode query group's output from its softmax state: the sinks added to the sums, then acc / l."""
    if HAS_SINKS:  # a padding sequence's m_i is -inf: l_i inf, and its zeros stay zeros
        l_i = l_i + tl.exp(tl.load(sinks_ptr + heads, mask=g_mask, other=0.0) - m_i)
    out = acc / tl.maximum(l_i, 1e-30)[:, None]  # a padding sequence (length 0) gives zeros, not NaN
    return out.to(out_ptr.dtype.element_ty)


@triton.jit
def _decode_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, table_ptr, lens_ptr, sinks_ptr, ws_ptr,
                             counter_ptr, scale, partition_len,
                             stride_qt, stride_qh, stride_ot, stride_oh, stride_table, stride_slot,
                             GROUP: tl.constexpr, GROUP_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                             PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                             HAS_SINKS: tl.constexpr, PDL: tl.constexpr, SPLIT: tl.constexpr, STAGES: tl.constexpr = 1):
    """Program (sequence, kv head, partition): with SPLIT, the keys of its partition of the context
    (partition_len positions, a multiple of BLOCK_N; decode_attention's partitions), its softmax state
    (max, sum, unnormalised output) written to the workspace, and the last of the sequence's partitions
    to arrive combines them; a context within one partition is finished by that partition alone.
    STAGES: the key loop's pipelining (attention_stages)."""
    wait_for_earlier_kernels(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    offs_g = tl.arange(0, GROUP_ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    out_ptrs = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    out_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=out_mask, other=0.0)
    length = tl.load(lens_ptr + seq)
    table_ptr += seq * stride_table
    m_i = tl.full((GROUP_ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((GROUP_ROWS,), tl.float32)
    acc = tl.zeros((GROUP_ROWS, BLOCK_D), tl.float32)
    lowest = _first_key(length - 1, WINDOW)  # the first token the query sees
    begin = lowest // BLOCK_N * BLOCK_N
    end = length
    if SPLIT:  # this program's share: empty outside the partitions first .. last the keys lie in
        part = tl.program_id(2)
        first = begin // partition_len
        last = tl.maximum(length - 1, 0) // partition_len
        begin = tl.maximum(begin, part * partition_len)
        end = tl.minimum(end, (part + 1) * partition_len)
    for start in tl.range(begin, end, BLOCK_N, num_stages=STAGES):
        t = start + tl.arange(0, BLOCK_N)
        t_mask = t < length
        if WINDOW != 0:
            t_mask = t_mask & (t >= lowest)
        rows = _tile_slots(table_ptr, t, t_mask, BLOCK_SIZE)[:, None] * stride_slot + kv_head * HEAD_DIM
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + rows + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + rows + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        scores = _capped(tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, SOFTCAP)
        scores = tl.where(t_mask[None, :], scores, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(scores, v, m_i, l_i, acc, PRECISION, False)
    if SPLIT:
        if first == last:
            if part == first:
                tl.store(out_ptrs, _finish_rows(m_i, l_i, acc, sinks_ptr, heads, g_mask, out_ptr, HAS_SINKS),
                         mask=out_mask)
        elif (part >= first) & (part <= last):
            # each partition's state: GROUP_ROWS maxima, GROUP_ROWS sums, then GROUP_ROWS x BLOCK_D outputs
            entry = GROUP_ROWS * (BLOCK_D + 2)
            group = seq * tl.num_programs(1) + kv_head
            states = ws_ptr + group * tl.num_programs(2) * entry
            mine = states + part * entry
            tl.store(mine + offs_g, m_i)
            tl.store(mine + GROUP_ROWS + offs_g, l_i)
            tl.store(mine + 2 * GROUP_ROWS + offs_g[:, None] * BLOCK_D + offs_d[None, :], acc)
            tl.debug_barrier()
            arrived = tl.atomic_add(counter_ptr + group, 1)  # acq_rel: our state is visible to the last one
            if arrived == last - first:
                m_all = tl.full((GROUP_ROWS,), float("-inf"), tl.float32)
                l_all = tl.zeros((GROUP_ROWS,), tl.float32)
                acc_all = tl.zeros((GROUP_ROWS, BLOCK_D), tl.float32)
                # COMBINED partitions' states are loaded before any is combined (one L2 round trip for them, not
                # one each); a slot past the last reads as an empty state (max -inf, weight 0). Each partition
                # has seen a key, so the first one's max is finite and no exp meets -inf - -inf.
                COMBINED: tl.constexpr = 4
                for run in range(first, last + 1, COMBINED):
                    for slot in tl.static_range(COMBINED):
                        other = tl.full((GROUP_ROWS,), run + slot, tl.int32)
                        real = other <= last
                        state = states + other * entry
                        m_p = tl.load(state + offs_g, mask=real, other=float("-inf"), cache_modifier=".cg")
                        l_p = tl.load(state + GROUP_ROWS + offs_g, mask=real, other=0.0, cache_modifier=".cg")
                        acc_p = tl.load(state[:, None] + 2 * GROUP_ROWS + offs_g[:, None] * BLOCK_D + offs_d[None, :],
                                        mask=real[:, None], other=0.0, cache_modifier=".cg")
                        m_new = tl.maximum(m_all, m_p)
                        kept, added = tl.exp(m_all - m_new), tl.exp(m_p - m_new)
                        l_all = l_all * kept + l_p * added
                        acc_all = acc_all * kept[:, None] + acc_p * added[:, None]
                        m_all = m_new
                tl.store(out_ptrs, _finish_rows(m_all, l_all, acc_all, sinks_ptr, heads, g_mask, out_ptr,
                                                HAS_SINKS), mask=out_mask)
                # ready for the next launch; relaxed: nothing waits on our stores to land first (a later kernel
                # reads this one's output only once it has finished)
                tl.atomic_xchg(counter_ptr + group, 0, sem="relaxed")
    else:
        tl.store(out_ptrs, _finish_rows(m_i, l_i, acc, sinks_ptr, heads, g_mask, out_ptr, HAS_SINKS), mask=out_mask)


@triton.jit
def _prefill_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, table_ptr, lens_ptr, starts_ptr, sinks_ptr,
                              scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_table, stride_slot,
                              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                              HAS_SINKS: tl.constexpr, STAGES: tl.constexpr = 1):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    m0 = tl.program_id(2) * BLOCK_M
    first = tl.load(starts_ptr + seq)
    num_new = tl.load(starts_ptr + seq + 1) - first
    if m0 < num_new:
        length = tl.load(lens_ptr + seq)
        kv_head = head // GROUP
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < num_new
        d_mask = offs_d < HEAD_DIM
        q = tl.load(q_ptr + (first + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        positions = length - num_new + offs_m
        end = tl.minimum(length, length - num_new + m0 + BLOCK_M)  # past the tile's last query: unseen
        table_ptr += seq * stride_table
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        lowest = _first_key(length - num_new + m0, WINDOW)  # the first token the tile's first query sees
        for start in tl.range(lowest // BLOCK_N * BLOCK_N, end, BLOCK_N, num_stages=STAGES):
            t = start + tl.arange(0, BLOCK_N)
            t_mask = t < end
            rows = _tile_slots(table_ptr, t, t_mask, BLOCK_SIZE)[:, None] * stride_slot + kv_head * HEAD_DIM
            kv_mask = t_mask[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + rows + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            v = tl.load(v_cache_ptr + rows + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            scores = _capped(tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, SOFTCAP)
            visible = t_mask[None, :] & (t[None, :] <= positions[:, None])
            if WINDOW != 0:
                visible = visible & (t[None, :] >= _first_key(positions, WINDOW)[:, None])
            scores = tl.where(visible, scores, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(scores, v, m_i, l_i, acc, PRECISION, WINDOW != 0)
        if WINDOW != 0:  # a row past the new tokens (not stored) may see no key of its window or chunk: 0 / 0
            l_i = tl.maximum(l_i, 1e-30)
        if HAS_SINKS:
            l_i = l_i + tl.exp(tl.load(sinks_ptr + head) - m_i)
        out = acc / l_i[:, None]
        tl.store(out_ptr + (first + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _shared_args(q: torch.Tensor, k_cache: torch.Tensor, out: torch.Tensor, block_tables: torch.Tensor) -> tuple:
    return (q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
            k_cache.stride(1))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 models stay exact; tf32 only names the default


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, window: int = 0, softcap: float = 0.0,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q (S, heads, d): one new token per sequence, already in the cache -> (S, heads, d); window > 0:
    over the last `window` cached tokens only, window < 0 over its chunk of -window positions; softcap
    > 0: scores capped (Gemma 2); sinks (heads,) fp32 on q's device: each head's attention sink (gpt-oss), or None."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and q.stride(2) == 1
    group = num_heads // num_kv_heads
    group_rows, block_d = max(MIN_DOT_ROWS, triton.next_power_of_2(group)), max(16, triton.next_power_of_2(head_dim))
    out = torch.empty_like(q)
    partitions, partition_len = context_partitions(num_seqs * num_kv_heads, block_tables.shape[-1] * block_size,
                                                   q.device)
    split = partitions > 1
    ws = torch.empty(num_seqs * num_kv_heads * partitions * group_rows * (block_d + 2) if split else 1,
                     dtype=torch.float32, device=q.device)
    counters = arrival_counters(q.device, num_seqs * num_kv_heads) if split else ws
    _launch_within_shared_memory(
        _decode_attention_kernel, (num_seqs, num_kv_heads, partitions),
        (q, k_cache, v_cache, out, block_tables, context_lens, sinks, ws, counters, scale, partition_len,
         *_shared_args(q, k_cache, out, block_tables)),
        dict(GROUP=group, GROUP_ROWS=group_rows, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size,
             BLOCK_N=BLOCK_N, PRECISION=_precision(q.dtype), WINDOW=window, SOFTCAP=float(softcap),
             HAS_SINKS=sinks is not None, SPLIT=split, **dependent_launch(q)))
    return out


def attention_stages() -> int:
    """How many tiles of keys and values the attention kernels' loops keep in flight (LCQ_ATTENTION_STAGES, default
    3: Triton's pipeliner copies the next two tiles with cp.async while one is attended; 1: each tile loaded when its
    turn comes, as before 2026-12-06). Without it, Triton 3.6's sm_90 builds loaded every tile in its own iteration
    and waited for it (no cp.async in the loops): at a 7B's batch-1 step each decode program walks a partition of 4
    tiles of 32 positions, each a wait on device memory. With it (head 128, strides specialized as at run time): the
    keys and values in 16-byte copies, the block table's slots in 4-byte ones a stage earlier; decode 86 -> 96
    registers, 13 -> 21 KB of shared memory, 293 -> 323 instructions a loop iteration; prefill (32 queries a program)
    140 -> 150 registers, 18 -> 27 KB, 427 -> 467. Not timed on a GPU."""
    return int(os.environ.get("LCQ_ATTENTION_STAGES", "3"))


_FITTING_STAGES: dict[tuple, int] = {}  # a build (kernel, device, dtypes, constants, stages asked) -> stages that fit


def _launch_within_shared_memory(kernel, grid: tuple, args: tuple, constants: dict) -> None:
    """kernel[grid](*args, **constants) with attention_stages() tiles in flight, or as many fewer as its build needs
    to fit the shared memory the GPU gives a block (Triton refuses the launch of a build that does not, OutOfResources).
    Builds by Triton 3.9 (bench/gpu_builds.py): fp32 prefill at head 256 takes 96 KB with one stage and 100 KB with
    three, over the 99 KB of sm_86, sm_89 and sm_120 cards, and at one stage still over a T4's 64 KB (as fp32 decode
    at head 256, 80 KB); fp16 and bf16 fit with three on every architecture from sm_75 (50 KB at most, 64 on sm_75).
    The choice is kept per build, so only a build's first launch tries the others."""
    q, k_cache = args[0], args[1]
    wanted = attention_stages()
    key = (kernel, q.device, q.dtype, k_cache.dtype, wanted, *constants.items())
    stages = _FITTING_STAGES.get(key, wanted)
    while True:
        try:
            kernel[grid](*args, **constants, STAGES=stages)
            break
        except OutOfResources:
            if stages == 1:
                raise
            stages -= 1
    _FITTING_STAGES[key] = stages


def context_partitions(groups: int, max_context: int, device: torch.device) -> tuple[int, int]:
    """How many partitions a decode step's attention splits each context into, and their length: enough
    programs for the GPU (PROGRAMS_PER_SM a multiprocessor; INTERPRETER_PROGRAMS in the interpreter) over
    `groups` (sequence, kv head) pairs, no more than the longest context's tiles. From the table's width, not
    the step's lengths, so that a CUDA graph's launch serves every length: at one sequence of a 7B model
    (32 kv heads) in a 2,048-token graph, 16 partitions of 128 positions on a 132-SM GPU."""
    tiles = max(1, triton.cdiv(max_context, BLOCK_N))
    programs = PROGRAMS_PER_SM * _multiprocessors(device.index or 0) if device.type == "cuda" \
        else INTERPRETER_PROGRAMS
    wanted = max(1, min(tiles, programs // max(groups, 1)))
    partition_len = triton.cdiv(tiles, wanted) * BLOCK_N
    return triton.cdiv(tiles * BLOCK_N, partition_len), partition_len


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      context_lens: torch.Tensor, query_start: torch.Tensor, max_query_len: int,
                      scale: float, window: int = 0, softcap: float = 0.0, sinks: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """q (T, heads, d): the new tokens of every sequence (cumulative counts query_start), already
    in the cache after their sequence's prefix -> (T, heads, d); window > 0: each over the last
    `window` positions up to its own, window < 0 over its chunk of -window positions up to its own;
    softcap > 0: scores capped (Gemma 2); sinks as decode_attention's."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and q.stride(2) == 1
    out = torch.empty_like(q)
    grid = (context_lens.shape[0], num_heads, triton.cdiv(max_query_len, BLOCK_M))
    _launch_within_shared_memory(
        _prefill_attention_kernel, grid,
        (q, k_cache, v_cache, out, block_tables, context_lens, query_start, sinks, scale,
         *_shared_args(q, k_cache, out, block_tables)),
        dict(GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
             BLOCK_SIZE=block_size, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PRECISION=_precision(q.dtype), WINDOW=window,
             SOFTCAP=float(softcap), HAS_SINKS=sinks is not None))
    return out
