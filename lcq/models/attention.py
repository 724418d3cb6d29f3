"""Paged attention: write the new tokens' K and V into the cache, then attend over each sequence's
cached tokens.

A step's cache layout is the same for every layer, so PagedAttention works it out once per
forward pass and every layer reuses it. CUDA tensors go to the Triton kernels in
lcq.kernels.paged_attention (imported only then, so CPU-only installs work without triton);
fp32 CPU activations with fp32, fp16 or int8 caches take the C kernels of lcq.kernels.cpu_ops (cache
writes, decode and prefill attention read through the block tables, no copy of the cache);
everything else takes the torch path here:
gather each sequence's cached K/V rows with one index and call F.scaled_dot_product_attention,
batching all sequences of a decode step together.

attend(..., window=W) with W > 0 is sliding-window attention (Gemma 3's local layers): the token at
position i sees the positions i - W + 1 .. i, and every path reads only those cache rows (the
kernels from the block or key tile where it begins); with W < 0 chunked attention (Llama 4's rotary
layers): the positions from i - i mod -W to i, its own chunk's; window 0 is full causal attention.
attend(..., softcap=C) with C > 0 caps every score to C * tanh(score / C) before the softmax (Gemma 2);
torch's fused kernels have no such step, so the torch path then writes the product out.
attend(..., sinks=S) gives query head h an attention sink (gpt-oss), one more key of score S[h] (never capped)
and value zero in its softmax: the kernels add exp(S[h] - the running max) to the softmax's sum once, where they
normalise, and the torch path writes the product out with the sink as one more column.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lcq.kernels import HAS_TRITON, cpu_ops

from .context import ForwardContext



def first_key(position, window: int):
    """The first cache position a query at `position` (an int or a tensor) sees: 0, the first of its
    sliding window (window > 0), or of its chunk of -window positions (window < 0)."""
    tensor = isinstance(position, torch.Tensor)
    if window > 0:
        return (position - window + 1).clamp_min(0) if tensor else max(0, position - window + 1)
    if window < 0:
        return (position.clamp_min(0) if tensor else max(0, position)) // -window * -window
    return position * 0


def _product(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float,
             causal: bool, softcap: float, sinks: torch.Tensor | None) -> torch.Tensor:
    """F.scaled_dot_product_attention of 4-D q (B, heads, L, d) over keys and values (B, kv_heads, S, d), or
    with softcap > 0 or sinks (heads,) the same written out: SDPA has neither the cap between the scores and
    the softmax nor a sink, here one more key of score sinks[h] (after the cap) and a zero value."""
    if not softcap and sinks is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, is_causal=causal,
                                              enable_gqa=keys.shape[1] != q.shape[1])
    group = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = q @ keys.transpose(-1, -2) * (scale / softcap if softcap else scale)
    if softcap:
        scores = torch.tanh(scores) * softcap
    if causal:  # SDPA's is_causal: query i sees keys 0 .. i
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    scores = scores.float()
    if sinks is not None:
        scores = torch.cat([scores, sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)], -1)
        values = F.pad(values, (0, 0, 0, 1))
    return torch.softmax(scores, -1).to(q.dtype) @ values


def _cache_values(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """x in the cache's dtype; a cache of a narrower range than the activations (fp16 of fp32 or bf16, fp8
    of fp16) saturates at its largest value (as the C and Triton writes do) rather than storing inf or NaN,
    which would turn the sequence's attention into NaN."""
    limit = torch.finfo(cache_dtype).max if cache_dtype.is_floating_point else None
    if limit is not None and limit < torch.finfo(x.dtype).max:
        x = x.clamp(-limit, limit)
    return x.to(cache_dtype)


