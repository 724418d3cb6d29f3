"""Token mixers with a fixed-size state per sequence in place of a KV cache: what Qwen3.5's linear attention
(linear_attention.py) and Mamba-2 (mamba.py) share.

Both project each token once (in_proj), pass part of it through a short causal convolution (conv_kernel taps
per channel), advance a recurrent state per sequence by the convolved values, and project the gated result
back (out_proj). A sequence's state is its convolution's last conv_kernel - 1 inputs and the recurrent state,
held in one slot of the layer's state tensors (the block manager hands a slot to each running sequence, and
keeps prompts' states in others for prefix caching). A step that begins at a sequence's first token starts
it from zeros. Decode steps advance every sequence by one token at once; a prompt (or its chunk) takes its
tokens together, in the mixer's chunkwise form of the recurrence. On CPU (fp32 states) a decode step from the
input projection's output to the output projection's input is one C call (cpu_ops.recurrent_step), in place in
the slots: torch's operations copied every state out of its slot and back and made several passes over it, and
the one-call decode step of the whole model (cpu_decode.py) calls the same function.
"""
from __future__ import annotations

import math

from typing import Callable

import torch
import torch.nn.functional as F

from lcq.kernels import cpu_ops

CHUNK = 64  # tokens of a prompt's recurrence computed together


