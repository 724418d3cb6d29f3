"""Mamba-2, the state space layer of Granite 4.0-H: a fixed-size state per sequence in place of a KV cache.

in_proj gives each token a gate z, the inputs x of num_heads heads with the groups' B and C, and a time step
per head. x, B and C pass a short causal convolution (with a bias) and SiLU; dt = softplus(its step + dt_bias),
clamped to time_step_limit. Each head keeps a state H (state_dim x head_dim) that decays by exp(dt A)
(A = -exp(A_log) < 0) and takes B (dt x)^T; its output is H^T C + D x, where B and C are its group's. That is
linear attention with B for keys, dt x for values and C for queries, decayed per head. The outputs times
silu(z) are RMS-normalized per group (each groups-th of the heads), times the norm's weight (Falcon-H1's may
be normed before the gate, or not at all), and projected back by out_proj. A prompt (or its chunk) takes the recurrence chunkwise (recurrent.py holds the states).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from lcq.kernels import cpu_ops

from .config import ModelConfig
from .recurrent import CHUNK, RecurrentMixer, in_chunks, parameter, within_chunk_decays

class Mamba2(RecurrentMixer):
    CHECKPOINT_NAME = "mamba"
    TENSORS = {"conv_weight": "conv1d.weight", "conv_bias": "conv1d.bias", "decay_log": "A_log", "dt_bias": "dt_bias",
               "skip": "D", "norm_weight": "norm.weight"}

    def __init__(self, config: ModelConfig, prefix: str, make_linear: Callable[[list[str]], torch.nn.Module],
                 dtype: torch.dtype):
        dims = config.mamba
        super().__init__(dims.conv_dim, dims.conv_kernel, (dims.num_heads, dims.state_dim, dims.head_dim), dtype,
                         conv_bias=dims.conv_bias)
        self.dims = dims
        self.in_proj = make_linear([f"{prefix}.in_proj"])  # z, then x, B and C (the convolution's), then dt
        self.out_proj = make_linear([f"{prefix}.out_proj"])
        self.decay_log = parameter(dims.num_heads, dtype=torch.float32)  # A_log
        self.dt_bias = parameter(dims.num_heads, dtype=torch.float32)
        self.skip = parameter(dims.num_heads, dtype=torch.float32)  # D
        self.norm_weight = parameter(dims.inner, dtype=dtype) if dims.norm != "none" else None
        self.eps = config.rms_norm_eps

    def split(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x, B and C (the convolution's input); z and dt."""
        d = self.dims
        z, convolved, dt = projected.split([d.inner, d.conv_dim, d.num_heads], dim=-1)
        return convolved, torch.cat([z, dt], dim=-1)

    def recur(self, convolved: torch.Tensor, rest: torch.Tensor, state: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs (B, T, heads, head_dim): token by token, or chunkwise."""
        d = self.dims
        x, keys, queries, dt = self._inputs(convolved, rest)
        keys, queries = (part.repeat_interleave(d.num_heads // d.groups, dim=-2) for part in (keys, queries))
        log_decay = dt * -self.decay_log.exp()
        q, k, v = (part.transpose(1, 2) for part in (queries, keys, x * dt.unsqueeze(-1)))
        recurrence = _token_by_token if convolved.shape[1] == 1 else _chunkwise
        out, state = recurrence(q, k, v, log_decay.transpose(1, 2), state)
        return out.transpose(1, 2) + self.skip.unsqueeze(-1) * x, state

    def c_fields(self) -> dict[str, int | float | torch.Tensor | None]:
        d = self.dims
        return dict(kind=cpu_ops.RECURRENT_KINDS.index("mamba"), heads=d.num_heads, head_dim=d.head_dim,
                    groups=d.groups, state_dim=d.state_dim, norm=cpu_ops.NORMS.index(d.norm), eps=self.eps,
                    dt_min=d.time_step_limit[0], dt_max=d.time_step_limit[1], decay=-self.decay_log.exp(),
                    dt_bias=self.dt_bias, skip=self.skip, norm_weight=self.norm_weight)

    def in_width(self) -> int:
        return self.dims.inner + self.dims.conv_dim + self.dims.num_heads

    def out_width(self) -> int:
        return self.dims.inner

    def _inputs(self, convolved: torch.Tensor, rest: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (..., heads, head_dim), B and C (..., groups, state_dim) from the convolution's output, fp32, and dt
        (..., heads): softplus(its step + dt_bias), clamped."""
        d = self.dims
        x, keys, queries = F.silu(convolved.float()).split([d.inner, d.groups * d.state_dim, d.groups * d.state_dim],
                                                           dim=-1)
        dt = F.softplus(rest[..., d.inner:].float() + self.dt_bias).clamp(*d.time_step_limit)
        return (x.unflatten(-1, (d.num_heads, d.head_dim)), keys.unflatten(-1, (d.groups, d.state_dim)),
                queries.unflatten(-1, (d.groups, d.state_dim)), dt)

    def output(self, out: torch.Tensor, rest: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The outputs times silu(z), RMS-normalized per group and times the norm's weight (dims.norm: after the
        gate, before it, or not at all)."""
        d = self.dims
        if d.norm != "none" and cpu_ops.usable(out, rest, self.norm_weight):  # in one C call
            return cpu_ops.gated_group_norm(out.flatten(1), rest[..., :d.inner], self.norm_weight, d.inner // d.groups,
                                            self.eps, gate_first=d.norm == "gated")
        out, gate = out.flatten(1), F.silu(rest[..., :d.inner].float())
        if d.norm == "none":
            return (out * gate).to(dtype)
        normed = out if d.norm == "before_gate" else out * gate
        normed = F.rms_norm(normed.unflatten(-1, (d.groups, -1)), (d.inner // d.groups,), eps=self.eps).flatten(1)
        normed = (normed.to(dtype) * self.norm_weight).to(dtype)
        return normed if d.norm == "gated" else (normed.float() * gate).to(dtype)


def _token_by_token(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                    state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence over tokens: q, k (B, heads, T, state_dim), v (B, heads, T, head_dim), log_decay (B, heads,
    T), state (B, heads, state_dim, head_dim) -> (outputs (B, heads, T, head_dim), the state after the last)."""
    outputs = []
    for t in range(q.shape[2]):
        state = state * log_decay[:, :, t, None, None].exp() + k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append((state * q[:, :, t, :, None]).sum(-2))
    return torch.stack(outputs, dim=2), state


def _chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, state: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """_token_by_token's result in chunks of CHUNK tokens: within a chunk, with cumulative log decays c, token
    i reads token j <= i by (q_i . k_j) exp(c_i - c_j) and the state before the chunk by exp(c_i); the chunk
    then updates the state once."""
    length = q.shape[2]
    q, k, v, log_decay = in_chunks((q, k, v, log_decay), CHUNK)
    cumulative = log_decay.cumsum(-1)
    decays = within_chunk_decays(cumulative)
    within = (q @ k.transpose(-1, -2)) * decays
    q_decayed = q * cumulative.exp().unsqueeze(-1)
    k_decayed = k * (cumulative[..., -1:] - cumulative).exp().unsqueeze(-1)
    outputs = []
    for i in range(q.shape[2]):
        outputs.append(q_decayed[:, :, i] @ state + within[:, :, i] @ v[:, :, i])
        state = state * cumulative[:, :, i, -1, None, None].exp() + k_decayed[:, :, i].transpose(-1, -2) @ v[:, :, i]
    return torch.stack(outputs, dim=2).flatten(2, 3)[:, :, :length], state
