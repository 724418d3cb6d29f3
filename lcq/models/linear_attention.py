"""Qwen3.5's linear attention (Gated DeltaNet): a fixed-size state per sequence in place of a KV cache.

For each token the projected queries, keys and values pass a short causal convolution (one filter of
conv_kernel taps per channel) and SiLU; queries and keys are L2-normalized per head, the queries also
scaled by head_k_dim^-0.5. Each value head keeps a state S (head_k_dim x head_v_dim) that decays by
exp(g) and is corrected towards the token's value by the delta rule, S += k (beta (v - S^T k))^T; the
head's output is S^T q. g (<= 0) and beta (0..1) come from two small projections. The outputs are
RMS-normalized per head, times silu(z) (a fourth projection), and projected back by out_proj.

A sequence's state is its convolution's last conv_kernel - 1 inputs and S per value head, held in one
slot of the layer's state tensors (the block manager hands a slot to each running sequence). A step
that begins at a sequence's first token starts it from zeros. Decode steps advance every sequence by
one token at once; a prompt (or its chunk) takes the chunkwise form of the same recurrence: within
CHUNK tokens in matrix products, from chunk to chunk through S (equal to the token-by-token form but
for rounding).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .config import ModelConfig

CHUNK = 64  # tokens of a prompt's recurrence computed together


class GatedDeltaNet(torch.nn.Module):
    def __init__(self, config: ModelConfig, prefix: str, make_linear: Callable[[list[str]], torch.nn.Module],
                 dtype: torch.dtype):
        super().__init__()
        dims = self.dims = config.linear
        # q, k and v (the convolution's channels), z, b and a: one product of the hidden state
        self.in_proj = make_linear([f"{prefix}.in_proj_qkv", f"{prefix}.in_proj_z", f"{prefix}.in_proj_b",
                                    f"{prefix}.in_proj_a"])
        self.out_proj = make_linear([f"{prefix}.out_proj"])

        def parameter(*shape: int, kind: torch.dtype = dtype) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.empty(*shape, dtype=kind), requires_grad=False)

        self.conv_weight = parameter(dims.conv_dim, dims.conv_kernel)
        self.decay_log = parameter(dims.num_v_heads, kind=torch.float32)  # A_log: g = -exp(A_log) softplus(a + dt_bias)
        self.dt_bias = parameter(dims.num_v_heads, kind=torch.float32)
        self.norm_weight = parameter(dims.head_v_dim)
        self.eps = config.rms_norm_eps
        self.conv_states = self.recurrent_states = torch.empty(0)  # bind_states

    def load(self, tensor: Callable[[str], torch.Tensor]) -> None:
        """The layer's own parameters, by their names under linear_attn (tensor(name) reads one)."""
        self.conv_weight.copy_(tensor("conv1d.weight").reshape(self.conv_weight.shape))
        self.decay_log.copy_(tensor("A_log"))
        self.dt_bias.copy_(tensor("dt_bias"))
        self.norm_weight.copy_(tensor("norm.weight"))  # the gated norm multiplies by w itself, not 1 + w

    def bind_states(self, slots: int, device: torch.device) -> int:
        """State tensors of `slots` sequences (zeros); returns their bytes."""
        d = self.dims
        self.conv_states = torch.zeros(slots, d.conv_dim, d.conv_kernel - 1, dtype=self.conv_weight.dtype,
                                       device=device)
        self.recurrent_states = torch.zeros(slots, d.num_v_heads, d.head_k_dim, d.head_v_dim, device=device)
        return self.conv_states.nbytes + self.recurrent_states.nbytes

    def copy_state(self, source: int, target: int) -> None:
        """Slot `target`'s states made those of slot `source` (a prefix's snapshot kept, or taken up again)."""
        self.conv_states[target] = self.conv_states[source]
        self.recurrent_states[target] = self.recurrent_states[source]

    def forward(self, hidden: torch.Tensor, rope, attention) -> torch.Tensor:
        """hidden (T, hidden_size) -> (T, hidden_size), each sequence's state advanced past its new tokens."""
        d, context = self.dims, attention.context
        mixed, z, b, a = self.in_proj(hidden).split([d.conv_dim, d.num_v_heads * d.head_v_dim, d.num_v_heads,
                                                     d.num_v_heads], dim=-1)
        beta = b.sigmoid().float()
        decay = -self.decay_log.exp() * F.softplus(a.float() + self.dt_bias)
        if context.is_prefill:
            out = torch.cat([self._sequence(mixed[begin:end], decay[begin:end], beta[begin:end], slot, fresh)
                             for begin, end, slot, fresh in _sequences(context)])
        else:
            out = self._step(mixed, decay, beta, context.state_slots)
        out = out.to(hidden.dtype)
        normed = F.rms_norm(out.float(), (d.head_v_dim,), eps=self.eps).to(hidden.dtype) * self.norm_weight
        gated = normed * F.silu(z.unflatten(-1, (d.num_v_heads, d.head_v_dim)).float())
        return self.out_proj(gated.to(hidden.dtype).flatten(1))

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

    def _step(self, mixed: torch.Tensor, decay: torch.Tensor, beta: torch.Tensor, slots: torch.Tensor
              ) -> torch.Tensor:
        """One new token of each sequence (rows of mixed), through its slot's state."""
        window = torch.cat([self.conv_states[slots], mixed.unsqueeze(-1).to(self.conv_states.dtype)], dim=-1)
        self.conv_states[slots] = window[..., 1:]
        q, k, v = (x.unsqueeze(2) for x in self._heads((window * self.conv_weight).sum(-1)))
        out, self.recurrent_states[slots] = _token_by_token(q, k, v, decay.unsqueeze(-1), beta.unsqueeze(-1),
                                                            self.recurrent_states[slots])
        return out[:, :, 0]

    def _sequence(self, mixed: torch.Tensor, decay: torch.Tensor, beta: torch.Tensor, slot: int, fresh: bool
                  ) -> torch.Tensor:
        """The new tokens (rows of mixed) of one sequence, from its slot's state or (fresh) from zeros."""
        if fresh:
            self.conv_states[slot] = 0
            self.recurrent_states[slot] = 0
        window = torch.cat([self.conv_states[slot], mixed.t().to(self.conv_states.dtype)], dim=-1)
        self.conv_states[slot] = window[:, window.shape[1] - self.conv_states.shape[-1]:]
        convolved = F.conv1d(window.unsqueeze(0), self.conv_weight.unsqueeze(1), groups=self.dims.conv_dim)[0]
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in self._heads(convolved.t()))
        recurrence = _token_by_token if len(mixed) == 1 else _chunkwise
        out, state = recurrence(q, k, v, decay.t().unsqueeze(0), beta.t().unsqueeze(0),
                                self.recurrent_states[slot].unsqueeze(0))
        self.recurrent_states[slot] = state[0]
        return out[0].transpose(0, 1)


def _sequences(context) -> list[tuple[int, int, int, bool]]:
    """(first row, end row, state slot, whether it starts at the sequence's first token) per sequence."""
    starts, lengths = context.query_start.tolist(), context.context_lens.tolist()
    return [(begin, end, slot, length == end - begin)
            for begin, end, length, slot in zip(starts, starts[1:], lengths, context.state_slots.tolist())]


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
    pad = -length % CHUNK

    def chunked(x: torch.Tensor) -> torch.Tensor:  # (B, heads, T, ...) -> (B, heads, chunks, CHUNK, ...)
        widths = (0, 0) * (x.dim() - 3) + (0, pad)
        return F.pad(x, widths).unflatten(2, (-1, CHUNK))

    q, k, v, decay, beta = (chunked(x) for x in (q, k, v, decay, beta))
    cumulative = decay.cumsum(-1)
    lower = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).tril()
    decays = (cumulative.unsqueeze(-1) - cumulative.unsqueeze(-2)).masked_fill(~lower, float("-inf")).exp()
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
