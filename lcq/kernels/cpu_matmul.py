"""Dense matrix products on CPU with the weight packed once, at load, for oneDNN.

torch's default CPU GEMM runs the small-M products of decode steps far below the machine's speed
on some CPUs. On a 2-core AMD EPYC (AVX2), a 3072x576 fp32 product took 2.45 ms through F.linear
and 1.12 ms through oneDNN with a pre-packed weight at M=8, 8.5 ms and 4.6 ms at M=64, and the
same at M=1 (bandwidth-bound either way). Packing replaces the plain weight, so it costs no memory.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from . import cpu_half, native

# oneDNN (ONEDNN_PRIMITIVE_CACHE_CAPACITY) and torch's ideep layer (LRU_CACHE_CAPACITY) each keep
# a compiled product per input shape, about 190 KB apiece, 1024 of them by default. Every new token
# count of a step is a new shape, so a server's memory grew for several load rounds before those
# caches filled. At 128 entries each, five 128-client rounds against one server left memory flat
# (+16, -25, +2, +0 MiB after the first round) for about 3% fewer output tokens than at 512 (which
# still grew 123 MiB over rounds 2-5); bench/results/serve-cpu-rounds*.json. Set either variable
# to choose otherwise. Read when oneDNN first runs a product, so this is set before any.
for _cache in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_cache, "128")

# The batch size oneDNN lays the weight out for; any batch runs. For the 49152x576 head on that CPU:
# 8.2 ms at M=1 (7.7 laid out for 1), 15 ms at M=8 (25 laid out for 1), 55 ms at M=64 (64).
PACKED_FOR_BATCH = 8


def can_pack(weight: torch.Tensor) -> bool:
    """oneDNN packs fp32 weights on any x86 CPU; bf16/fp16 packing needs AVX-512 or AMX."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight in oneDNN's blocked layout when that is possible, else the weight itself."""
    if not can_pack(weight):
        return weight
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACKED_FOR_BATCH)


