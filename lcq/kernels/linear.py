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

HAS_TRITON = importlib.util.find_spec("triton") is not None  # (the Triton modules are imported where used)


ROW_PART = 16  # columns of the residual stream per partial sum of squares of its fused products (stream_squares)


def stream_squares(stream: torch.Tensor) -> torch.Tensor:
    """Room for the partial sums of squares of the residual stream's rows (rows, width) by ROW_PART columns, which
    a product adding to the stream writes and the next normed product reads (LCQLinear.residual_product,
    normed_product)."""
    return torch.empty(stream.shape[0], -(-stream.shape[1] // ROW_PART), dtype=torch.float32, device=stream.device)


def runs_triton(x: torch.Tensor) -> bool:
    """Whether x's products and a layer's steps take the Triton kernels: CUDA tensors, where triton is installed.
    The one place that says so (the tests of a decode step's wiring make it true for CPU tensors, which Triton's
    interpreter then runs as a GPU would)."""
    return HAS_TRITON and x.is_cuda


def lcq_linear(x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x (..., K) and the packed W (N, K): the Triton kernels for CUDA
    tensors, else W dequantized in x's dtype."""
    if runs_triton(x) and x.numel():
        from .triton_linear import triton_linear
        return triton_linear(x, layer)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return dense_linear(x, dequantize(layer, x.dtype), bias)


class LCQLinear(torch.nn.Module):
    """A packed linear layer as a module; .to(device) moves its packed tensors.

    cache_dense keeps a CPU weight built at load (warm): for fp32 products the indices in the index
    kernel's layout where it runs (cpu_index), else the dequantized weight as an fp16 copy
    (cpu_matmul.half_copy) or packed for oneDNN. An engine, whose dtype and device are fixed, then
    drops the packed tensors (release_packed).
    """

    def __init__(self, layer: PackedLinear, cache_dense: bool = False):
        super().__init__()
        self.layer: PackedLinear | None = layer
        self.bias = layer.bias
        self._features = (layer.in_features, layer.out_features)
        self.cache_dense = cache_dense
        self._dense: torch.Tensor | None = None
        self._half: torch.Tensor | None = None
        self._index: IndexWeight | None = None
        self._cached_dtype: torch.dtype | None = None

    @property
    def in_features(self) -> int:
        return self._features[0]

    @property
    def out_features(self) -> int:
        return self._features[1]

    @property
    def uses_half_weights(self) -> bool:
        return self._half is not None

    @property
    def uses_index_weights(self) -> bool:
        return self._index is not None

    def _packed(self) -> PackedLinear:
        if self.layer is None:
            raise RuntimeError(f"this LCQ layer kept only its CPU weight for {self._cached_dtype} "
                               "(release_packed); load the model again for another dtype or device")
        return self.layer

    def _apply(self, fn, recurse=True):  # keep the packed tensors in step with .to()/.cuda()
        self.layer = self._packed().to(fn(torch.empty(0, device=self._packed().qweight.device)).device)
        self.bias = self.layer.bias
        self._dense = self._half = self._index = self._cached_dtype = None
        return super()._apply(fn, recurse)

    def warm(self, dtype: torch.dtype) -> None:
        """Build the cached weight now, at load time, rather than on the first request."""
        layer = self._packed()
        self._dense = self._half = self._index = None
        if dtype == torch.float32 and layer.qweight.device.type == "cpu" and cpu_index.enabled():
            self._index = IndexWeight(layer)
        else:
            weight = dequantize(layer, dtype)
            self._half = half_copy(weight, exact_only=False)
            self._dense = None if self._half is not None else pack_weight(weight)
        self._cached_dtype = dtype

    @property
    def byte_rows_nbytes(self) -> int:
        """The bytes keep_byte_rows would add (0 unless this layer keeps indices in the AVX-512 form)."""
        return self._index.byte_rows_nbytes if self._index is not None else 0

    def keep_byte_rows(self) -> int:
        """Keep the int8 form of every weight beside the indices, which int8 products then read
        instead of expanding blocks of rows per call (IndexWeight.keep_byte_rows); returns its bytes."""
        return self._index.keep_byte_rows() if self._index is not None else 0

    def keep_books(self) -> int:
        """Keep each group's codebook in bytes for int8 decode products (IndexWeight.keep_books);
        returns its bytes (0 unless this layer keeps indices where an int8 decode form reads them)."""
        return self._index.keep_books() if self._index is not None else 0

    def release_packed(self) -> int:
        """Drop the packed tensors, which a warmed CPU layer no longer reads (0.28-0.55 bytes per
        weight beside its cached weight), for a model whose dtype and device stay as loaded; returns
        the bytes dropped. Warming for another dtype or moving the layer then raises."""
        if not self.cache_dense or self._cached_dtype is None or self.layer is None:
            return 0
        dropped = self.layer.nbytes()
        self.layer = None
        return dropped

    def decode_weights(self) -> tuple[int, int, torch.Tensor | None] | None:
        """(weight kind, its address, fp32 bias or None) for the one-call CPU decode step
        (cpu_ops.INDEX_WEIGHT or HALF_WEIGHT), where this layer keeps its indices or an fp16 copy."""
        bias = None if self.bias is None else self.bias.float().contiguous()
        if self._index is not None:
            return cpu_ops.INDEX_WEIGHT, self._index.pointer, bias
        if self._half is not None:
            return cpu_ops.HALF_WEIGHT, self._half.data_ptr(), bias
        return None

    def fused_swiglu(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up of this [gate; up] layer where the CPU kernels finish it inside the product
        (fp32 activations, a cached weight, no bias; the same values as the product then SwiGLU,
        without writing and re-reading the product), else None."""
        if not self.cache_dense or self.bias is not None or x.dtype != torch.float32:
            return None
        if self._cached_dtype != x.dtype:
            self.warm(x.dtype)
        if self._index is not None:
            return self._index.linear(x, swiglu=True)
        return half_swiglu(x, self._half) if self._half is not None else None

    def gated_product(self, gate_up: torch.Tensor, activation: str) -> torch.Tensor | None:
        """This layer's product of act(gate) * up for gate_up (..., 2 K) = [gate, up] (an MLP's down_proj) where the
        CUDA kernels compute the activation as they load their inputs, so that no kernel of its own runs between the
        two products (triton_linear's gated); else None (CPU tensors, activations they do not compute)."""
        if self.cache_dense or not runs_triton(gate_up):
            return None
        from .elementwise import GATED, fusing_steps
        if activation not in GATED or not fusing_steps():
            return None
        from .triton_linear import triton_linear
        return triton_linear(gate_up, self._packed(), gated=activation)

    def takes_stream(self, x: torch.Tensor, gated: str | None = None) -> bool:
        """Whether this layer's products of x's rows may run on the residual stream (normed_product,
        residual_product, with gated that activation's inputs): on the Triton kernels, 1-2 rows (a decode step at
        batch 1-2), unless LCQ_FUSED_STEPS=0."""
        if self.cache_dense or not runs_triton(x) or x.dim() != 2 or x.shape[0] > 2:
            return False
        from .elementwise import GATED, fusing_steps
        return fusing_steps() and (gated is None or gated in GATED)

    def normed_product(self, stream: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                       squares: torch.Tensor) -> torch.Tensor:
        """This layer's product of RMSNorm(stream) (weight, eps), the norm computed as the kernel loads its inputs from
        each row's sums of squares in squares (stream_squares; the last residual_product wrote them): no norm kernel
        before it. Where takes_stream."""
        from .triton_linear import triton_linear
        return triton_linear(stream, self._packed(), norm_weight=norm_weight, eps=eps, squares=squares)

    def residual_product(self, x: torch.Tensor, stream: torch.Tensor, squares: torch.Tensor,
                         gated: str | None = None) -> torch.Tensor:
        """stream + this layer's product of x (of act(gate) * up with gated, as gated_product), rounded as the norm's
        residual add, in fresh rows: the next stream, whose rows' sums of squares go to squares. Where takes_stream."""
        from .triton_linear import triton_linear
        return triton_linear(x, self._packed(), gated=gated, residual=stream, squares=squares)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cache_dense:
            return lcq_linear(x, self._packed())
        if self._cached_dtype != x.dtype:
            self.warm(x.dtype)
        if self._index is not None:
            y = self._index.linear(x)
            return y if self.bias is None else y + self.bias.float()
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return dense_linear(x, self._dense, bias, self._half)
