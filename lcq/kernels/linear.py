"""The one entry point every model layer calls for an LCQ matrix product.

CUDA tensors go to the fused Triton kernels (triton is imported only then, so CPU-only installs
work without it); CPU tensors dequantize and multiply, optionally with a cached dense weight: an
fp16 copy for fp32 products where that kernel runs (cpu_half.py; it streams half the bytes of
fp32), else the weight packed for oneDNN (cpu_matmul.py).
"""
from __future__ import annotations

import importlib.util

import torch

from lcq.format import PackedLinear, dequantize

from .cpu_matmul import dense_linear, half_copy, pack_weight

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def lcq_linear(x: torch.Tensor, layer: PackedLinear, dense_weight: torch.Tensor | None = None,
               half_weight: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x (..., K) and the packed W (N, K); dense_weight is W dequantized
    (plain, or from cpu_matmul.pack_weight), half_weight its fp16 copy (cpu_matmul.half_copy),
    which fp32 products use instead."""
    cached = dense_weight is not None or (half_weight is not None and x.dtype == torch.float32)
    if x.is_cuda and not cached and x.numel() and _HAS_TRITON:
        from .triton_linear import triton_linear
        return triton_linear(x, layer)
    weight = dense_weight if cached else dequantize(layer, x.dtype)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return dense_linear(x, weight, bias, half_weight)


class LCQLinear(torch.nn.Module):
    """A packed linear layer as a module; its tensors are buffers so .to(device) moves them.

    cache_dense keeps the dequantized weight (CPU speed at the cost of memory): an fp16 copy for
    fp32 products where that kernel runs (cpu_matmul.half_copy), else the weight packed for oneDNN.
    """

    def __init__(self, layer: PackedLinear, cache_dense: bool = False):
        super().__init__()
        self.layer = layer
        self.cache_dense = cache_dense
        self._dense: torch.Tensor | None = None
        self._half: torch.Tensor | None = None
        self._cached_dtype: torch.dtype | None = None

    @property
    def in_features(self) -> int:
        return self.layer.in_features

    @property
    def out_features(self) -> int:
        return self.layer.out_features

    @property
    def uses_half_weights(self) -> bool:
        return self._half is not None

    def _apply(self, fn, recurse=True):  # keep the packed tensors in step with .to()/.cuda()
        self.layer = self.layer.to(fn(torch.empty(0, device=self.layer.qweight.device)).device)
        self._dense = self._half = self._cached_dtype = None
        return super()._apply(fn, recurse)

    def warm(self, dtype: torch.dtype) -> None:
        """Dequantize (and pack, on CPU) now, at load time, rather than on the first request."""
        weight = dequantize(self.layer, dtype)
        self._half = half_copy(weight, exact_only=False)
        self._dense = None if self._half is not None else pack_weight(weight)
        self._cached_dtype = dtype

    def decode_weights(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(fp16 weight, fp32 bias or None) for the one-call CPU decode step, where this layer keeps
        the fp16 copy."""
        if self._half is None:
            return None
        return self._half, None if self.layer.bias is None else self.layer.bias.float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache_dense:
            if self._cached_dtype != x.dtype:
                self.warm(x.dtype)
            return lcq_linear(x, self.layer, self._dense, self._half)
        return lcq_linear(x, self.layer)