def half_copy(weight: torch.Tensor, exact_only: bool) -> torch.Tensor | None:
    """An fp16 copy of an fp32 CPU weight for the fp16 kernel (cpu_half), where that kernel runs;
    it then serves every fp32 product, so the caller keeps it instead of the fp32 weight.
    exact_only: only if fp16 holds every value exactly (a full-precision weight read from an fp16
    checkpoint stays full precision: exact_half); LCQ weights are rounded as the GPU kernels round them."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not cpu_half.enabled():
        return None
    return exact_half(weight) if exact_only else weight.half().contiguous()


# The fp32 values exact_half converts and compares at a time: its temporaries are a few MiB, not the
# weight's size (Gemma 3 27B's 262144 x 5376 table is 5.6 GB in fp32)
EXACT_CHECK_BYTES = 4 << 20


def exact_half(weight: torch.Tensor) -> torch.Tensor | None:
    """A contiguous fp16 copy of a weight of any floating dtype where fp16 holds each of its values, as
    fp32, exactly (a weight read from an fp16 checkpoint), else None. As torch.equal compares, a NaN is
    never exact. The weight is converted and compared a few rows at a time, so the only full-size tensor
    made is the fp16 copy; an fp16 weight is no copy: it is returned itself, where it has no NaN."""
    rows_of = weight.reshape(1) if weight.dim() == 0 else weight  # (cut along its first dimension)
    rows = max(1, EXACT_CHECK_BYTES // (4 * max(1, math.prod(rows_of.shape[1:]))))
    if weight.dtype == torch.float16:
        if any(torch.isnan(rows_of[start:start + rows]).any() for start in range(0, rows_of.shape[0], rows)):
            return None
        return weight.contiguous()
    half = torch.empty(weight.shape, dtype=torch.float16, device=weight.device)
    half_rows = half.reshape(rows_of.shape)
    for start in range(0, rows_of.shape[0], rows):
        part = rows_of[start:start + rows].to(torch.float32)  # (the rows themselves where fp32 already)
        rounded = half_rows[start:start + rows]
        rounded.copy_(part)
        if not torch.equal(rounded.float(), part):
            return None
    return half


def dense_linear(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None = None,
                 half: torch.Tensor | None = None, panels: torch.Tensor | None = None,
                 byte_rows: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) for a plain weight or one made by pack_weight; fp32 products use `half`
    (from half_copy) when given, and then `weight` may be None; `panels` and `byte_rows`: half's
    cpu_half.pair_panels, for its bf16 products, and cpu_half.byte_rows, for its int8 decode products."""
    if half is not None and x.dtype == torch.float32:
        rows = x.reshape(-1, x.shape[-1])
        y = cpu_half.half_linear(rows, half, panels=panels, byte_rows=byte_rows).reshape(*x.shape[:-1], half.shape[0])
        return y if bias is None else y + bias
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def half_swiglu(x: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T) for fp32 x (..., K) and the fp16 copy of [gate; up] (half_copy),
    finished inside the product (cpu_half.half_linear)."""
    y = cpu_half.half_linear(x.reshape(-1, x.shape[-1]), half, swiglu=True)
    return y.reshape(*x.shape[:-1], y.shape[-1])


# The C kernels' product forms (LCQ_*_PRODUCTS in cpu_gemm.h) by operand dtype, and the CPU flags
# each needs (int8 uses bf16 where it does not apply).
PRODUCT_FORMS = {torch.float32: (0, ()), torch.bfloat16: (1, ("avx512_bf16",)),
                 torch.int8: (2, ("avx512_bf16", "avx512_vnni", "avx512vbmi"))}
INT8_ROW_PRODUCTS = 3  # LCQ_INT8_ROW_PRODUCTS: cpu_products(torch.int8, rows_alone=True)
FP32_ROW_PRODUCTS = 4  # LCQ_FP32_ROW_PRODUCTS: cpu_products(another dtype, rows_alone=True)
# Products of fewer rows are fp32 whatever cpu_products says (its smallest threshold), but those of LCQ
# layers with int8 books under int8 (their decode form, each row's values independent of the others).
ROUNDED_MIN_ROWS = 3


def products_available(dtype: torch.dtype) -> bool:
    """Whether the C kernels run here and the CPU has what products of this operand dtype need
    (LCQ_CPU_AVX512=0 leaves float32 only)."""
    form = PRODUCT_FORMS.get(dtype)
    return form is not None and native.load() is not None and all(native.has_avx512(flag) for flag in form[1])


def shuffles_only() -> bool:
    """Whether int8 products run here only in AVX2 decode forms (cpu_index_shuffles.c: the decode products of LCQ
    layers at 2 and 4 bits that keep int8 books; cpu_half.c: the head's int8 rows; every other product fp32): the
    C kernels run, but the CPU lacks the AVX-512 int8 products (or LCQ_CPU_AVX512 is 0)."""
    return native.load() is not None and not products_available(torch.int8)


@contextlib.contextmanager
def cpu_products(dtype: torch.dtype, rows_alone: bool = False, invariant: bool = False) -> Iterator[None]:
    """Within the block, the calling thread's fp32 products of several rows in the C kernels take
    operands of this dtype (products_available; elsewhere nothing changes):
    - bfloat16: vdpbf16ps, two multiply-adds per fp32 lane, sums fp32, operands rounded to nearest
      even: the blocked product from 10 rows instead of 16 (from 3 for a weight with kept
      pair_panels), the decode forms of LCQ indices from 5 rows and of fp16 copies from 3, and
      prefill attention.
    - int8: vpdpbusd, four multiply-adds per 32-bit lane, sums int32, in the blocked product of LCQ
      layers from 10 rows (3 where a layer keeps its int8 weights), and in the decode products of 1-4
      rows of LCQ layers that keep int8 books (1-2 where they keep their int8 weights): activations
      quantized to 8 bits per block of 64 values along K, each group's codebook quantized once; and
      in the decode products of 1-4 rows of an fp16 weight that keeps int8 rows (cpu_half.byte_rows:
      the head), with activations in two bytes; full-precision weights and the rest take bfloat16.
      Where AMX runs, LCQ products of 256 rows or more (byte_pair_rows) take bf16 tiles instead, the
      int8 form's weight values and the activations rounded to bf16.
    - int8 where the CPU lacks these (shuffles_only): the decode products of LCQ layers at 2 and 4 bits that
      keep int8 books in the AVX2 shuffle form (lcq_set_shuffles), and those of 1-4 rows of an fp16 weight that
      keeps int8 rows (the head) in AVX2's form of theirs, the same 8-bit operands as above; every other
      product fp32.
    rows_alone: each row's values are what that row alone would give (a step verifying drafts for a
    sequence whose plain decode steps are single rows): with int8, the int8 decode forms of LCQ layers
    with books and of kept int8 rows at every row count, and fp32 elsewhere; with another dtype, fp32;
    either way fp32 products in their decode form at every row count (the blocked product from 16 rows
    sums a row's products in another order).
    invariant: each row's values are what it alone gives, as with rows_alone, but with int8 products (where
    they run) in the blocked forms at every row count (lcq_set_invariant), much faster than the row forms
    in prefill and in decode steps of many sequences; with another dtype, rows_alone. The one-call decode
    step's attention then takes prefill attention's tiles (lcq_invariant_queries).
    Thread-local and restored on exit, like torch.autocast."""
    lib = native.load()
    if lib is None:
        yield
        return
    form = PRODUCT_FORMS[dtype][0] if products_available(dtype) else 0
    shuffles = dtype == torch.int8 and not form
    blocked = invariant and dtype == torch.int8 and bool(form)
    if not blocked and (rows_alone or invariant):  # (the blocked invariant forms already keep each row as alone)
        form = INT8_ROW_PRODUCTS if dtype == torch.int8 and form else FP32_ROW_PRODUCTS
    previous, previous_invariant = lib.lcq_set_products(form), lib.lcq_set_invariant(int(invariant))
    previous_shuffles = lib.lcq_set_shuffles(int(shuffles))
    try:
        yield
    finally:
        lib.lcq_set_products(previous)
        lib.lcq_set_invariant(previous_invariant)
        lib.lcq_set_shuffles(previous_shuffles)


def amx_active() -> bool:
    """Whether int8 and bf16 products of several rows take AMX tiles here (native.amx_allowed, and Linux
    granted tile state)."""
    lib = native.load()
    return lib is not None and bool(lib.lcq_amx_on())


@contextlib.contextmanager
def _library_setting(setter: str, value: int) -> Iterator[None]:
    """Within the block, the C library's process-wide setting of `setter` (which returns the one before) is
    `value`; nothing without the library."""
    lib = native.load()
    if lib is None:
        yield
        return
    previous = getattr(lib, setter)(value)
    try:
        yield
    finally:
        getattr(lib, setter)(previous)


def byte_pair_rows(rows: int) -> contextlib.AbstractContextManager[None]:
    """Within the block, int8 products of LCQ layers of `rows` rows or more run on bf16 AMX tiles where AMX is
    on (process-wide, for comparisons, benchmarks and tests): activations and weights rounded to bf16 there."""
    return _library_setting("lcq_set_byte_pair_rows", rows)


def paired_group_kb(kb: int) -> contextlib.AbstractContextManager[None]:
    """Within the block, the products of byte_pair_rows from 1,024 rows run through groups of up to `kb` KB of
    bf16 weight pairs a block of rows at a time, or (0) a panel of 32 weight rows at a time over all rows
    (process-wide, for comparisons): the same values either way."""
    return _library_setting("lcq_set_paired_group_kb", kb)


@contextlib.contextmanager
def amx_tiles(wanted: bool) -> Iterator[bool]:
    """Within the block, int8 products of 16 rows or more take AMX tiles if wanted and the CPU allows it
    (process-wide, unlike cpu_products: for comparisons and benchmarks); yields whether they do."""
    lib = native.load()
    if lib is None:
        yield False
        return
    previous = amx_active()
    try:
        yield bool(lib.lcq_use_amx(int(wanted)))
    finally:
        lib.lcq_use_amx(int(previous))