class PagedAttention:
    """The cache reads and writes of one step. New token j of a sequence with n new tokens and
    context length L sits at position L - n + j and sees cache positions 0 .. L - n + j (or, with a
    sliding window of W, the last W of them)."""

    def __init__(self, context: ForwardContext, block_size: int, device: torch.device, dtype: torch.dtype,
                 cache_dtype: torch.dtype | None = None, query_scales: torch.Tensor | None = None):
        """dtype: the activations'; cache_dtype: the KV cache's (default: the same); query_scales (T,): each
        new token's queries are multiplied by its factor first (Ministral 3's temperature), or None."""
        self.context = context
        self.query_scales = None if query_scales is None else query_scales.to(dtype).view(-1, 1, 1)
        self.use_triton = device.type == "cuda" and HAS_TRITON
        self.use_cpu_ops = (device.type == "cpu" and dtype == torch.float32 and cpu_ops.usable()
                            and (cache_dtype or dtype) in cpu_ops.CACHE_DTYPES)
        if self.use_triton or self.use_cpu_ops:
            return
        if cache_dtype == torch.int8:
            raise ValueError("an int8 KV cache needs the C attention: an fp32 model on a CPU where the C kernels "
                             "build, with LCQ_CPU_OPS not 0")
        keep = context.slot_mapping >= 0
        self.write_rows = None if bool(keep.all()) else keep
        self.write_slots = context.slot_mapping if self.write_rows is None else context.slot_mapping[keep]
        # cache slot of every token of every sequence, (num_seqs, max_context_len); padding reads slot 0
        t = torch.arange(context.max_context_len, device=device)
        blocks = context.block_tables[:, : -(-context.max_context_len // block_size)].clamp_min(0).long()
        self.read_slots = blocks[:, t // block_size] * block_size + t % block_size
        self.window_reads = {}  # window -> the torch path's reads with it (_reads)

    def _reads(self, window: int):
        """What the torch path reads with a sliding window of `window` positions, or chunks of -window
        (0: none), worked out at a layer's first call and kept for the step's other layers. Decode: the
        slots (seqs, keys) and a mask of the keys each sequence sees, or None for all; prefill: per
        sequence (begin, end, first key, length, mask), mask None for causal from the first key or one
        query."""
        if window in self.window_reads:
            return self.window_reads[window]
        c, device = self.context, self.read_slots.device
        if not c.is_prefill:
            t = torch.arange(abs(window) or c.max_context_len, device=device)
            if window:  # each sequence's window or chunk, from its first position
                t = first_key(c.context_lens.long() - 1, window).unsqueeze(1) + t
            seen = t < c.context_lens.unsqueeze(1)
            slots = self.read_slots.gather(1, t.clamp_max(c.max_context_len - 1)) if window else self.read_slots
            self.window_reads[window] = slots, None if bool(seen.all()) else seen.view(len(seen), 1, 1, -1)
            return self.window_reads[window]
        starts = c.query_start.tolist()
        self.window_reads[window] = sequences = []
        for i, length in enumerate(c.context_lens.tolist()):
            begin, end = starts[i], starts[i + 1]
            n_new = end - begin
            first, mask = 0, None
            if window and first_key(length - 1, window) > 0:  # from the first new token's window (or chunk)
                first = first_key(length - n_new, window)  # on, each row its own
                if n_new > 1:
                    query_pos = torch.arange(length - n_new, length, device=device).unsqueeze(1)
                    key_pos = torch.arange(first, length, device=device).unsqueeze(0)
                    mask = (key_pos <= query_pos) & (key_pos >= first_key(query_pos, window))
            elif 1 < n_new < length:  # a cached prefix before a chunk of several tokens
                query_pos = torch.arange(length - n_new, length, device=device).unsqueeze(1)
                mask = query_pos >= torch.arange(length, device=device).unsqueeze(0)
            sequences.append((begin, end, first, length, mask))
        return sequences

    def rotate_and_write(self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, cos: torch.Tensor,
                         sin: torch.Tensor, interleaved: bool, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
        """On CUDA, layers.rotary_qkv's rotation of qkv (T, (heads + 2 kv_heads) d) in place and write's of its keys and
        values in one kernel (a decode step's launch a layer fewer); False, having done nothing, where that kernel
        does not take them (then rotary_qkv and write)."""
        if not (self.use_triton and qkv.dim() == 2 and qkv.stride(-1) == 1 and 2 * cos.shape[-1] <= head_dim
                and qkv.dtype in (torch.float16, torch.bfloat16, torch.float32)
                and cos.is_contiguous() and sin.is_contiguous()):
            return False
        from lcq.kernels.elementwise import fusing_steps
        if not fusing_steps():
            return False
        from lcq.kernels.paged_attention import rotary_store_kv
        rotary_store_kv(qkv, num_heads, num_kv_heads, head_dim, cos, sin, interleaved, k_cache, v_cache,
                        self.context.slot_mapping)
        return True

    def write(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """k, v (T, kv_heads, d) of the new tokens into their slots; slot -1 (padding) is skipped."""
        if self.use_triton:
            from lcq.kernels.paged_attention import store_kv
            return store_kv(k, v, k_cache, v_cache, self.context.slot_mapping)
        if self.use_cpu_ops:
            if k.stride(0) != v.stride(0):  # rows of two tensors (a partial rotary embedding rotated k apart)
                k, v = k.contiguous(), v.contiguous()
            return cpu_ops.store_kv(k, v, k_cache, v_cache, self.context.slot_mapping)
        if self.write_rows is not None:
            k, v = k[self.write_rows], v[self.write_rows]
        k_cache.view(-1, *k_cache.shape[2:])[self.write_slots] = _cache_values(k, k_cache.dtype)
        v_cache.view(-1, *v_cache.shape[2:])[self.write_slots] = _cache_values(v, v_cache.dtype)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
               window: int = 0, softcap: float = 0.0, sinks: torch.Tensor | None = None,
               temperature: bool = True) -> torch.Tensor:
        """q (T, heads, d) of the new tokens, whose K/V are already written -> (T, heads, d); window > 0:
        each token sees only the last `window` positions up to its own, window < 0 its chunk's of
        -window positions up to its own; softcap > 0: scores capped; sinks
        (heads,) fp32 on q's device: each head's attention sink (gpt-oss), or None; temperature: the
        queries scaled by query_scales where there are some (Llama 4: in its NoPE layers only)."""
        c = self.context
        if temperature and self.query_scales is not None:
            q = q * self.query_scales
        if self.use_triton:
            from lcq.kernels.paged_attention import decode_attention, prefill_attention
            if not c.is_prefill:
                return decode_attention(q, k_cache, v_cache, c.block_tables, c.context_lens, scale, window, softcap,
                                        sinks)
            return prefill_attention(q, k_cache, v_cache, c.block_tables, c.context_lens, c.query_start,
                                     c.max_query_len, scale, window, softcap, sinks)
        if self.use_cpu_ops:
            if c.is_prefill or c.batch_invariant:
                return cpu_ops.prefill_attention(q, k_cache, v_cache, c.block_tables, c.context_lens, c.query_start,
                                                 scale, window=window, softcap=softcap, sinks=sinks,
                                                 tile_every_query=c.batch_invariant)
            return cpu_ops.decode_attention(q, k_cache, v_cache, c.block_tables, c.context_lens, scale, window,
                                            softcap, sinks)
        if abs(window) >= c.max_context_len:  # a window or chunk past every context hides nothing
            window = 0
        k_rows, v_rows = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
        if not c.is_prefill:  # (S, kv_heads, keys, d) for all sequences at once
            slots, mask = self._reads(window)
            keys = k_rows[slots].transpose(1, 2).to(q.dtype)
            values = v_rows[slots].transpose(1, 2).to(q.dtype)
            return _product(q.unsqueeze(2), keys, values, mask, scale, False, softcap, sinks).squeeze(2)
        out = torch.empty_like(q)
        group = q.shape[1] // k_cache.shape[2]
        for i, (begin, end, first, length, mask) in enumerate(self._reads(window)):
            slots = self.read_slots[i, first:length]
            # K/V heads repeated for their query heads, and 4-D: torch then takes its fused (flash)
            # kernel; enable_gqa took the unfused one (3x slower at 256 tokens of SmolLM2 on a CPU)
            keys, values = (rows[slots].transpose(0, 1).repeat_interleave(group, 0).unsqueeze(0).to(q.dtype)
                            for rows in (k_rows, v_rows))
            out[begin:end] = _product(q[begin:end].transpose(0, 1).unsqueeze(0), keys, values, mask, scale,
                                      mask is None and end - begin > 1, softcap, sinks)[0].transpose(0, 1)
        return out
