"""CPU products that read an LCQ layer's indices (cpu_index.c, cpu_index_bytes.c, cpu_index_pairs.c) instead
of a dequantized copy.

IndexWeight keeps the b-bit indices packed 32 / b to a 32-bit word, plus S and B in fp32 (0.7 bytes
per weight at 4 bits, r 2, g 64, 0.35 at 2 bits, r 2, g 128, against 2 for an fp16 copy; with
AVX-512 0.06 more, the int8 expansion's block scales), and the
kernel builds each group's codebook in registers: on a Zen 4, batch-1 decode products run at
1.3-1.9x the fp16 kernel's speed with AVX-512 (bench/cpu_index.py, docs/kernels.md); from
lcq_gemm_min_rows() rows (cpu_gemm.c) blocks of weight rows are expanded for a register-blocked
product. Every fp32 product uses the exact fp32 codebook entries. With int8 products, a weight that keeps
its codebooks in bytes (keep_books) takes decode products of a few rows in 8 bits as well: with AVX-512 at
any width, else with AVX2 at 2 and 4 bits (cpu_index_shuffles.c).

LCQ_CPU_INDEX=0 keeps the fp16 copy instead (faster where permutes are slow, as on Zen 1), and
LCQ_CPU_AVX512=0 the AVX2 forms on CPUs with AVX-512.
"""
from __future__ import annotations

import ctypes
import functools
import os

import torch

from lcq.format import PackedLinear, decoded_b, decoded_s, unpack_indices

from . import cpu_half, native
from .cpu_matmul import products_available

LANES = 16  # indices per step: one AVX-512 vector of 32-bit words
TABLE_WIDTH = 16  # permutes read 4 bits: tables are replicated to 16 entries
# Rows packed at a time: whole-layer int64 temporaries stayed in the allocator's heap after loading
# (SmolLM2-135M W4 engine: 2.76 GB RSS after loading at once, 2.65 at 256 rows, 2.62 at 64, as before
# this layout; malloc_trim gave the difference back).
PACK_ROWS = 64
SHUFFLE_BITS = (2, 4)  # the int8 decode form without the AVX-512 one (cpu_index_shuffles.c)


