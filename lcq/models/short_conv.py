"""LFM2's short convolution: a gated causal convolution whose only state is its last inputs.

in_proj gives each token B, C and x (each hidden_size wide); B x passes a causal convolution of conv_L_cache
taps per channel, and its output times C goes to out_proj. A sequence's state is the convolution's last
kernel - 1 inputs, held in a slot as recurrent.py describes (the recurrent state it keeps is empty).
"""
from __future__ import annotations

from typing import Callable

import torch

from lcq.kernels import cpu_ops

from .config import ModelConfig
from .recurrent import RecurrentMixer


class ShortConv(RecurrentMixer):
    CHECKPOINT_NAME = "conv"
    TENSORS = {"conv_weight": "conv.weight", "conv_bias": "conv.bias"}

    def __init__(self, config: ModelConfig, prefix: str, make_linear: Callable[[list[str]], torch.nn.Module],
                 dtype: torch.dtype):
        dims = config.short_conv
        super().__init__(config.hidden_size, dims.kernel, (0,), dtype, conv_bias=dims.bias)
        self.in_proj = make_linear([f"{prefix}.in_proj"])  # B, then C, then x
        self.out_proj = make_linear([f"{prefix}.out_proj"])

    def split(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B x (the convolution's input); C."""
        b, c, x = projected.chunk(3, dim=-1)
        return b * x, c

    def recur(self, convolved: torch.Tensor, rest: torch.Tensor, state: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """C times the convolution's output; nothing recurs."""
        return rest * convolved, state

    def output(self, out: torch.Tensor, rest: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return out.to(dtype)

    def c_fields(self) -> dict[str, int | float | torch.Tensor | None]:
        return dict(kind=cpu_ops.RECURRENT_KINDS.index("short_conv"))

    def in_width(self) -> int:
        return 3 * self.out_width()

    def out_width(self) -> int:
        return self.conv_weight.shape[0]
