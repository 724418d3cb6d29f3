"""The one entry point every model layer calls for an LCQ matrix product.

CUDA tensors go to the fused Triton kernels (triton is imported only then, so CPU-only installs
work without it); CPU tensors dequantize and multiply, optionally with a weight cached at load: the
layer's indices for fp32 products where that kernel runs (cpu_index.py; about a third of the bytes
of fp16), else an fp16 copy (cpu_half.py) or the weight packed for oneDNN (cpu_matmul.py).
"""
from __future__ import annotations

import importlib.util

import torch

from lcq.format import PackedLinear, dequantize

from . import cpu_index, cpu_ops
from .cpu_index import IndexWeight
from .cpu_matmul import dense_linear, half_copy, half_swiglu, pack_weight

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def lcq_linear(x: torch.Tensor, layer: PackedLinear, dense_weight: torch.Tensor | None = None,
               half_weight: torch.Tensor | None = None, index_weight: IndexWeight | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x (..., K) and the packed W (N, K); dense_weight is W dequantized
    (plain, or from cpu_matmul.pack_weight), half_weight its fp16 copy (cpu_matmul.half_copy) and
    index_weight its indices in the CPU kernel's layout, which fp32 products use instead."""
    if index_weight is not None and x.dtype == torch.float32:
        y = index_weight.linear(x)
        return y if layer.bias is None else y + layer.bias.float()
    cached = dense_weight is not None or (half_weight is not None and x.dtype == torch.float32)
    if x.is_cuda and not cached and x.numel() and _HAS_TRITON:
        from .triton_linear import triton_linear
        return triton_linear(x, layer)
    weight = dense_weight if cached else dequantize(layer, x.dtype)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return dense_linear(x, weight, bias, half_weight)


class LCQLinear(torch.nn.Module):
    """A packed linear layer as a module; its tensors are buffers so .to(device) moves them.

    cache_dense keeps a CPU weight built at load: for fp32 products the indices in the index
    kernel's layout where it runs (cpu_index), else the dequantized weight as an fp16 copy
    (cpu_matmul.half_copy) or packed for oneDNN.
    """

    def __init__(self, layer: PackedLinear, cache_dense: bool = False):
        super().__init__()
        self.layer = layer
        self.cache_dense = cache_dense
        self._dense: torch.Tensor | None = None
        self._half: torch.Tensor | None = None
        self._index: IndexWeight | None = None
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

    @property
    def uses_index_weights(self) -> bool:
        return self._index is not None

    def _apply(self, fn, recurse=True):  # keep the packed tensors in step with .to()/.cuda()
        self.layer = self.layer.to(fn(torch.empty(0, device=self.layer.qweight.device)).device)
        self._dense = self._half = self._index = self._cached_dtype = None
        return super()._apply(fn, recurse)

    def warm(self, dtype: torch.dtype) -> None:
        """Build the cached weight now, at load time, rather than on the first request."""
        self._dense = self._half = self._index = None
        if dtype == torch.float32 and self.layer.qweight.device.type == "cpu" and cpu_index.enabled():
            self._index = IndexWeight(self.layer)
        else:
            weight = dequantize(self.layer, dtype)
            self._half = half_copy(weight, exact_only=False)
            self._dense = None if self._half is not None else pack_weight(weight)
        self._cached_dtype = dtype

    def decode_weights(self) -> tuple[int, int, torch.Tensor | None] | None:
        """(weight kind, its address, fp32 bias or None) for the one-call CPU decode step
        (cpu_ops.INDEX_WEIGHT or HALF_WEIGHT), where this layer keeps its indices or an fp16 copy."""
        bias = None if self.layer.bias is None else self.layer.bias.float().contiguous()
        if self._index is not None:
            return cpu_ops.INDEX_WEIGHT, self._index.pointer, bias
        if self._half is not None:
            return cpu_ops.HALF_WEIGHT, self._half.data_ptr(), bias
        return None

    def fused_swiglu(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up of this [gate; up] layer where the CPU kernels finish it inside the product
        (fp32 activations, a cached weight, no bias; the same values as the product then SwiGLU,
        without writing and re-reading the product), else None."""
        if not self.cache_dense or self.layer.bias is not None or x.dtype != torch.float32:
            return None
        if self._cached_dtype != x.dtype:
            self.warm(x.dtype)
        if self._index is not None:
            return self._index.linear(x, swiglu=True)
        return half_swiglu(x, self._half) if self._half is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache_dense:
            if self._cached_dtype != x.dtype:
                self.warm(x.dtype)
            return lcq_linear(x, self.layer, self._dense, self._half, self._index)
        return lcq_linear(x, self.layer)
