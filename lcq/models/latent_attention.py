"""DeepSeek's multi-head latent attention (MLA: DeepSeek-V2 and V3, Moonlight, GLM-4.7-Flash), in its absorbed form.

Each token's keys and values come from one latent c (kv_rank values, normed) and a rotated key part r shared
by all heads: head h's key is [W_k[h] c, r] and its value W_v[h] c, where kv_b_proj = [W_k; W_v] per head.
Since q[h] . key[h] = (W_k[h]^T q_nope[h]) . c + q_rope[h] . r, the queries are taken into the latent's space
(one small product per head) and every head attends over the rows [c, r] themselves; a head's output, a
weighted sum of latents, becomes its value by W_v[h] after the attention. So the KV cache holds one row of
kv_rank + rope_dim values per token and layer (576 for DeepSeek-V2-Lite, where its 16 heads' keys and
values would take 5,120), and the paged attention paths run it unchanged: one KV head of that width whose
values are the keys' rows (the V cache is the K cache), the rotated part of each output left unused.
vLLM and SGLang serve MLA the same way. kv_b_proj stays in full precision (the quantizer does not pack it).
On CPU (fp32) what lies between the products and the attention is two C calls (cpu_ops.latent_queries,
latent_values), which the one-call decode step (cpu_decode.py) makes too.
"""
from __future__ import annotations

import ctypes
from typing import Callable

import torch

from lcq.kernels import cpu_ops

from .config import ModelConfig
from .layers import RMSNorm, apply_rotary


class LatentAttention(torch.nn.Module):
    def __init__(self, config: ModelConfig, prefix: str, make_linear: Callable[[list[str]], torch.nn.Module],
                 dtype: torch.dtype, index: int):
        super().__init__()
        dims = self.dims = config.latent
        self.num_heads = config.num_heads
        self.q_down = make_linear([f"{prefix}.q_a_proj"]) if dims.q_rank else None
        self.q_down_norm = RMSNorm(dims.q_rank, config.rms_norm_eps, dtype) if dims.q_rank else None
        self.q_proj = make_linear([f"{prefix}.q_b_proj" if dims.q_rank else f"{prefix}.q_proj"])
        self.kv_down = make_linear([f"{prefix}.kv_a_proj_with_mqa"])
        self.kv_norm = RMSNorm(dims.kv_rank, config.rms_norm_eps, dtype)
        # kv_b_proj by head: the keys' part (heads, nope_dim, kv_rank) and the values' (heads, value_dim, kv_rank)
        self.key_up = torch.nn.Parameter(torch.empty(self.num_heads, dims.nope_dim, dims.kv_rank, dtype=dtype),
                                         requires_grad=False)
        self.value_up = torch.nn.Parameter(torch.empty(self.num_heads, dims.value_dim, dims.kv_rank, dtype=dtype),
                                           requires_grad=False)
        self.o_proj = make_linear([f"{prefix}.o_proj"])
        self.scale = config.query_scale
        self.interleaved_rotary = config.rotary_interleaved
        self.window = config.attention_windows[index]
        self.k_cache = self.v_cache = torch.empty(0)
        self._c_layer = cpu_ops.BuiltOnce(self._build_c_layer)

    def c_layer(self) -> cpu_ops.LatentLayer | None:
        """This layer for the C kernels (cpu_ops.latent_queries and latent_values, the one-call decode step), where
        they run it: fp32 on CPU, its three input projections keeping indices or an fp16 copy; built at its
        first call."""
        return self._c_layer.get()

    def _build_c_layer(self) -> tuple[cpu_ops.LatentLayer, list] | None:
        norms = [self.kv_norm.weight, None if self.q_down_norm is None else self.q_down_norm.weight]
        tensors = [self.key_up, self.value_up, *(n for n in norms if n is not None)]
        if not cpu_ops.usable(*tensors) or not all(t.is_contiguous() for t in tensors):
            return None
        projections = cpu_ops.linear_table([self.q_down, self.q_proj, self.kv_down])
        if projections is None:
            return None
        table, weights = projections
        d = self.dims
        layer = cpu_ops.LatentLayer(heads=self.num_heads, kv_rank=d.kv_rank, q_rank=d.q_rank, nope_dim=d.nope_dim,
                                    rope_dim=d.rope_dim, value_dim=d.value_dim,
                                    interleaved=int(self.interleaved_rotary), eps=self.kv_norm.eps,
                                    q_down_norm=None if norms[1] is None else norms[1].data_ptr(),
                                    kv_norm=norms[0].data_ptr(), key_up=self.key_up.data_ptr(),
                                    value_up=self.value_up.data_ptr(), projections=ctypes.addressof(table))
        return layer, [*tensors, *weights, table]

    def load_up_projection(self, weight: torch.Tensor) -> None:
        """kv_b_proj's weight (heads x (nope_dim + value_dim), kv_rank) into key_up and value_up."""
        rows = weight.view(self.num_heads, self.dims.nope_dim + self.dims.value_dim, self.dims.kv_rank)
        self.key_up.copy_(rows[:, :self.dims.nope_dim])
        self.value_up.copy_(rows[:, self.dims.nope_dim:])

    def forward(self, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attention) -> torch.Tensor:
        """hidden (T, hidden_size) -> (T, hidden_size), the new tokens' cache rows written on the way."""
        dims = self.dims
        queries = hidden if self.q_down is None else self.q_down_norm(self.q_down(hidden))[0]
        queries = self.q_proj(queries).view(-1, self.num_heads, dims.nope_dim + dims.rope_dim)
        compressed = self.kv_down(hidden)
        if (layer := self.c_layer()) is not None and cpu_ops.usable(queries, compressed):  # in two C calls
            queries, rows = cpu_ops.latent_queries(layer, queries, compressed, *rope)
            attention.write(rows, rows, self.k_cache, self.v_cache)
            out = attention.attend(queries, self.k_cache, self.v_cache, self.scale, self.window)
            return self.o_proj(cpu_ops.latent_values(layer, out))
        q_nope, q_rope = queries.split([dims.nope_dim, dims.rope_dim], dim=-1)
        latent = self.kv_norm(compressed[:, :dims.kv_rank])[0]
        k_rope = apply_rotary(compressed[:, None, dims.kv_rank:], *rope, self.interleaved_rotary)
        q_latent = torch.bmm(q_nope.transpose(0, 1), self.key_up).transpose(0, 1)  # (T, heads, kv_rank)
        queries = torch.cat([q_latent, apply_rotary(q_rope, *rope, self.interleaved_rotary)], dim=-1)
        rows = torch.cat([latent.unsqueeze(1), k_rope], dim=-1)  # (T, 1, kv_rank + rope_dim)
        attention.write(rows, rows, self.k_cache, self.v_cache)
        out = attention.attend(queries, self.k_cache, self.v_cache, self.scale, self.window)
        values = torch.bmm(out[..., :dims.kv_rank].transpose(0, 1), self.value_up.transpose(1, 2))
        return self.o_proj(values.transpose(0, 1).reshape(-1, self.num_heads * dims.value_dim))
