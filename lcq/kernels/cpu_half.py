"""CPU products with fp16 weights (cpu_half.c): build once per machine, then call.

A batch-1 decode step on a CPU streams every weight from memory once, so the bytes per weight set
the speed: fp16 halves them against the fp32 weight oneDNN multiplies. The weights are rounded to
fp16 exactly as the GPU kernels round them before tl.dot; activations and sums stay fp32. On a
2-core AMD EPYC (Zen 1) a 3072x576 product from memory took 0.22 ms at M=1 against 0.39 ms through
oneDNN fp32, and 0.43 against 0.70 ms at M=8 (bench/cpu_products.py). Prefill-sized products
convert blocks of weight rows to fp32 for cpu_gemm.c's product, so a layer with the fp16 copy needs
no fp32 weight.

The kernel is compiled on first use (native.py). Where it cannot run, products stay fp32;
LCQ_CPU_HALF=0 turns it off for bit-exact fp32 products.
"""
from __future__ import annotations

import ctypes
import functools
import os

import torch

from . import native

def enabled() -> bool:
    """True where the kernel runs here and LCQ_CPU_HALF is not 0."""
    return os.environ.get("LCQ_CPU_HALF", "1") != "0" and library() is not None


def half_linear(x: torch.Tensor, weight: torch.Tensor, swiglu: bool = False,
                panels: torch.Tensor | None = None, byte_rows: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) float32, weight (N, K) float16 -> (M, N) float32; with swiglu (weight = [gate; up])
    silu(x @ gate^T) * (x @ up^T), (M, N / 2), the product finishing it block by block. panels: the
    weight's pair_panels, which bf16 products of several rows then read (the same values); byte_rows:
    its byte_rows, which int8 products of a few rows then read (the weight rounded to 8 bits)."""
    x = x.contiguous()
    if x.dtype != torch.float32 or weight.dtype != torch.float16 or not weight.is_contiguous():
        raise TypeError("half_linear takes float32 activations and a contiguous float16 weight")
    if x.dim() != 2 or x.shape[1] != weight.shape[1] or (swiglu and weight.shape[0] % 2):
        raise ValueError(f"half_linear: x {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    y = torch.empty(x.shape[0], weight.shape[0] // (2 if swiglu else 1), dtype=torch.float32)
    if x.shape[0] and library().lcq_half_matmul(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(),
                                                weight.shape[0], int(swiglu),
                                                panels.data_ptr() if panels is not None else None,
                                                byte_rows.data_ptr() if byte_rows is not None else None, y.data_ptr()):
        raise MemoryError("lcq_half_matmul could not allocate its buffers")
    return y


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel (native.load), or None where it cannot run here."""
    lib = native.load()
    if lib is not None:
        pointer, integer = ctypes.c_void_p, ctypes.c_int
        lib.lcq_half_matmul.argtypes = [pointer, integer, integer, pointer, integer, integer, pointer, pointer,
                                        pointer]
        lib.lcq_half_matmul.restype = integer
        lib.lcq_half_pair_panels.argtypes = [pointer, integer, integer, pointer]
        lib.lcq_half_pair_panels.restype = integer
        lib.lcq_half_byte_rows.argtypes = [pointer, integer, integer, pointer]
        lib.lcq_half_byte_rows.restype = None
    return lib


def pair_panel_bytes(n: int, k: int) -> int:
    """What pair_panels keeps for an (n, k) weight: rows rounded up to panels of 32, K to pairs."""
    return 4 * -(-n // 32) * 32 * ((k + 1) // 2)


def pair_panels(weight: torch.Tensor) -> torch.Tensor:
    """The fp16 weight (N, K) as panels of bf16 pairs (int32 words), for half_linear's bf16 products:
    2 bytes per weight, what the weight itself takes."""
    panels = torch.empty(pair_panel_bytes(*weight.shape) // 4, dtype=torch.int32)
    n, k = weight.shape
    if library().lcq_half_pair_panels(weight.data_ptr(), n, k, panels.data_ptr()):
        raise MemoryError("lcq_half_pair_panels could not allocate its buffers")
    return panels


BYTE_BLOCK = 32  # values per scale of byte_rows (cpu_half.c)


def byte_row_bytes(n: int, k: int) -> int:
    """What byte_rows keeps for an (n, k) weight: a byte per weight (K rounded up to blocks of 32) and an
    fp32 scale per block, 1.125 bytes per weight."""
    blocks = -(-k // BYTE_BLOCK)
    return n * blocks * (BYTE_BLOCK + 4)


def byte_rows(weight: torch.Tensor) -> torch.Tensor:
    """The fp16 weight (N, K) rounded to int8 rows, a scale per block of 32 values (cpu_half.c's
    lcq_half_byte_rows): the int8 products' decode form reads them, 1.125 bytes per weight where the
    weight takes 2."""
    rows = torch.empty(byte_row_bytes(*weight.shape), dtype=torch.int8)
    library().lcq_half_byte_rows(weight.data_ptr(), weight.shape[0], weight.shape[1], rows.data_ptr())
    return rows
