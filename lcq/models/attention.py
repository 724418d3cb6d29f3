"""Paged attention: write the new tokens' K and V into the cache, then attend over each sequence's
cached tokens. CUDA tensors go to the Triton kernels in lcq.kernels.paged_attention (imported only
then, so CPU-only installs work without triton); everything else takes the torch path here."""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from .context import ForwardContext

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and _HAS_TRITON


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v (T, kv_heads, d) into their slots; slot -1 (padding) is skipped."""
    if _use_triton(k):
        from lcq.kernels.paged_attention import store_kv
        return store_kv(k, v, k_cache, v_cache, slot_mapping)
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first `length` cached tokens, (length, kv_heads, d)."""
    block_size = cache.shape[1]
    blocks = block_table[: -(-length // block_size)]
    return cache[blocks].reshape(-1, *cache.shape[2:])[:length]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context: ForwardContext,
                    scale: float) -> torch.Tensor:
    """q (T, heads, d) of the new tokens -> (T, heads, d). New token j of a sequence with n new tokens
    and context length L sits at position L - n + j and sees cache positions 0 .. L - n + j."""
    if _use_triton(q):
        from lcq.kernels.paged_attention import decode_attention, prefill_attention
        if not context.is_prefill:
            return decode_attention(q, k_cache, v_cache, context.block_tables, context.context_lens, scale)
        return prefill_attention(q, k_cache, v_cache, context.block_tables, context.context_lens,
                                 context.query_start, context.max_query_len, scale)
    if not context.is_prefill:
        return _decode(q, k_cache, v_cache, context, scale)
    out = torch.empty_like(q)
    starts = context.query_start.tolist()
    lengths = context.context_lens.tolist()
    for i, length in enumerate(lengths):
        begin, end = starts[i], starts[i + 1]
        keys = _gather(k_cache, context.block_tables[i], length).transpose(0, 1)
        values = _gather(v_cache, context.block_tables[i], length).transpose(0, 1)
        queries = q[begin:end].transpose(0, 1)
        n_new = end - begin
        mask = None
        if n_new > 1:
            query_pos = torch.arange(length - n_new, length, device=q.device).unsqueeze(1)
            mask = query_pos >= torch.arange(length, device=q.device).unsqueeze(0)
        out[begin:end] = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=True).transpose(0, 1)
    return out


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context: ForwardContext,
            scale: float) -> torch.Tensor:
    """One new token per sequence: gather every sequence's blocks at once, mask beyond its length."""
    num_seqs, block_size = q.shape[0], k_cache.shape[1]
    max_blocks = -(-context.max_context_len // block_size)
    tables = context.block_tables[:, :max_blocks].clamp_min(0)
    keys = k_cache[tables].reshape(num_seqs, max_blocks * block_size, *k_cache.shape[2:]).transpose(1, 2)
    values = v_cache[tables].reshape(num_seqs, max_blocks * block_size, *v_cache.shape[2:]).transpose(1, 2)
    positions = torch.arange(max_blocks * block_size, device=q.device)
    mask = (positions.unsqueeze(0) < context.context_lens.unsqueeze(1)).view(num_seqs, 1, 1, -1)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(2)
