"""Qwen3.5's linear attention (Gated DeltaNet): a fixed-size state per sequence in place of a KV cache.

For each token the projected queries, keys and values pass a short causal convolution (one filter of
conv_kernel taps per channel) and SiLU; queries and keys are L2-normalized per head, the queries also
scaled by head_k_dim^-0.5. Each value head keeps a state S (head_k_dim x head_v_dim) that decays by
exp(g) and is corrected towards the token's value by the delta rule, S += k (beta (v - S^T k))^T; the
head's output is S^T q. g (<= 0) and beta (0..1) come from two small projections. The outputs are
RMS-normalized per head, times silu(z) (a fourth projection), and projected back by out_proj.

A sequence's state (recurrent.py) is its convolution's last conv_kernel - 1 inputs and S per value head; a
prompt (or its chunk) takes the chunkwise form of the recurrence: within CHUNK tokens in matrix products,
from chunk to chunk through S (equal to the token-by-token form but for rounding).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from lcq.kernels import cpu_ops

from .config import ModelConfig
from .recurrent import CHUNK, RecurrentMixer, in_chunks, parameter, within_chunk_decays


class GatedDeltaNet(RecurrentMixer):
    CHECKPOINT_NAME = "linear_attn"
    # (the gated norm multiplies by its w itself, not 1 + w)
    TENSORS = {"conv_weight": "conv1d.weight", "decay_log": "A_log", "dt_bias": "dt_bias", "norm_weight": "norm.weight"}

    def __init__(self, config: ModelConfig, prefix: str, make_linear: Callable[[list[str]], torch.nn.Module],
                 dtype: torch.dtype):
        dims = config.linear
        super().__init__(dims.conv_dim, dims.conv_kernel, (dims.num_v_heads, dims.head_k_dim, dims.head_v_dim), dtype)
        self.dims = dims
        # q, k and v (the convolution's channels), z, b and a: one product of the hidden state
        self.in_proj = make_linear([f"{prefix}.in_proj_qkv", f"{prefix}.in_proj_z", f"{prefix}.in_proj_b",
                                    f"{prefix}.in_proj_a"])
        self.out_proj = make_linear([f"{prefix}.out_proj"])
        # A_log: g = -exp(A_log) softplus(a + dt_bias)
        self.decay_log = parameter(dims.num_v_heads, dtype=torch.float32)
        self.dt_bias = parameter(dims.num_v_heads, dtype=torch.float32)
        self.norm_weight = parameter(dims.head_v_dim, dtype=dtype)
        self.eps = config.rms_norm_eps

    def split(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k and v (the convolution's input); z, b and a."""
        return projected.split([self.dims.conv_dim, projected.shape[-1] - self.dims.conv_dim], dim=-1)

    def recur(self, convolved: torch.Tensor, rest: torch.Tensor, state: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs (B, T, v_heads, head_v_dim): the delta rule's, token by token or chunkwise."""
        decay, beta = (x.transpose(1, 2) for x in self._gates(rest))
        q, k, v = (x.transpose(1, 2) for x in self._heads(convolved))
        recurrence = _token_by_token if convolved.shape[1] == 1 else _chunkwise
        out, state = recurrence(q, k, v, decay, beta, state)
        return out.transpose(1, 2), state

    def output(self, out: torch.Tensor, rest: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Each head's output RMS-normalized, times its weight and silu(z)."""
        d = self.dims
        z = rest[..., :d.num_v_heads * d.head_v_dim]
        if cpu_ops.usable(out, z, self.norm_weight):  # in one C call
            return cpu_ops.gated_group_norm(out.flatten(1), z, self.norm_weight, d.head_v_dim, self.eps,
                                            gate_first=False)
        normed = F.rms_norm(out.to(dtype).float(), (d.head_v_dim,), eps=self.eps).to(dtype) * self.norm_weight
        gated = normed * F.silu(z.unflatten(-1, (d.num_v_heads, d.head_v_dim)).float())
        return gated.to(dtype).flatten(1)

    def c_fields(self) -> dict[str, int | float | torch.Tensor | None]:
        d = self.dims
        return dict(kind=cpu_ops.RECURRENT_KINDS.index("delta"), heads=d.num_v_heads, head_dim=d.head_v_dim,
                    groups=d.num_k_heads, state_dim=d.head_k_dim, eps=self.eps, decay=-self.decay_log.exp(),
                    dt_bias=self.dt_bias, norm_weight=self.norm_weight)

    def in_width(self) -> int:
        return self.dims.conv_dim + self.out_width() + 2 * self.dims.num_v_heads

    def out_width(self) -> int:
        return self.dims.num_v_heads * self.dims.head_v_dim

    def _gates(self, rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each value head's log decay, -exp(A_log) softplus(a + dt_bias), and its beta, sigmoid(b): fp32 (...,
        v_heads), from the projection's rest (z, b, a)."""
        d = self.dims
        _, b, a = rest.split([d.num_v_heads * d.head_v_dim, d.num_v_heads, d.num_v_heads], dim=-1)
        return -self.decay_log.exp() * F.softplus(a.float() + self.dt_bias), b.sigmoid().float()

    def _heads(self, convolved: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (L2-normalized, q scaled, repeated for their value heads) and v, fp32 (..., v_heads, dim), from
        the convolution's output (..., conv_dim)."""
        d = self.dims
        key_width = d.num_k_heads * d.head_k_dim
        q, k, v = F.silu(convolved).float().split([key_width, key_width, d.num_v_heads * d.head_v_dim], dim=-1)

        def normalized(x: torch.Tensor) -> torch.Tensor:  # per key head, repeated for its value heads
            x = x.unflatten(-1, (d.num_k_heads, d.head_k_dim))
            x = x * torch.rsqrt(x.square().sum(-1, keepdim=True) + 1e-6)
            return x.repeat_interleave(d.num_v_heads // d.num_k_heads, dim=-2)

        return normalized(q) * d.head_k_dim ** -0.5, normalized(k), v.unflatten(-1, (d.num_v_heads, d.head_v_dim))


def _token_by_token(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, beta: torch.Tensor,
                    state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence over tokens: q, k (B, heads, T, dk), v (B, heads, T, dv), decay and beta (B, heads, T),
    state (B, heads, dk, dv) -> (outputs (B, heads, T, dv), the state after the last token)."""
    outputs = []
    for t in range(q.shape[2]):
        state = state * decay[:, :, t, None, None].exp()
        key = k[:, :, t, :, None]
        remembered = (state * key).sum(-2)
        state = state + key * ((v[:, :, t] - remembered) * beta[:, :, t, None]).unsqueeze(-2)
        outputs.append((state * q[:, :, t, :, None]).sum(-2))
    return torch.stack(outputs, dim=2), state


def _chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, beta: torch.Tensor,
               state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """_token_by_token's result in chunks of CHUNK tokens. Within a chunk, with cumulative decays c and
    D_ij = exp(c_i - c_j) for j <= i: the delta rule's corrections u solve (I + strictly_lower(beta k k^T D))
    u = beta v, the keys that read the state before the chunk likewise, so that each chunk reads the
    state once and updates it once."""
    length = q.shape[2]
    q, k, v, decay, beta = in_chunks((q, k, v, decay, beta), CHUNK)
    cumulative = decay.cumsum(-1)
    decays = within_chunk_decays(cumulative)
    k_beta = k * beta.unsqueeze(-1)
    system = (k_beta @ k.transpose(-1, -2)) * decays  # its diagonal is taken as 1 (unitriangular)
    corrections = torch.linalg.solve_triangular(system, v * beta.unsqueeze(-1), upper=False, unitriangular=True)
    read_keys = torch.linalg.solve_triangular(system, k_beta * cumulative.exp().unsqueeze(-1), upper=False,
                                              unitriangular=True)
    within = (q @ k.transpose(-1, -2)) * decays
    q_decayed = q * cumulative.exp().unsqueeze(-1)
    k_decayed = k * (cumulative[..., -1:] - cumulative).exp().unsqueeze(-1)
    outputs = []
    for i in range(q.shape[2]):
        new = corrections[:, :, i] - read_keys[:, :, i] @ state
        outputs.append(q_decayed[:, :, i] @ state + within[:, :, i] @ new)
        state = state * cumulative[:, :, i, -1, None, None].exp() + k_decayed[:, :, i].transpose(-1, -2) @ new
    return torch.stack(outputs, dim=2).flatten(2, 3)[:, :, :length], state