class _Fields(ctypes.Structure):
    """lcq_index_weight in cpu_index.h."""
    _fields_ = [("indices", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("offsets", ctypes.c_void_p),
                ("tables", ctypes.c_void_p), ("table_index", ctypes.c_void_p), ("N", ctypes.c_int),
                ("K", ctypes.c_int), ("group_size", ctypes.c_int), ("groups", ctypes.c_int), ("rank", ctypes.c_int),
                ("bits", ctypes.c_int), ("runs", ctypes.c_int), ("last_lane_bytes", ctypes.c_int),
                ("row_bytes", ctypes.c_int), ("wide", ctypes.c_int), ("tops", ctypes.c_void_p),
                ("byte_rows", ctypes.c_void_p), ("books", ctypes.c_void_p)]


def pack_rows(indices: torch.Tensor, bits: int) -> tuple[torch.Tensor, int, int]:
    """Indices (N, K) into the kernel's rows: runs of 16 32-bit words, field s of word i (bits
    bits * s ..) index 16 s + i of the run, then a partial run in 16 lanes of 1, 2 or 4 bytes.
    Returns (rows (N, row_bytes) uint8, full runs, lane bytes of the partial run or 0). Sums in
    int32: fields never overlap, so sums that wrap past 2^31 still give each word's bits."""
    n, k = indices.shape
    fields = 32 // bits
    run = LANES * fields
    runs, rest = divmod(k, run)
    shifts = bits * torch.arange(fields, dtype=torch.int32).view(1, 1, -1, 1)
    words = (indices[:, : runs * run].view(n, runs, fields, LANES) << shifts).sum(2, dtype=torch.int32)
    parts = [words.view(torch.uint8).view(n, -1)]
    last_lane_bytes = 0
    if rest:
        steps = -(-rest // LANES)
        padded = torch.zeros(n, steps * LANES, dtype=torch.int32)
        padded[:, :rest] = indices[:, runs * run:]
        lanes = (padded.view(n, 1, steps, LANES) << shifts[:, :, :steps]).sum(2, dtype=torch.int32)
        last_lane_bytes = next(b for b in (1, 2, 4) if steps * bits <= 8 * b)
        dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[last_lane_bytes]
        parts.append(lanes.to(dtype).contiguous().view(torch.uint8).view(n, -1))
    return torch.cat(parts, dim=1).contiguous(), runs, last_lane_bytes


def enabled() -> bool:
    """True where the kernel runs here (it is built with the fp16 one) and LCQ_CPU_INDEX is not 0."""
    return os.environ.get("LCQ_CPU_INDEX", "1") != "0" and cpu_half.enabled()


def wide_available() -> bool:
    """AVX-512 decode products where the CPU has AVX-512 F and LCQ_CPU_AVX512 is not 0."""
    return native.has_avx512("avx512f")


class IndexWeight:
    """A packed layer in the kernel's layout; `pointer` is the C struct's address (kept alive here)."""

    def __init__(self, layer: PackedLinear, wide: bool | None = None):
        """wide: decode with AVX-512 (default: wide_available())."""
        layer = layer.to("cpu")
        packed = [pack_rows(unpack_indices(layer.qweight[:, first:first + PACK_ROWS], layer.bits)
                            [:, : layer.in_features].to(torch.int32), layer.bits)
                  for first in range(0, layer.out_features, PACK_ROWS)]
        self.indices = torch.cat([rows for rows, _, _ in packed]).contiguous()
        _, runs, last_lane_bytes = packed[0]
        self.scales = decoded_s(layer).contiguous()
        self.offsets = decoded_b(layer).contiguous()
        entries = layer.v.shape[2]
        self.tables = layer.v.float()[..., torch.arange(TABLE_WIDTH) % entries].contiguous()
        self.table_index = layer.v_index.to(torch.int32).contiguous()
        self.out_features, self.in_features = layer.out_features, layer.in_features
        wide = wide_available() if wide is None else wide
        # The largest |codebook entry| each block of 64 values meets, for the int8 expansion (AVX-512).
        self.tops = torch.empty(layer.out_features, -(-layer.in_features // 64)) if wide else torch.empty(0)
        self.fields = _Fields(self.indices.data_ptr(), self.scales.data_ptr(), self.offsets.data_ptr(),
                              self.tables.data_ptr(), self.table_index.data_ptr(), layer.out_features,
                              layer.in_features, layer.group_size, layer.num_groups, layer.rank, layer.bits, runs,
                              last_lane_bytes, self.indices.shape[1], int(wide),
                              self.tops.data_ptr() if wide else None)
        self.pointer = ctypes.addressof(self.fields)
        self.byte_rows = torch.empty(0, dtype=torch.int32)
        if wide:
            library().lcq_index_block_tops(self.pointer, self.tops.data_ptr())
        self.books = torch.empty(0, dtype=torch.uint8)
        self.bits, self.group_size, self.num_groups = layer.bits, layer.group_size, layer.num_groups

    @property
    def byte_rows_nbytes(self) -> int:
        """What keep_byte_rows would keep: the int8 form of every weight, 1.125 bytes per weight at
        K = 576 (a byte per value, a scale and an offset per 64), where the AVX-512 form runs on a CPU
        with int8 products (AVX512_VNNI and AVX512_VBMI, which expanding to it needs); else 0."""
        if not self.fields.wide or not products_available(torch.int8):
            return 0
        return 4 * library().lcq_index_byte_words(self.out_features, self.in_features)

    def keep_byte_rows(self) -> int:
        """Expand every row to the int8 form now, once, for int8 products to read where they would
        expand each block of rows per call (the same bytes, so the same outputs); returns the bytes
        kept (0 where the AVX-512 form does not run). Memory for speed: decode steps of many
        sequences spend a tenth of their time expanding (docs/kernels.md)."""
        size = self.byte_rows_nbytes
        if size and not self.byte_rows.numel():
            self.byte_rows = torch.empty(size // 4, dtype=torch.int32)
            if library().lcq_index_byte_rows(self.pointer, self.byte_rows.data_ptr()):
                raise MemoryError("lcq_index_byte_rows could not allocate its buffers")
            self.fields.byte_rows = self.byte_rows.data_ptr()
        return size

    def keep_books(self) -> int:
        """Keep each group's codebook in bytes beside its scale (4 + 2^b bytes a group: 0.06 bytes per
        weight at W2 g128, 0.31 at W4 g64), from which int8 products of a few rows (decode) read the
        weights instead of S and B (cpu_gemm.c's lcq_byte_decode_rows and lcq_shuffle_decode_rows): 1.1-2.1x
        the fp32 decode form at batch 1 on a Zen 4. Only where groups are whole blocks of 64 values, and
        either the AVX-512 form runs with its int8 products, or those do not run and the weight has 2 or 4
        bits (the AVX2 shuffle form); returns the bytes kept (else 0)."""
        if self.group_size % 64 or not (self.fields.wide and products_available(torch.int8) or
                                        self.bits in SHUFFLE_BITS and not products_available(torch.int8)):
            return 0
        if not self.books.numel():  # padded: the kernels load 16 bytes of a book, or 32 of four, at a time
            self.books = torch.zeros(self.out_features * self.num_groups * (4 + 2 ** self.bits) + 32,
                                     dtype=torch.uint8)
            library().lcq_index_byte_books(self.pointer, self.books.data_ptr())
            self.fields.books = self.books.data_ptr()
        return self.books.numel()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.indices, self.scales, self.offsets, self.tables, self.table_index, self.tops,
                             self.byte_rows, self.books))

    def linear(self, x: torch.Tensor, swiglu: bool = False) -> torch.Tensor:
        """x (..., K) float32 -> (..., N) float32; with swiglu (the layer is [gate; up]) silu(x @ gate^T)
        * (x @ up^T), (..., N / 2), the product finishing it block by block."""
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        if x.dtype != torch.float32 or rows.shape[1] != self.in_features or (swiglu and self.out_features % 2):
            raise ValueError(f"IndexWeight.linear takes float32 (..., {self.in_features}), got {x.dtype} "
                             f"{tuple(x.shape)}")
        width = self.out_features // (2 if swiglu else 1)
        y = torch.empty(rows.shape[0], width)
        if rows.shape[0] and library().lcq_index_matmul(rows.data_ptr(), rows.shape[0], self.pointer, int(swiglu),
                                                        y.data_ptr()):
            raise MemoryError("lcq_index_matmul could not allocate its buffers")
        return y.reshape(*x.shape[:-1], width)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels (native.load), or None where they cannot run here."""
    lib = native.load()
    if lib is not None:
        lib.lcq_index_matmul.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                         ctypes.c_void_p]
        lib.lcq_index_matmul.restype = ctypes.c_int
        lib.lcq_index_block_tops.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.lcq_index_block_tops.restype = None
        lib.lcq_index_byte_books.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.lcq_index_byte_books.restype = None
        lib.lcq_index_byte_rows.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.lcq_index_byte_rows.restype = ctypes.c_int
        lib.lcq_index_byte_words.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.lcq_index_byte_words.restype = ctypes.c_int64
    return lib