class RecurrentMixer(torch.nn.Module):
    """A mixer's convolution and its per-sequence states. Subclasses name their checkpoint module
    (CHECKPOINT_NAME) and the tensors they read from it (TENSORS), split the projection (split), advance the
    recurrence over (sequences, tokens) rows (recur), make the output of it (output), and say what the C decode
    step reads of them (c_fields)."""

    CHECKPOINT_NAME: str  # its module in a decoder layer
    TENSORS: dict[str, str]  # its own parameters (beside in_proj and out_proj) -> their names under that module

    def __init__(self, conv_dim: int, conv_kernel: int, state_shape: tuple[int, ...], dtype: torch.dtype,
                 conv_bias: bool = False):
        super().__init__()
        self.conv_weight = parameter(conv_dim, conv_kernel, dtype=dtype)
        self.conv_bias = parameter(conv_dim, dtype=dtype) if conv_bias else None
        self.state_shape = state_shape  # one sequence's recurrent state
        self.conv_states = self.recurrent_states = torch.empty(0)  # bind_states
        # Per slot verifying drafts: its states after each of the step's tokens, until keep_states
        self.drafted: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._c_layer = cpu_ops.BuiltOnce(self._build_c_layer)  # again once the states are bound

    def load(self, tensor: Callable[[str], torch.Tensor]) -> None:
        """The mixer's own parameters (TENSORS; the convolution's filters stored (conv_dim, 1, kernel)), by their
        names under its checkpoint module (tensor(name) reads one); a bias it does not have is not read."""
        for attribute, name in self.TENSORS.items():
            parameter = getattr(self, attribute)
            if parameter is not None:
                parameter.copy_(tensor(name).reshape(parameter.shape))

    def state_bytes(self, slots: int, dtype: torch.dtype = torch.float32) -> int:
        """What bind_states(slots, ..., dtype) will allocate, before it does."""
        conv_dim, kernel = self.conv_weight.shape
        return slots * (conv_dim * (kernel - 1) * self.conv_weight.element_size()
                        + math.prod(self.state_shape) * dtype.itemsize)

    def bind_states(self, slots: int, device: torch.device, dtype: torch.dtype = torch.float32) -> int:
        """State tensors of `slots` sequences (zeros), the recurrent ones in `dtype` (each step computes in fp32
        and stores in it); returns their bytes."""
        conv_dim, kernel = self.conv_weight.shape
        self.conv_states = torch.zeros(slots, conv_dim, kernel - 1, dtype=self.conv_weight.dtype, device=device)
        self.recurrent_states = torch.zeros(slots, *self.state_shape, dtype=dtype, device=device)
        self._c_layer = cpu_ops.BuiltOnce(self._build_c_layer)
        return self.conv_states.nbytes + self.recurrent_states.nbytes

    def keep_states(self, kept: dict[int, int], passed: dict[int, tuple[int, int]] | None = None) -> None:
        """Each slot's states after the first kept[slot] tokens of the step that verified its drafts (the
        accepted drafts and the token before them), where it advanced past rejected ones; passed[slot] =
        (tokens, snapshot): its states after that many tokens (a block's end inside the step) into slot
        `snapshot`, the reply's kept state there."""
        for slot, (tokens, snapshot) in (passed or {}).items():
            self.conv_states[snapshot], self.recurrent_states[snapshot] = self.drafted[slot][tokens - 1]
        for slot, tokens in kept.items():
            self.conv_states[slot], self.recurrent_states[slot] = self.drafted[slot][tokens - 1]
        self.drafted = {}

    def copy_state(self, source: int | None, target: int) -> None:
        """Slot `target`'s states made those of slot `source` (a prompt's state kept, or taken up again), or
        zeros where source is None (a sequence's first step, whichever path runs it)."""
        if source is None:
            self.conv_states[target] = 0
            self.recurrent_states[target] = 0
        else:
            self.conv_states[target] = self.conv_states[source]
            self.recurrent_states[target] = self.recurrent_states[source]

    def split(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """in_proj's output (T, width) as the convolution's input (T, conv_dim) and the rest (T, ...)."""
        raise NotImplementedError

    def recur(self, convolved: torch.Tensor, rest: torch.Tensor, state: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The recurrence over convolved (B, T, conv_dim) and rest (B, T, ...) from state (B, *state_shape):
        (its outputs (B, T, ...), the state after the last token)."""
        raise NotImplementedError

    def output(self, out: torch.Tensor, rest: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """out_proj's input (T, width) from the recurrence's outputs (T, ...) and the rest of the projection."""
        raise NotImplementedError

    def c_fields(self) -> dict[str, int | float | torch.Tensor | None]:
        """What cpu_ops.RecurrentLayer holds of this mixer beside its convolution and states: its kind, sizes and
        parameters (fp32 tensors)."""
        raise NotImplementedError

    def in_width(self) -> int:
        """The width of in_proj's output."""
        raise NotImplementedError

    def out_width(self) -> int:
        """The width of out_proj's input."""
        raise NotImplementedError

    def c_layer(self) -> cpu_ops.RecurrentLayer | None:
        """This mixer for the C decode step (cpu_ops.recurrent_step), where it runs: fp32 CPU states and
        parameters, contiguous (a GPU's, or bf16 states: the torch path); built at its first call once its states
        are bound."""
        return self._c_layer.get()

    def _build_c_layer(self) -> tuple[cpu_ops.RecurrentLayer, list[torch.Tensor]] | None:
        if self.conv_states.dim() != 3 or not cpu_ops.usable(self.conv_states, self.recurrent_states,
                                                              self.conv_weight):
            return None  # (states not bound yet, a GPU's, or bf16 states)
        fields = {"conv_states": self.conv_states, "states": self.recurrent_states, "conv_weight": self.conv_weight,
                  "conv_bias": self.conv_bias, **self.c_fields()}
        tensors = [v for v in fields.values() if isinstance(v, torch.Tensor)]
        if not cpu_ops.usable(*tensors) or not all(t.is_contiguous() for t in tensors):
            return None
        values = {k: v.data_ptr() if isinstance(v, torch.Tensor) else v for k, v in fields.items()}
        return cpu_ops.RecurrentLayer(conv_channels=self.conv_weight.shape[0], conv_kernel=self.conv_weight.shape[1],
                                      **values), tensors

    def forward(self, hidden: torch.Tensor, rope, attention) -> torch.Tensor:
        """hidden (T, hidden_size) -> (T, hidden_size), each sequence's state advanced past its new tokens."""
        context = attention.context
        projected = self.in_proj(hidden)
        self.drafted = {}
        decode = not context.is_prefill and not context.drafting_slots
        if decode and (layer := self.c_layer()) is not None and cpu_ops.usable(projected):  # in one C call
            return self.out_proj(cpu_ops.recurrent_step(layer, context.state_slots, projected, self.out_width()))
        conv_input, rest = self.split(projected)
        if not decode:  # each query through its slot, in order
            out = torch.cat([self._sequence(conv_input[begin:end], rest[begin:end], slot, slot in context.drafting_slots)
                             for begin, end, slot in _sequences(context)])
        else:
            slots = context.state_slots
            window = torch.cat([self.conv_states[slots], conv_input.unsqueeze(-1).to(self.conv_states.dtype)], -1)
            self.conv_states[slots] = window[..., 1:]
            convolved = (window * self.conv_weight).sum(-1)
            if self.conv_bias is not None:
                convolved = convolved + self.conv_bias
            out, self.recurrent_states[slots] = self.recur(convolved.unsqueeze(1), rest.unsqueeze(1),
                                                           self.recurrent_states[slots].float())
            out = out[:, 0]
        return self.out_proj(self.output(out, rest, hidden.dtype))

    def _sequence(self, conv_input: torch.Tensor, rest: torch.Tensor, slot: int, drafting: bool = False
                  ) -> torch.Tensor:
        """The new tokens of one query, from its slot's state; where drafting (one token of a sequence
        verifying drafts), the states after it kept aside."""
        window = torch.cat([self.conv_states[slot], conv_input.t().to(self.conv_states.dtype)], dim=-1)
        self.conv_states[slot] = window[:, window.shape[1] - self.conv_states.shape[-1]:]
        convolved = F.conv1d(window.unsqueeze(0), self.conv_weight.unsqueeze(1), self.conv_bias,
                             groups=self.conv_weight.shape[0])[0]
        out, state = self.recur(convolved.t().unsqueeze(0), rest.unsqueeze(0),
                                self.recurrent_states[slot].unsqueeze(0).float())
        self.recurrent_states[slot] = state[0]
        if drafting:
            self.drafted.setdefault(slot, []).append((self.conv_states[slot].clone(),
                                                      self.recurrent_states[slot].clone()))
        return out[0]


def parameter(*shape: int, dtype: torch.dtype) -> torch.nn.Parameter:
    """A loaded (not trained) parameter, filled by the loader."""
    return torch.nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def _sequences(context) -> list[tuple[int, int, int]]:
    """(first row, end row, state slot) per sequence."""
    starts = context.query_start.tolist()
    return list(zip(starts, starts[1:], context.state_slots.tolist()))


def in_chunks(tensors: tuple[torch.Tensor, ...], size: int) -> list[torch.Tensor]:
    """Each (B, heads, T, ...) tensor as (B, heads, chunks, size, ...), T padded with zeros to whole chunks
    (a padded token decays nothing and adds nothing to a state)."""
    pad = -tensors[0].shape[2] % size
    return [F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad)).unflatten(2, (-1, size)) for x in tensors]


def within_chunk_decays(cumulative: torch.Tensor) -> torch.Tensor:
    """exp(c_i - c_j) for j <= i, 0 above the diagonal (..., size, size), from cumulative log decays c (..., size)."""
    size = cumulative.shape[-1]
    lower = torch.ones(size, size, dtype=torch.bool, device=cumulative.device).tril()
    return (cumulative.unsqueeze(-1) - cumulative.unsqueeze(-2)).masked_fill(~lower, float("-inf")).exp()
