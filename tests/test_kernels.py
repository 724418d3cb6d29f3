"""Every LCQ matrix-product path against the reference dequantization (lcq.format.dequantize).

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (set in conftest.py) on CPU tensors,
with small explicit tiles so that N and K are not multiples of the blocks, the last group is
partial, and split-K slices meet (some of them empty). The reference is float64.

Tolerances, as ||y - ref|| / ||ref||: fp32 1e-5 (fp32 arithmetic throughout); fp16 3e-3 and bf16
2e-2: the kernels round the dequantized weights to the activation dtype before tl.dot (like a
dense fp16/bf16 layer, relative error 2^-11 / 2^-8 per weight) and the output to that dtype.
"""
import itertools
import json
import os
import re
import subprocess
import shutil
import sys
from pathlib import Path

import pytest
import torch

from lcq.format import PackedLinear, dequantize, dual_quantize, encode_linear, layer_codebooks
from lcq.kernels import LCQLinear, cpu_half, cpu_index, cpu_ops, lcq_linear, native
from lcq.kernels import arrival_counters as arrival_counters_module
from lcq.kernels.arrival_counters import arrival_counters
from lcq.kernels.byte_products import ROUNDING_BOUND, byte_book_weights, byte_products_reference
from lcq.kernels.cpu_matmul import (amx_active, amx_tiles, byte_pair_rows, can_pack, cpu_products, dense_linear,
                                    half_copy, pack_weight, paired_group_kb, products_available)
from lcq.paths import cache_dir
from tests.test_format import random_layer

triton_linear = pytest.importorskip("lcq.kernels.triton_linear")
from lcq.kernels import triton_configs, triton_pair_table, triton_tiles  # noqa: E402 (past the skip without triton)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
SMALL_DECODE = {"BLOCK_N": 16, "SPLIT_K": 3}
SMALL_GEMM = {"BLOCK_M": 16, "BLOCK_N": 16, "GROUP_M": 2}


def reference(x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
    y = x.double() @ dequantize(layer).double().t()
    return y if layer.bias is None else y + layer.bias.double()


def assert_close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, tolerance: float | None = None) -> None:
    assert y.dtype == dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    error = ((y.double() - ref).norm() / ref.norm()).item()
    assert error < (tolerance or TOLERANCE[dtype]), f"relative error {error:.2e}"


# A covering subset, not the cross product: every bit width meets ranks 1 and 3, both group sizes
# 32 and 64 (128 once), every M path (FMA at 1 and 2, tl.dot at 3, 16 and 33), both per-weight forms
# (selects at 2 bits, V gathers at 3 and 4) and every dtype.
DECODE_CASES = [  # bits, rank, group, K, M, dtype
    (2, 1, 32, 80, 1, torch.float32),
    (2, 3, 64, 100, 16, torch.float16),
    (3, 3, 32, 80, 3, torch.bfloat16),
    (3, 1, 64, 100, 1, torch.bfloat16),
    (4, 3, 32, 80, 2, torch.float16),
    (4, 1, 128, 150, 3, torch.float32),
    (2, 2, 64, 100, 33, torch.float16),
]


# PREFETCH loads each tile's codes one (2: two) iterations ahead: with 3 slices most hold one tile (only the
# prologue's load and the masked one past the slice), with one slice all 2-4 tiles pass through it.
PREFETCHING = [{"PREFETCH": False}, {"PREFETCH": True}, {"PREFETCH": True, "SPLIT_K": 1}, {"PREFETCH": 2},
               {"PREFETCH": 2, "SPLIT_K": 1}]


@pytest.mark.parametrize("prefetch", PREFETCHING, ids=["", "prefetch", "prefetch-one-slice", "two-ahead",
                                                     "two-ahead-one-slice"])
@pytest.mark.parametrize("bits,rank,group,k,m,dtype", DECODE_CASES)
def test_decode_kernel_matches_reference(bits, rank, group, k, m, dtype, prefetch):
    layer = random_layer(40, k, bits, rank, group, seed=bits * 10 + rank)
    x = torch.randn(m, k).to(dtype)
    assert_close(triton_linear.decode(x, layer, {**SMALL_DECODE, **prefetch}), reference(x, layer), dtype)


@pytest.mark.parametrize("prefetch", PREFETCHING, ids=["", "prefetch", "prefetch-one-slice", "two-ahead",
                                                     "two-ahead-one-slice"])
@pytest.mark.parametrize("bits,rank,group,k,m,dtype,block_k",
                         [(*case, None) for case in DECODE_CASES if case[4] <= 2] +
                         [(2, 2, 128, 300, 1, torch.float16, 128), (4, 1, 128, 300, 2, torch.float32, 128)])
def test_decode_kernel_reducing_each_tile_matches_reference(bits, rank, group, k, m, dtype, block_k, prefetch):
    """The FMA form with REDUCE_K (each tile's products summed over K in the loop), also 128 deep."""
    layer = random_layer(40, k, bits, rank, group, seed=bits * 10 + rank)
    x = torch.randn(m, k).to(dtype)
    config = {**SMALL_DECODE, "REDUCE_K": True, **prefetch, **({"BLOCK_K": block_k} if block_k else {})}
    assert_close(triton_linear.decode(x, layer, config), reference(x, layer), dtype)


@pytest.mark.parametrize("bits,rank,group,k,m,dtype", [
    (3, 3, 32, 80, 1, torch.bfloat16), (4, 1, 64, 100, 2, torch.float16), (4, 4, 128, 150, 1, torch.float32),
    (3, 1, 64, 100, 16, torch.float16), (4, 3, 32, 80, 33, torch.bfloat16), (2, 2, 64, 100, 16, torch.float16),
    (2, 3, 32, 80, 33, torch.bfloat16)])
@pytest.mark.parametrize("prefetch", [False, True])
def test_decode_kernel_with_column_codebooks_matches_reference(bits, rank, group, k, m, dtype, prefetch):
    """BOOK: each column's 2^bits codebook entries built once a tile, each weight gathered from them; at 3 and 4
    bits the FMA form (reducing each tile or not) and the tl.dot form, at 2 bits the tl.dot form; ranks 1-4,
    partial groups."""
    layer = random_layer(40, k, bits, rank, group, seed=bits * 10 + rank)
    x = torch.randn(m, k).to(dtype)
    for reduce_k in (False, True) if m <= 2 else (False,):
        config = {**SMALL_DECODE, "BOOK": True, "REDUCE_K": reduce_k, "PREFETCH": prefetch}
        assert_close(triton_linear.decode(x, layer, config), reference(x, layer), dtype)


@pytest.mark.parametrize("prefetch", PREFETCHING, ids=["", "prefetch", "prefetch-one-slice", "two-ahead",
                                                     "two-ahead-one-slice"])
@pytest.mark.parametrize("rank,group,k,dtype,block_k", [(1, 32, 80, torch.float32, None),
                                                         (3, 64, 100, torch.float16, None),
                                                         (2, 128, 300, torch.bfloat16, 128),
                                                         (4, 64, 150, torch.float16, 32)])
def test_decode_kernel_with_the_pair_table_matches_reference(rank, group, k, dtype, block_k, prefetch):
    """One row of a 2-bit layer from the activation-side pair table (LUT): every rank (4 pads to itself, 3 to
    4), partial last groups, tiles as deep as the group or shallower."""
    layer = random_layer(40, k, 2, rank, group, seed=rank)
    x = torch.randn(1, k).to(dtype)
    config = {**SMALL_DECODE, **prefetch, **({"BLOCK_K": block_k} if block_k else {})}
    assert_close(triton_linear.decode(x, layer, config, lut=True), reference(x, layer), dtype)


@pytest.mark.parametrize("bits,rank,group,k,m,dtype,config", [
    (2, 1, 32, 80, 1, torch.float32, {}), (2, 3, 64, 100, 2, torch.float16, {"PREFETCH": True}),
    (2, 2, 128, 300, 1, torch.bfloat16, {"PREFETCH": True, "BLOCK_K": 128}),
    (2, 4, 64, 150, 2, torch.float32, {"PREFETCH": 2, "SPLIT_K": 1}),
    (2, 2, 128, 300, 2, torch.float32, {"BLOCK_K": 128, "SPLIT_K": 1, "bias": True}),
    (2, 2, 128, 300, 1, torch.float32, {"PREFETCH": True, "BLOCK_K": 128, "BLOCK_N": 64, "SPLIT_K": 2}),
    (4, 1, 32, 80, 1, torch.float32, {}), (4, 3, 64, 100, 2, torch.float16, {"PREFETCH": True}),
    (4, 2, 128, 300, 1, torch.float32, {"PREFETCH": True, "BLOCK_K": 128, "bias": True}),
    (4, 4, 128, 300, 2, torch.bfloat16, {"PREFETCH": 2, "BLOCK_K": 64, "SPLIT_K": 1}),
    (3, 1, 32, 80, 1, torch.float32, {}), (3, 3, 64, 100, 2, torch.float16, {"PREFETCH": True}),
    (3, 2, 128, 300, 1, torch.float32, {"PREFETCH": True, "BLOCK_K": 128, "bias": True}),
    (3, 4, 128, 300, 2, torch.bfloat16, {"PREFETCH": 2, "BLOCK_K": 64, "SPLIT_K": 1}),
    # STAGES: the words through the pipeliner's shared memory, PREFETCH then carrying the codes and inputs only
    (2, 2, 128, 300, 1, torch.float16, {"STAGES": 3, "BLOCK_K": 128, "SPLIT_K": 1}),
    (2, 3, 64, 100, 2, torch.float32, {"STAGES": 3, "PREFETCH": True, "SPLIT_K": 1, "bias": True}),
    (3, 2, 128, 300, 1, torch.float32, {"STAGES": 3, "PREFETCH": True, "BLOCK_K": 64}),
    (4, 2, 128, 300, 2, torch.bfloat16, {"STAGES": 3, "PREFETCH": True, "BLOCK_K": 64, "SPLIT_K": 1})])
def test_decode_kernel_with_products_of_bytes_matches_their_reference(bits, rank, group, k, m, dtype, config):
    """INT8 (1-2 rows of a 2-, 3- or 4-bit layer): the kernel computes what byte_products_reference states, to the
    rounding of fp32 sums and of the output dtype (a wrong selector, input order or scale is off by far
    more); every rank, partial last groups, tiles as deep as the group or shallower, split or not."""
    config = dict(config)
    layer = random_layer(40, k, bits, rank, group, seed=rank, bias=config.pop("bias", False))
    x = torch.randn(m, k).to(dtype)
    y = triton_linear.decode(x, layer, {**SMALL_DECODE, "REDUCE_K": True, **config}, int8=True)
    assert_close(y, byte_products_reference(x, layer), dtype)


@pytest.mark.parametrize("bits,rank,group,k,m,dtype,config", [
    (2, 2, 128, 300, 1, torch.float16, {"PREFETCH": True, "BLOCK_K": 128}),
    (2, 3, 64, 100, 2, torch.float32, {"PREFETCH": 2, "SPLIT_K": 1, "bias": True}),
    (3, 2, 128, 300, 2, torch.bfloat16, {"PREFETCH": True, "BLOCK_K": 64}),
    (4, 1, 32, 80, 1, torch.float32, {}), (4, 2, 128, 300, 2, torch.float16, {"PREFETCH": True, "BLOCK_K": 128})])
def test_products_of_bytes_of_prepared_inputs_match_their_reference(bits, rank, group, k, m, dtype, config):
    """The inputs rounded to bytes once by their own kernel (input_bytes: each run's bytes in the selectors' order,
    its scale and its sum), not in every program: the same products (byte_products_reference), partial last
    groups and tiles shallower than the group included."""
    config = dict(config)
    layer = random_layer(40, k, bits, rank, group, seed=rank, bias=config.pop("bias", False))
    x = torch.randn(m, k).to(dtype)
    y = triton_linear.decode(x, layer, {**SMALL_DECODE, "REDUCE_K": True, **config}, int8=True, prepared=True)
    assert_close(y, byte_products_reference(x, layer), dtype)
    with pytest.raises(ValueError, match="products of bytes only"):
        triton_linear.decode(x, layer, SMALL_DECODE, int8=False, prepared=True)


@pytest.mark.parametrize("bits,rank,group", [(2, 1, 32), (2, 2, 128), (2, 4, 64), (3, 1, 128), (4, 2, 64)])
def test_products_of_bytes_are_close_to_the_exact_product(bits, rank, group):
    """byte_products_reference rounds (it is not the exact product) within ROUNDING_BOUND of it."""
    layer = random_layer(64, 512, bits, rank, group, seed=rank, bias=True)
    x = torch.randn(2, 512)
    exact = reference(x, layer)
    error = ((byte_products_reference(x, layer) - exact).norm() / exact.norm()).item()
    assert 1e-4 < error < ROUNDING_BOUND


def test_products_of_bytes_are_asked_for_and_serve_two_bit_rows_only(monkeypatch):
    """For CUDA rows only, whatever LCQ_INT8_DECODE says (the interpreter's tests ask explicitly; the GPU tests
    check that CUDA rows take them unless LCQ_INT8_DECODE=0); a batch they cannot serve is refused, not computed
    otherwise."""
    layer = random_layer(40, 128, 2, 2, 64)
    x = torch.randn(1, 128)
    assert not triton_linear.int8_decode(x, 1, 2)
    monkeypatch.setenv("LCQ_INT8_DECODE", "1")
    assert not triton_linear.int8_decode(x, 1, 2)
    with pytest.raises(ValueError, match="1-2 rows, not 3"):
        triton_linear.decode(torch.randn(3, 128), layer, SMALL_DECODE, int8=True)
    with pytest.raises(ValueError, match="with the pair table"):
        triton_linear.decode(x, layer, SMALL_DECODE, lut=True, int8=True)


@pytest.mark.parametrize("select", [True, False])
def test_autotuner_times_products_of_bytes_with_their_own_configs(select):
    """INT8: its own tiles, at 2 bits (SELECT) up to 512 columns, at 4 one column a thread, 128 deep where the
    group holds it, split up to 64 ways, with and without PREFETCH, each also with the words pipelined (STAGES 3),
    none of the other forms' configs."""
    tiles = {(64, 2), (128, 4), (256, 2), (512, 4)} if select else {(64, 2), (128, 4)}
    for group in (32, 64, 128):
        kept = triton_configs._decode_configs_for(triton_configs.DECODE_CONFIGS, {}, BLOCK_M=1, GROUP=group,
                                                 SELECT=select, INT8=True)
        assert {(c.kwargs["BLOCK_N"], c.num_warps) for c in kept} == tiles
        assert {c.kwargs["BLOCK_K"] for c in kept} == {group}
        assert {c.kwargs["SPLIT_K"] for c in kept} == {8, 16, 32, 64}
        assert {c.kwargs["PREFETCH"] for c in kept} == {False, True}
        assert {c.kwargs.get("STAGES") for c in kept} == {None, 3}
        assert len(kept) == len(tiles) * 16


def byte_book_reference(x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
    y = x.double() @ byte_book_weights(layer).t()
    return y if layer.bias is None else y + layer.bias.double()


# The interpreter's bf16 outputs are truncated, not rounded: 3.1-3.5e-3 off the reference, where (in an earlier
# form) a raw offset one off was 1.3-2.0e-2 off and passed TOLERANCE's bf16 bound in 4 of 5 cases.
BYTE_BOOK_TOLERANCE = {torch.float16: TOLERANCE[torch.float16], torch.bfloat16: 6e-3}


@pytest.mark.parametrize("bits,rank,group,k,m,dtype,config", [
    (2, 1, 32, 80, 1, torch.float16, {}), (2, 3, 64, 100, 16, torch.bfloat16, {"PREFETCH": True}),
    (2, 2, 128, 300, 33, torch.float16, {"BLOCK_K": 128, "bias": True}),
    (2, 4, 128, 300, 16, torch.bfloat16, {"PREFETCH": 2, "BLOCK_K": 128, "SPLIT_K": 1}),
    (3, 1, 32, 80, 2, torch.bfloat16, {}), (3, 3, 64, 100, 5, torch.float16, {"PREFETCH": True}),
    (3, 2, 128, 300, 16, torch.float16, {"PREFETCH": True, "BLOCK_K": 128, "bias": True}),
    (4, 1, 32, 80, 16, torch.float16, {"PREFETCH": True}), (4, 3, 64, 100, 9, torch.bfloat16, {}),
    (4, 2, 128, 300, 32, torch.float16, {"PREFETCH": 2, "BLOCK_K": 128, "SPLIT_K": 1}),
    (4, 4, 128, 300, 16, torch.bfloat16, {"BLOCK_K": 64, "bias": True}),
    (2, 2, 128, 300, 16, torch.float16, {"STAGES": 3, "BLOCK_K": 128, "SPLIT_K": 1}),
    (3, 2, 64, 100, 16, torch.bfloat16, {"STAGES": 3, "PREFETCH": True, "SPLIT_K": 1, "bias": True})])
def test_decode_kernel_with_byte_codebooks_matches_their_reference(bits, rank, group, k, m, dtype, config):
    """BYTE_BOOK (fp16 or bf16, 1 row and up, in tiles of 16 or more): the kernel multiplies by the weights
    byte_book_weights states, to the rounding of the output dtype; a wrong pick, slot, input order, raw offset,
    step or midrange is off by far more. Every width and rank, partial last groups, tiles as deep as the group or
    shallower, split or not."""
    config = dict(config)
    layer = random_layer(40, k, bits, rank, group, seed=rank, bias=config.pop("bias", False))
    x = torch.randn(m, k).to(dtype)
    y = triton_linear.decode(x, layer, {**SMALL_DECODE, **config}, byte_book=True)
    assert_close(y, byte_book_reference(x, layer), dtype, BYTE_BOOK_TOLERANCE[dtype])


@pytest.mark.parametrize("bits,rank,group", [(2, 1, 32), (2, 2, 128), (3, 1, 128), (4, 2, 64), (4, 4, 128)])
def test_byte_codebooks_are_close_to_the_exact_weights(bits, rank, group):
    """byte_book_weights rounds each codebook to 127 levels either side of its midrange: well within
    ROUNDING_BOUND of the exact weights."""
    layer = random_layer(64, 512, bits, rank, group, seed=rank, bias=True)
    exact = dequantize(layer).double()
    assert 1e-5 < ((byte_book_weights(layer) - exact).norm() / exact.norm()).item() < ROUNDING_BOUND / 4


def test_byte_codebooks_are_asked_for_and_serve_up_to_32_rows_of_half_inputs(monkeypatch):
    """For CUDA launches of up to 32 rows of fp16 or bf16 only, whatever LCQ_BYTE_BOOK says (1-2 rows in tiles of
    16; the interpreter's tests ask explicitly), 1-2 rows left to products of bytes where those are on too; a
    launch they cannot serve is refused, not computed otherwise."""
    layer = random_layer(40, 128, 2, 2, 64)
    x = torch.randn(4, 128, dtype=torch.float16)
    assert not triton_linear.byte_book_decode(x, 16, 2)
    monkeypatch.setenv("LCQ_BYTE_BOOK", "1")
    assert not triton_linear.byte_book_decode(x, 16, 2)
    assert [triton_linear.byte_book_block_m(m) for m in (1, 2, 3, 16, 17, 32)] == [16, 16, 16, 16, 32, 32]
    with pytest.raises(ValueError, match="not 16 rows of torch.float32"):
        triton_linear.decode(x.float(), layer, SMALL_DECODE, byte_book=True)
    with pytest.raises(ValueError, match="neither products of bytes nor the pair table"):
        triton_linear.decode(x[:1], layer, SMALL_DECODE, byte_book=True, int8=True)
    with pytest.raises(ValueError, match="neither products of bytes nor the pair table"):
        triton_linear.decode(x[:1], layer, SMALL_DECODE, byte_book=True, lut=True)


def test_autotuner_times_byte_codebooks_with_their_own_configs():
    """BYTE_BOOK: its own tiles (64 and 128 columns per 4 warps, 256 per 8), one stage, 128 deep where the group
    holds it, split 2 to 16 ways, with and without PREFETCH, each with the words pipelined (STAGES 3) or not, none of
    the other forms' configs."""
    for group, select in itertools.product((32, 64, 128), (True, False)):
        kept = triton_configs._decode_configs_for(triton_configs.DECODE_CONFIGS, {}, BLOCK_M=16, GROUP=group,
                                                 SELECT=select, BYTE_BOOK=True)
        assert {(c.kwargs["BLOCK_N"], c.num_warps) for c in kept} == {(64, 4), (128, 4), (256, 8)}
        assert {c.kwargs["BLOCK_K"] for c in kept} == {group}
        assert {c.kwargs["SPLIT_K"] for c in kept} == {2, 4, 8, 16}
        assert {c.kwargs["PREFETCH"] for c in kept} == {False, True}
        assert {c.kwargs.get("STAGES") for c in kept} == {None, 3}
        assert {c.num_stages for c in kept} == {1} and len(kept) == 48


@pytest.mark.parametrize("bits", [2, 4])
def test_byte_codebook_weights_reach_the_tensor_cores_in_registers(bits):
    """The sm_90 build of the byte-codebook tile at 16 rows (compiled here by the installed Triton and its ptxas,
    in a process without the interpreter; no GPU): the PTX assembles, the loop multiplies on the tensor cores, and
    it stores no single 2-byte weight to shared memory. With the weights' byte positions from tl.arange, or the
    steps applied per weight, Triton 3.6 stored every weight there on its way to the tensor cores (one STS.U16
    per weight), which took half the loop."""
    code = ("import sys; sys.path.insert(0, '.'); from bench.kernels import compile_kernel, inner_loop, sass_of; "
            f"sass, _ = sass_of(compile_kernel('decode', {bits}, 2, 128, 16, 128, 4, prefetch=True, stages=1, "
            "depth=128, byte_book=True)); loop = inner_loop(sass); "
            "print(sum('STS.U16' in line for line in loop), sum('MMA' in line for line in loop))")
    stores, products = _compiled_counts(code)
    assert stores == 0 and products > 0


def test_column_codebooks_range_within_a_thread_in_the_sm90_build():
    """The sm_90 build of the one-row product of bytes of prepared inputs (compiled here by the installed Triton, no
    GPU; the prepared inputs leave the loop no reduction over inputs) takes each column's codebook range without
    warp shuffles: on Triton 3.7-3.9 V's entries gathered (columns, entries) went across threads, and the range's
    butterflies were 80 shuffles and 80 more min/max a loop at W2 r2, 256 columns per 2 warps (2.95 instructions
    per weight against 1.94 with _table_entries)."""
    code = ("import sys; sys.path.insert(0, '.'); from bench.kernels import compile_kernel, inner_loop, sass_of; "
            "sass, _ = sass_of(compile_kernel('decode', 2, 2, 128, 1, 256, 2, True, True, depth=128, int8=True, "
            "prepared=True)); loop = inner_loop(sass); "
            "print(sum('SHFL' in line for line in loop), sum('IDP.4A' in line for line in loop))")
    shuffles, products = _compiled_counts(code)
    assert shuffles == 0 and products > 0


def _compiled_counts(code: str) -> tuple[int, int]:
    """The two counts `code` prints last, run in a process of its own without the interpreter (a compile for sm_90
    by the installed Triton and its ptxas; no GPU)."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    first, second = map(int, result.stdout.split()[-2:])
    return first, second


@pytest.mark.parametrize("bits", [2, 4])
def test_products_of_bytes_of_prepared_inputs_build_for_sm90(bits):
    """The sm_90 builds of products of bytes of prepared inputs and of the kernel that prepares them (compiled here
    by the installed Triton and its ptxas, in a process without the interpreter; no GPU: what the interpreter
    accepts the compiler may refuse, as it refused the fp8 cache's NaN mode): both assemble (the preparing kernel with
    the MLP's activation at 2 bits, with the residual stream's norm at 4), and the product's loop multiplies bytes
    (dp4a)."""
    code = ("import sys; sys.path.insert(0, '.'); import triton; from triton.backends.compiler import GPUTarget; "
            "from triton.compiler import ASTSource; from bench.kernels import compile_kernel, inner_loop, sass_of; "
            "from lcq.kernels.triton_bytes import _input_bytes_kernel as kernel; "
            f"sass, _ = sass_of(compile_kernel('decode', {bits}, 2, 128, 1, 128, 4, True, True, depth=128, int8=True, "
            "prepared=True)); "
            "names = kernel.arg_names; "
            "signature = {'x_ptr': '*fp16', 'out_ptr': '*i32', 'norm_ptr': '*fp16', 'partials_ptr': '*fp32', "
            "'eps': 'fp32', 'PARTIALS': 'i32', 'K': 'i32', 'RUNS': 'i32', 'stride_xm': 'i32', 'stride_om': 'i32', "
            "'BITS': 'constexpr', 'BLOCK_RUNS': 'constexpr', 'GATED': 'constexpr', 'NORMED': 'constexpr', "
            "'NORM_PARTS': 'constexpr', 'PDL': 'constexpr'}; "
            f"constants = {{(names.index('BITS'),): {bits}, (names.index('BLOCK_RUNS'),): 64, "
            f"(names.index('GATED'),): {int(bits == 2)}, (names.index('NORMED'),): {bits == 4}, "
            "(names.index('NORM_PARTS'),): 256, (names.index('PDL'),): True}; "
            "ptx = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants), "
            "target=GPUTarget('cuda', 90, 32), options={'launch_pdl': True}).asm['ptx']; "
            "print(sum('IDP.4A' in line for line in inner_loop(sass)), int('st.global' in ptx))")
    products, stores = _compiled_counts(code)
    assert products > 0 and stores == 1


def test_pair_table_holds_both_products_of_every_index_pair():
    layer = random_layer(8, 70, 2, 3, 32, seed=1)
    x = torch.randn(1, 70)
    table = triton_pair_table.pair_table(x, layer, 48)  # 35 pairs of inputs, padded to the groups' 48
    v = layer.v.float().reshape(-1, 3, 4)[0]  # (ranks, entries) of the layer's one table
    padded = torch.nn.functional.pad(x[0], (0, 96 - 70)).view(48, 2)
    torch.testing.assert_close(table[:3], padded.view(3, 32).sum(dim=1))  # the sum of each 32 inputs first
    table = table[3:].view(1, 48, 16, 4)
    for combo in (0, 6, 15):
        expected = padded[:, :1] * v[:, combo & 3] + padded[:, 1:] * v[:, combo >> 2]  # (pairs, ranks)
        torch.testing.assert_close(table[0, :, combo, :3], expected)
    assert torch.equal(table[0, :, :, 3], torch.zeros(48, 16))  # rank 3 padded to 4


def test_autotuner_times_each_form_with_its_own_configs():
    """1-2 rows: the FMA form's tiles, with and without REDUCE_K, split up to 64 ways; from 16 rows the
    tl.dot form's (REDUCE_K changes nothing there), split at most 16 ways; a mixture's experts, whose
    workspace grows with their rows, at most 16 ways at any M. PREFETCH timed three ways everywhere (none, one
    or two tiles ahead); tiles 128 deep (REDUCE_K only) at 2 bits where the group holds them, each depth
    dividing the group; column codebooks (BOOK) for tl.dot, and at 3-4 bits for the FMA form too, where the
    installed Triton takes them in warp shuffles (COLUMN_BOOKS)."""
    configs = triton_configs.DECODE_CONFIGS
    for block_m, grouped, group, select in itertools.product((1, 2, 16, 64), (False, True), (32, 64, 128),
                                                             (True, False)):
        kept = triton_configs._decode_configs_for(configs, {}, BLOCK_M=block_m, GROUPED=grouped, GROUP=group,
                                                 SELECT=select)
        fma = block_m < 16
        deep = fma and group == 128 and select
        most = 64 if fma and not grouped else 16
        assert kept and all(c.kwargs["SPLIT_K"] <= most for c in kept)
        assert max(c.kwargs["SPLIT_K"] for c in kept) == most
        assert {c.kwargs["REDUCE_K"] for c in kept} == ({False, True} if fma else {False})
        assert {c.kwargs["PREFETCH"] for c in kept} == {False, True, 2}
        depths = {c.kwargs["BLOCK_K"] for c in kept}
        assert depths == ({64, 128} if deep else {min(group, 64)})
        assert all(c.kwargs["REDUCE_K"] for c in kept if c.kwargs["BLOCK_K"] == 128)
        described = [(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in kept]
        assert len(described) == len(set(described))
        tuned_forms = triton_configs.FMA_DECODE_CONFIGS if fma else triton_configs.DOT_DECODE_CONFIGS
        books = bool(triton_tiles.COLUMN_BOOKS) and not (select and fma)
        assert {c.kwargs.get("BOOK", False) for c in kept} == ({False, True} if books else {False})
        assert len(kept) == sum(c.kwargs["SPLIT_K"] <= most and (deep or c.kwargs["BLOCK_K"] == 64) and
                                (books or not c.kwargs.get("BOOK")) for c in tuned_forms)


def test_autotuner_times_the_pair_table_with_its_own_configs():
    """One row at 2 bits from the pair table: its tiles 64 or 128 deep where the group holds them, split up
    to 32 ways, PREFETCH none, one or two tiles ahead, none of the other forms' configs."""
    for group in (32, 64, 128):
        kept = triton_configs._decode_configs_for(triton_configs.DECODE_CONFIGS, {}, BLOCK_M=1, GROUP=group,
                                                 SELECT=True, LUT=True)
        assert all(any(c.kwargs["BLOCK_N"] == f.kwargs["BLOCK_N"] and c.num_warps == f.num_warps
                       for f in triton_configs.LUT_DECODE_CONFIGS) for c in kept)
        assert {c.kwargs["BLOCK_K"] for c in kept} == ({64, 128} if group == 128 else {min(group, 64)})
        assert {c.kwargs["SPLIT_K"] for c in kept} == {8, 16, 32}
        assert {c.kwargs["PREFETCH"] for c in kept} == {False, True, 2}
        assert not any(c.kwargs["REDUCE_K"] for c in kept)
        assert len(kept) == (54 if group == 128 else 27)


@pytest.mark.parametrize("m, grouped, lut", [(1, False, False), (3, False, False), (2, True, False), (1, False, True)])
def test_autotuned_decode_launch_runs_each_config(monkeypatch, m, grouped, lut):
    """The autotuner's own launch path with a stand-in timer (on a GPU only graph_time differs): configs
    carrying the run-time SPLIT_K and the tile depth, the early prune, the grid of the chosen config.
    A subset of the configs, for the interpreter's sake: one tile width and split."""
    from lcq.kernels.experts import ExpertRoutes, PackedExperts

    timed = []

    def stand_in_timer(kernel_call, quantiles):
        kernel_call()
        timed.append(1.0 + len(timed))  # the first config timed wins
        return [timed[-1]] * len(quantiles)

    subset = [c for c in triton_configs.DECODE_CONFIGS if c.kwargs["BLOCK_N"] == 64 and c.kwargs["SPLIT_K"] == 8]
    tuned = triton_linear.triton.autotune(subset, key=triton_linear._KEY + ["BLOCK_M", "GROUPED", "LUT"],
                                          do_bench=stand_in_timer,
                                          prune_configs_by={"early_config_prune": triton_configs._decode_configs_for}
                                          )(triton_linear._decode_kernel)
    monkeypatch.setattr(triton_linear, "_decode_tuned", tuned)
    monkeypatch.setattr(triton_linear, "INTERPRETER_DECODE_CONFIG", None)
    layers = [random_layer(40, 256, 2, 2, 128, seed=m + e) for e in range(2)]
    x = torch.randn(m, 256, dtype=torch.float16)
    if grouped:  # token 0 to expert 0, token 1 to expert 1
        routes = ExpertRoutes.of(torch.tensor([[0], [1]]), 2)
        y = triton_linear.grouped_decode(x, PackedExperts.stack(layers), routes, 1)
        for token in range(m):
            assert_close(y[token:token + 1], reference(x[token:token + 1], layers[token]), torch.float16)
        block_m = routes.block_m
    else:
        assert_close(triton_linear.decode(x, layers[0], lut=lut), reference(x, layers[0]), torch.float16)
        block_m = triton_linear.decode_block_m(m)
        # FMA: (REDUCE_K, depth) 3 x PREFETCH 3; tl.dot: PREFETCH 3 x stages 2, and column codebooks where the
        # installed Triton takes them (COLUMN_BOOKS); the pair table: depth 2 x PREFETCH 3
        assert len(timed) == (6 if lut else 6 + bool(triton_tiles.COLUMN_BOOKS) if m >= 3 else 9)
    assert len(timed) == len(triton_configs._decode_configs_for(subset, {}, BLOCK_M=block_m, GROUPED=grouped,
                                                                GROUP=128, SELECT=True, LUT=lut))
    assert tuned.best_config.kwargs["SPLIT_K"] == 8


def test_a_gpus_pretuned_config_is_taken_instead_of_tuning(monkeypatch, tmp_path):
    """A GPU's table of pre-tuned configs, written by bench/autotune_table.py --pretuned from the autotuner's own
    files: a launch whose key it holds takes its config and times none (the real autotuner's launch path, in the
    interpreter); a table of another Triton release, a config the autotuner would not time, or LCQ_PRETUNED=0
    leave the key to tuning."""
    import contextlib
    import functools

    from bench.autotune_table import pretuned
    from lcq.kernels import tuned_configs
    from lcq.kernels.compile_ahead import compiling_ahead, tuning_key

    timed = []

    def stand_in_timer(kernel_call, quantiles):
        kernel_call()
        timed.append(1.0)
        return [1.0] * len(quantiles)

    subset = [c for c in triton_configs.DECODE_CONFIGS if c.kwargs["BLOCK_N"] == 64 and c.kwargs["SPLIT_K"] == 8]

    def fresh_tuner():
        return triton_linear.triton.autotune(subset, key=triton_linear._KEY + ["BLOCK_M", "GROUPED", "LUT"],
                                             do_bench=stand_in_timer,
                                             prune_configs_by={"early_config_prune": triton_configs._decode_configs_for}
                                             )(triton_linear._decode_kernel)

    class Seen(Exception):
        pass

    def seen(tuner, args, constants, candidates):
        raise Seen(tuner, args, constants, candidates())

    monkeypatch.setattr(triton_linear, "INTERPRETER_DECODE_CONFIG", None)
    monkeypatch.setattr(triton_linear, "_decode_tuned", fresh_tuner())
    monkeypatch.setattr(triton_linear, "take_pretuned", seen)
    layer = random_layer(40, 256, 2, 2, 128, seed=0)
    x = torch.randn(1, 256, dtype=torch.float16)
    with pytest.raises(Seen) as launch:
        triton_linear.decode(x, layer, lut=False)
    tuner, args, constants, candidates = launch.value.args
    assert len(candidates) > 2
    chosen = candidates[-1]  # not the first, which the stand-in timer would choose
    folder = tmp_path / "autotune"
    folder.mkdir()
    (folder / "5e1c-_decode_kernel.autotune.json").write_text(json.dumps(
        {"key": list(tuning_key(tuner, args, constants)),
         "configs_timings": [(c.__dict__, [2.0 if c is not chosen else 1.0] * 3) for c in candidates]}))

    def table(name: str, **changes) -> Path:
        written = pretuned(folder, triton_linear.triton.__version__)
        written.update(changes)
        (tmp_path / "tuned").mkdir(exist_ok=True)
        (tmp_path / "tuned" / f"{name}.json").write_text(json.dumps(written))
        return tmp_path / "tuned"

    monkeypatch.setattr(triton_linear, "take_pretuned",
                        functools.partial(tuned_configs.take_pretuned, slug="this-gpu", folder=table("this-gpu")))
    tuned = fresh_tuner()
    monkeypatch.setattr(triton_linear, "_decode_tuned", tuned)
    with compiling_ahead():  # the engine's warm-up
        assert_close(triton_linear.decode(x, layer, lut=False), reference(x, layer), torch.float16)
    same = dict(kwargs=chosen.kwargs, num_warps=chosen.num_warps, num_stages=chosen.num_stages)
    assert timed == [] and tuned_configs.matches(tuned.best_config, same)
    assert not tuned_configs.matches(candidates[0], same)

    def taken(slug: str, folder: Path, warm_up: bool = True) -> bool:
        again = fresh_tuner()
        with compiling_ahead() if warm_up else contextlib.nullcontext():
            took = tuned_configs.take_pretuned(again, args, constants, lambda: candidates, slug, folder)
        return took and again.cache[tuning_key(again, args, constants)] is chosen

    assert taken("this-gpu", tmp_path / "tuned")
    assert not taken("this-gpu", tmp_path / "tuned", warm_up=False)  # later launches do not look
    assert not taken("another-gpu", tmp_path / "tuned")
    assert not taken("older-triton", table("older-triton", triton="3.0.0"))
    unknown = pretuned(folder, triton_linear.triton.__version__)
    unknown["entries"][0]["config"]["kwargs"]["BLOCK_N"] = 4096
    (tmp_path / "tuned" / "unknown-config.json").write_text(json.dumps(unknown))
    assert not taken("unknown-config", tmp_path / "tuned")
    monkeypatch.setenv("LCQ_PRETUNED", "0")
    assert not taken("this-gpu", tmp_path / "tuned")


GEMM_CASES = [  # bits, rank, group, K, dtype (M = 33: three row tiles, the last one partial)
    (2, 3, 32, 80, torch.float16),
    (3, 1, 64, 100, torch.float32),
    (4, 3, 64, 100, torch.bfloat16),
]


@pytest.mark.parametrize("bits,rank,group,k,dtype", GEMM_CASES)
def test_gemm_kernel_matches_reference(bits, rank, group, k, dtype):
    layer = random_layer(40, k, bits, rank, group, seed=bits * 10 + rank + 1)
    x = torch.randn(33, k).to(dtype)
    assert_close(triton_linear.gemm(x, layer, SMALL_GEMM), reference(x, layer), dtype)


def test_a_partial_groups_padding_never_reaches_the_products():
    """K = 80 at g = 32: the last group's padding indices decode to codebook entry 0, here beyond fp16's range
    (6 x 60,000) while every real weight (entries 1-3) is small. The tl.dot forms (3-64 rows, with and without
    column codebooks) and the tiled GEMM rounded the whole tile to fp16, padding included, and inf x the masked
    input's 0 made every output NaN; their tiles are now zero past K, as the reader of docs/format.md must."""
    n, k, group = 24, 80, 32
    indices = torch.randint(1, 4, (n, k), generator=torch.Generator().manual_seed(0))
    layer = encode_linear(indices, *dual_quantize(torch.full((n, 3, 1), 6.0), torch.zeros(n, 3)),
                          torch.tensor([[60000.0, 1.0, -1.0, 0.5]]), in_features=k, bits=2, group_size=group)
    for m in (3, 17):
        x = torch.randn(m, k).to(torch.float16)
        ref = reference(x, layer)
        for y in (triton_linear.triton_linear(x, layer), triton_linear.decode(x, layer, SMALL_DECODE),
                  triton_linear.decode(x, layer, {**SMALL_DECODE, "BOOK": True}),
                  triton_linear.gemm(x, layer, SMALL_GEMM)):
            assert_close(y, ref, torch.float16)


@pytest.mark.parametrize("kernel", ["decode", "gemm"])
def test_fp32_products_on_a_gpu_stay_fp32_and_partial_groups_build(kernel):
    """The sm_90 builds at 16 rows (compiled here without the interpreter; no GPU), of a layer whose last group is
    partial: with fp32 activations tl.dot multiplies in fp32 ("ieee", as torch's fp32 matmul by default), no
    tensor-core instruction in the loop (Triton's default on a GPU is tf32: 16 of them, an fp32 model's products
    then rounded to 10 bits of mantissa); with fp16 the tensor cores still take the products."""
    code = ("import sys; sys.path.insert(0, '.'); from bench.kernels import compile_kernel, inner_loop, sass_of; "
            "counts = [sum('MMA' in line for line in inner_loop(sass_of(compile_kernel("
            f"'{kernel}', 2, 2, 128, 16, 64, 4, depth=64, dtype=dtype, partial_group=True))[0])) "
            "for dtype in ('fp32', 'fp16')]; print(*counts)")
    fp32_products, fp16_products = _compiled_counts(code)
    assert fp32_products == 0 and fp16_products > 0


@pytest.mark.parametrize("bits,rank,group,k,dtype", [(2, 1, 32, 80, torch.float16), (3, 3, 64, 100, torch.bfloat16),
                                                    (4, 3, 128, 150, torch.float32)])
def test_dequantize_kernel_matches_reference(bits, rank, group, k, dtype):
    """The large-M path's weight: the reference's weights rounded to the activation dtype (within a
    rounding step: the kernel sums S V - B in its own order before rounding)."""
    layer = random_layer(40, k, bits, rank, group, seed=bits * 10 + rank + 2)
    weight_t = triton_linear.dequantized_transpose(layer, dtype, torch.device("cpu"))
    assert weight_t.shape == (k, 40) and weight_t.dtype == dtype
    torch.testing.assert_close(weight_t, dequantize(layer).t().to(dtype))


@pytest.mark.parametrize("bias", [False, True])
def test_dense_product_in_slabs_of_columns_matches_reference(monkeypatch, bias):
    """W^T dequantized a slab of columns at a time into one buffer and multiplied into its columns of the output:
    with a budget of one kernel tile (128 columns), 300 columns take two whole slabs and a partial one, through the
    buffer's first 44 columns; the same product as the whole W^T at once. Asked for (LCQ_DENSE_SLAB_MB) at any row
    count, by default from DENSE_SLAB_MIN_M rows."""
    monkeypatch.setenv("LCQ_DENSE_SLAB_MB", "0.001")
    layer = random_layer(300, 64, 2, 2, 32, seed=9, bias=bias)
    assert triton_linear.dense_slab_columns(layer, torch.float32) == triton_linear.DEQUANT_BLOCK_N == 128
    x = torch.randn(70, 64)
    sliced = triton_linear.dense_product(x, layer)
    assert_close(sliced, reference(x, layer), torch.float32)
    assert triton_linear.dense_slab_columns(layer, torch.float32, 0) == 300
    torch.testing.assert_close(sliced, triton_linear.dense_product(x, layer, slab_bytes=0))
    monkeypatch.delenv("LCQ_DENSE_SLAB_MB")  # by default slabs only from DENSE_SLAB_MIN_M rows (a prompt's full chunks)
    monkeypatch.setattr(triton_linear, "DENSE_SLAB_BYTES", 1000)
    least = triton_linear.DENSE_SLAB_MIN_M
    assert [triton_linear.dense_slab_columns(layer, torch.float32, rows=m) for m in (70, least - 1, least)] == \
        [300, 300, 128]
    with pytest.raises(ValueError, match="contiguous rows"):
        triton_linear.dequantized_transpose(layer, torch.float32, x.device, (0, 128), torch.empty(128, 64).t())


@pytest.mark.parametrize("bits,rank,group,k", [(3, 3, 32, 80), (4, 1, 64, 100), (4, 2, 128, 150)])
def test_gather_in_the_other_orientation_matches_reference(monkeypatch, bits, rank, group, k):
    """The V gather laid out (columns, depth) as for Triton 3.6, (depth, columns) as for 3.7 and
    later: whichever the installed Triton does not take, through every kernel that gathers."""
    flipped = triton_tiles.tl.constexpr(not triton_tiles.GATHER_COLUMNS_FIRST)
    for module in (triton_tiles, triton_pair_table):
        monkeypatch.setattr(module, "GATHER_COLUMNS_FIRST", flipped)
    layer = random_layer(40, k, bits, rank, group, seed=bits * 10 + rank + 3)
    for m, config in ((1, SMALL_DECODE), (2, {**SMALL_DECODE, "REDUCE_K": True, "PREFETCH": True}),
                      (3, {**SMALL_DECODE, "PREFETCH": True})):
        x = torch.randn(m, k, dtype=torch.float16)
        assert_close(triton_linear.decode(x, layer, config), reference(x, layer), torch.float16)
    x = torch.randn(33, k)
    assert_close(triton_linear.gemm(x, layer, SMALL_GEMM), reference(x, layer), torch.float32)
    torch.testing.assert_close(triton_linear.dequantized_transpose(layer, torch.float32, torch.device("cpu")),
                               dequantize(layer).t().float())


def fused_layer(bits: int) -> PackedLinear:
    """Three parts with their own V tables (like q, k, v), only the first with a bias."""
    parts = [random_layer(n, 64, bits, 2, 32, seed=i, bias=i == 0) for i, n in enumerate((24, 8, 8))]
    return PackedLinear.concat(parts)


@pytest.mark.parametrize("product,m", [("decode", 1), ("decode", 33), ("gemm", 33), ("dense_product", 33)])
def test_fused_layer_with_bias(product, m):
    layer = fused_layer(bits=3)
    assert layer.v.shape[0] == 3 and layer.bias is not None
    x = torch.randn(m, 64, dtype=torch.float16)
    y = getattr(triton_linear, product)(x, layer)
    assert_close(y, reference(x, layer), torch.float16)


@pytest.mark.parametrize("prefetch", [False, True])
def test_split_k_counters_reset_between_launches(prefetch):
    """The last program of each N tile sums the slices and zeroes its counter for the next launch."""
    layer = random_layer(40, 256, 2, 2, 32, seed=5)
    x = torch.randn(2, 256)
    config = {"BLOCK_N": 16, "SPLIT_K": 16, "PREFETCH": prefetch}  # more slices than K's 8 tiles: some empty
    first = triton_linear.decode(x, layer, config)
    second = triton_linear.decode(x, layer, config)
    assert torch.equal(first, second)
    assert_close(first, reference(x, layer), torch.float32)
    assert int(arrival_counters(x.device, 1).abs().sum()) == 0


@pytest.mark.parametrize("split", [3, 16, 18])
def test_split_k_sums_every_slice(split):
    """The last program adds the slices' partial sums 16 at a time (_sum_of_partials): 18 slices of one tile
    each put tiles in a second, partial run of 16."""
    layer = random_layer(40, 18 * 32, 2, 2, 32, seed=6)
    x = torch.randn(1, 18 * 32)
    y = triton_linear.decode(x, layer, {"BLOCK_N": 16, "SPLIT_K": split})
    assert_close(y, reference(x, layer), torch.float32)


def _routed_reference(x: torch.Tensor, layers: list[PackedLinear], chosen: torch.Tensor, rows_per_input: int
                      ) -> torch.Tensor:
    """Row r = t * k + slot: input row r // rows_per_input through expert chosen[t, slot], in float64."""
    ids = chosen.reshape(-1).tolist()
    return torch.stack([reference(x[r // rows_per_input:r // rows_per_input + 1], layers[e])[0]
                        for r, e in enumerate(ids)])


def _routing(tokens: int, experts: int, top_k: int, seed: int) -> torch.Tensor:
    """Each token's top_k distinct experts, skewed towards the first ones so that experts gather
    different numbers of rows (some none)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=g) - torch.arange(experts) / experts
    return scores.topk(top_k, dim=-1).indices


@pytest.mark.parametrize("tokens,experts,top_k", [(1, 4, 2), (3, 5, 2), (9, 4, 2), (40, 6, 3), (0, 4, 2)])
def test_expert_routes_give_each_row_one_place_in_its_experts_blocks(tokens, experts, top_k):
    """Every row (token, slot) appears once, in a block of the expert it chose; blocks hold one expert's
    rows only, padded with -1; the blocks past the last expert's are marked -1."""
    from lcq.kernels.experts import ExpertRoutes, rows_per_block

    chosen = _routing(tokens, experts, top_k, seed=tokens)
    routes = ExpertRoutes.of(chosen, experts)
    count = tokens * top_k
    assert routes.block_m == rows_per_block(count, experts) and routes.rows_count == count
    assert routes.rows.numel() == routes.experts.numel() * routes.block_m
    blocks = routes.rows.view(-1, routes.block_m)
    placed = blocks[blocks >= 0]
    assert sorted(placed.tolist()) == list(range(count))
    ids = chosen.reshape(-1)
    for block, expert in zip(blocks.tolist(), routes.experts.tolist()):
        rows = [r for r in block if r >= 0]
        assert (expert >= 0) == bool(rows)  # a live expert's blocks are never empty
        assert all(ids[r] == expert for r in rows)
    used = int((routes.experts >= 0).sum())
    per_expert = torch.bincount(ids, minlength=experts)
    assert used == int(((per_expert + routes.block_m - 1) // routes.block_m).sum())
    assert [rows_per_block(r, 8) for r in (0, 8, 16, 17, 24, 200, 4096)] == [1, 1, 2, 16, 16, 32, 64]


# bits, rank, group, K, tokens, top_k, dtype, bias: one block per row (1 token), 2-row blocks,
# 16-row blocks over several slices, and past DECODE_MAX_M rows (one slice, no workspace)
GROUPED_CASES = [(2, 1, 32, 80, 1, 2, torch.float32, False), (3, 3, 64, 100, 5, 2, torch.float16, True),
                 (4, 2, 32, 80, 17, 2, torch.bfloat16, False), (4, 1, 32, 80, 40, 2, torch.float32, True)]


@pytest.mark.parametrize("bits,rank,group,k,tokens,top_k,dtype,bias", GROUPED_CASES)
def test_grouped_kernel_multiplies_each_row_by_its_expert(bits, rank, group, k, tokens, top_k, dtype, bias):
    """A mixture's stacked experts (each with its own V table, bias and S, B): gate/up-like (each token's
    input serves all its choices) and down-like (each row its own input) products against each row's
    expert's reference product; with PREFETCH, with column codebooks (BOOK) at 3-4 bits, and the counters
    left zeroed."""
    from lcq.kernels.experts import ExpertRoutes, PackedExperts

    layers = [random_layer(40, k, bits, rank, group, seed=e, bias=bias) for e in range(5)]
    experts = PackedExperts.stack(layers)
    chosen = _routing(tokens, 5, top_k, seed=bits)
    routes = ExpertRoutes.of(chosen, 5)
    wide = tokens * top_k > triton_linear.DECODE_MAX_M
    for rows_per_input, prefetch, book in {(top_k, False, False), (1, True, False), (1, True, bits != 2)}:
        x = torch.randn(tokens * top_k // rows_per_input, k).to(dtype)
        config = {"BLOCK_N": 16, "SPLIT_K": 1 if wide else 3, "PREFETCH": prefetch, "BOOK": book}
        y = triton_linear.grouped_decode(x, experts, routes, rows_per_input, config)
        assert_close(y, _routed_reference(x, layers, chosen, rows_per_input), dtype)
    assert int(arrival_counters(x.device, 1).abs().sum()) == 0
    if not wide:
        with pytest.raises(ValueError, match="splits K"):
            triton_linear.grouped_decode(x, experts, routes, 1, {"BLOCK_N": 16, "SPLIT_K": 32})


@pytest.mark.parametrize("stages", [None, 3])
@pytest.mark.parametrize("bits,tokens,top_k", [(2, 1, 2), (3, 5, 2), (4, 3, 1)])
def test_grouped_kernel_takes_products_of_bytes(bits, tokens, top_k, stages):
    """A mixture's blocks of 1-2 rows in bytes (INT8): each row as byte_products_reference computes it with its
    expert, the words loaded in the loop (STAGES, the pipeliner's on a GPU) or carried a tile ahead; blocks of more
    rows are refused."""
    from lcq.kernels.experts import ExpertRoutes, PackedExperts

    layers = [random_layer(40, 100, bits, 2, 32, seed=e) for e in range(5)]
    chosen = _routing(tokens, 5, top_k, seed=bits)
    routes = ExpertRoutes.of(chosen, 5)
    assert routes.block_m <= 2
    x = torch.randn(tokens * top_k, 100)
    config = {**SMALL_DECODE, "PREFETCH": True, **({"STAGES": stages} if stages else {})}
    y = triton_linear.grouped_decode(x, PackedExperts.stack(layers), routes, 1, config, int8=True)
    expected = torch.stack([byte_products_reference(x[r:r + 1], layers[e])[0]
                            for r, e in enumerate(chosen.reshape(-1).tolist())])
    assert_close(y, expected, torch.float32)
    with pytest.raises(ValueError, match="blocks of 1-2 rows, not 16"):
        triton_linear.grouped_decode(x, PackedExperts.stack(layers), ExpertRoutes.of(chosen, 5, 16), 1,
                                     SMALL_DECODE, int8=True)


@pytest.mark.parametrize("bits,dtype", [(2, torch.float16), (4, torch.bfloat16)])
def test_grouped_kernel_takes_byte_codebooks(bits, dtype):
    """A mixture's blocks of 16 rows from byte codebooks (BYTE_BOOK): each row as byte_book_weights states it with
    its expert."""
    from lcq.kernels.experts import ExpertRoutes, PackedExperts

    layers = [random_layer(40, 100, bits, 2, 32, seed=e) for e in range(5)]
    chosen = _routing(9, 5, 2, seed=bits)
    routes = ExpertRoutes.of(chosen, 5, 16)
    x = torch.randn(9, 100).to(dtype)
    y = triton_linear.grouped_decode(x, PackedExperts.stack(layers), routes, 2, {**SMALL_DECODE, "PREFETCH": True},
                                     byte_book=True)
    expected = torch.stack([byte_book_reference(x[r // 2:r // 2 + 1], layers[e])[0]
                            for r, e in enumerate(chosen.reshape(-1).tolist())])
    assert_close(y, expected, dtype, BYTE_BOOK_TOLERANCE[dtype])
    with pytest.raises(ValueError, match="tiles of 16 rows or more of fp16 inputs, or bf16 .*, not 2 rows"):
        triton_linear.grouped_decode(x, PackedExperts.stack(layers), ExpertRoutes.of(chosen, 5, 2), 2,
                                     SMALL_DECODE, byte_book=True)


def test_stacked_experts_are_the_layers_and_refuse_mixed_shapes():
    from lcq.kernels.experts import ExpertRoutes, PackedExperts, expert_linear

    layers = [PackedLinear.concat([random_layer(12, 64, 3, 2, 32, seed=2 * e + part) for part in range(2)])
              for e in range(3)]
    experts = PackedExperts.stack(layers)
    assert (experts.num_experts, experts.stacked.out_features, experts.tables, experts.stacked.rank) == (3, 24, 2, 2)
    for e, layer in enumerate(layers):
        assert torch.equal(dequantize(experts.expert(e)), dequantize(layer))
    chosen = torch.tensor([[2, 0], [1, 2]])
    x = torch.randn(2, 64)
    assert_close(expert_linear(x, experts, ExpertRoutes.of(chosen, 3), 2), _routed_reference(x, layers, chosen, 2),
                 torch.float32)
    with pytest.raises(ValueError, match="share shape"):
        PackedExperts.stack([random_layer(12, 64, 3, 2, 32), random_layer(12, 64, 4, 2, 32)])


def test_outgrown_counters_stay_allocated():
    """A launch needing more counters than there are gets a new buffer; the old one is kept, not freed, since
    a CUDA graph captured before replays its address."""
    device = torch.device("cpu")
    small = arrival_counters(device, 1)
    grown = arrival_counters(device, small.numel() + 1)
    assert grown.numel() > small.numel() and arrival_counters(device, 1) is grown
    assert any(kept is small for kept in arrival_counters_module._outgrown) and int(grown.abs().sum()) == 0


def test_triton_linear_keeps_leading_dimensions():
    layer = random_layer(24, 64, 4, 1, 64, seed=7)
    x = torch.randn(2, 3, 64)
    y = triton_linear.triton_linear(x, layer)
    assert y.shape == (2, 3, 24)
    assert_close(y.reshape(6, 24), reference(x.reshape(6, 64), layer), torch.float32)
    assert triton_linear.triton_linear(torch.empty(0, 64), layer).shape == (0, 24)
    with pytest.raises(ValueError, match="expects 64"):
        triton_linear.triton_linear(torch.randn(1, 32), layer)


# The forms of 1-2 rows, which compute the activation as they load their inputs (FMA rows, products of bytes, of
# prepared inputs too), and those that take gated_activation's output (tl.dot rows, byte codebooks, the pair table)
GATED_FORMS = [  # bits, rank, group, K, M, dtype, decode's keywords
    (2, 2, 64, 100, 1, torch.float32, {}),  # FMA rows, a masked tail
    (3, 1, 64, 100, 2, torch.bfloat16, {"config": {"REDUCE_K": True, "PREFETCH": True}}),
    (2, 2, 128, 300, 1, torch.float16, {"int8": True, "config": {"REDUCE_K": True, "BLOCK_K": 128, "STAGES": 3}}),
    (3, 2, 128, 300, 2, torch.bfloat16, {"int8": True, "config": {"REDUCE_K": True, "PREFETCH": True}}),
    (4, 2, 128, 300, 2, torch.float16, {"int8": True, "prepared": True, "config": {"REDUCE_K": True}}),
    (4, 3, 32, 80, 16, torch.float16, {"config": {"PREFETCH": 2}}),
    (2, 2, 64, 100, 5, torch.float16, {"byte_book": True}),
    (2, 1, 32, 80, 1, torch.float32, {"lut": True}),
]


@pytest.mark.parametrize("bits,rank,group,k,m,dtype,form", GATED_FORMS)
def test_gated_inputs_are_the_activation_kernels_output(bits, rank, group, k, m, dtype, form, monkeypatch):
    """A down_proj's product of act(gate) * up (gated) gives exactly the product of gated_activation's output: at 1-2
    rows computed where the kernel loads its inputs, with no activation kernel before it; otherwise after one."""
    from lcq.kernels.elementwise import gated_activation

    activations = []
    monkeypatch.setattr(triton_linear, "gated_activation",
                        lambda *args: activations.append(args[1]) or gated_activation(*args))
    activation = "gelu_tanh" if k == 100 else "silu"
    layer = random_layer(40, k, bits, rank, group, seed=bits + m)
    gate_up = (torch.randn(m, 2 * k) * 3).to(dtype)
    form = {**form, "config": {**SMALL_DECODE, **form.get("config", {})}}
    expected = triton_linear.decode(gated_activation(gate_up, activation), layer, **form)
    assert torch.equal(triton_linear.decode(gate_up, layer, gated=activation, **form), expected)
    assert activations == ([] if m <= 2 and not form.get("lut") else [activation])


def _row_squares(stream: torch.Tensor) -> torch.Tensor:
    """Each row's sums of squares by ROW_PART columns, fp32, as a product adding into the stream writes them."""
    part = triton_linear.ROW_PART.value
    padded = torch.nn.functional.pad(stream.float(), (0, -stream.shape[1] % part))
    return padded.square().view(stream.shape[0], -1, part).sum(-1)


STREAM_FORMS = [  # bits, rank, group, K, M, dtype, decode's keywords: FMA rows and products of bytes (of prepared
    # inputs too, whose kernel then computes the norm) at 1-2 rows
    (2, 2, 64, 100, 1, torch.float32, {}),
    (3, 1, 64, 100, 2, torch.bfloat16, {"config": {"REDUCE_K": True, "PREFETCH": True}}),
    (2, 2, 128, 300, 1, torch.float16, {"int8": True, "config": {"REDUCE_K": True, "BLOCK_K": 128, "STAGES": 3}}),
    (4, 2, 128, 300, 2, torch.float16, {"int8": True, "config": {"REDUCE_K": True, "PREFETCH": 2, "SPLIT_K": 1}}),
    (2, 3, 64, 100, 2, torch.float32, {"int8": True, "prepared": True, "config": {"REDUCE_K": True}}),
    (3, 2, 128, 300, 1, torch.bfloat16, {"int8": True, "prepared": True, "config": {"PREFETCH": True}}),
]


@pytest.mark.parametrize("bits,rank,group,k,m,dtype,form", STREAM_FORMS)
def test_products_on_the_residual_stream(bits, rank, group, k, m, dtype, form):
    """The residual stream's products at 1-2 rows: one adding to the stream (residual) gives the product plus the
    stream as the norm's add rounds it (exactly, but for the interpreter's bf16; fresh rows, the stream untouched)
    and the new stream's sums of squares by ROW_PART columns; one reading it through a norm (norm_weight) gives the
    product of the norm's output (elementwise.add_rms_norm's arithmetic, each row's scale from those sums), to a
    unit of the dtype in an input."""
    from lcq.kernels.elementwise import add_rms_norm

    form = {**form, "config": {**SMALL_DECODE, **form.get("config", {})}}
    torch.manual_seed(k + m)
    layer = random_layer(40, k, bits, rank, group, seed=bits + m)
    x, stream = torch.randn(m, k).to(dtype), (torch.randn(m, 40) * 4).to(dtype)
    before = stream.clone()
    squares = torch.full((m, 3), float("nan"))
    added = triton_linear.decode(x, layer, residual=stream, squares=squares, **form)
    expected = (triton_linear.decode(x, layer, **form).float() + stream.float()).to(dtype)
    if dtype == torch.bfloat16:  # the interpreter truncates fp32 to bf16 where torch (and a GPU) rounds
        torch.testing.assert_close(added, expected, rtol=torch.finfo(dtype).eps, atol=0)
    else:
        assert torch.equal(added, expected)
    assert torch.equal(stream, before)
    torch.testing.assert_close(squares, _row_squares(added), rtol=1e-5, atol=0)
    normer = random_layer(24, 40, bits, rank, group, seed=3)
    weight, eps = (torch.rand(40) + 0.5).to(dtype), 1e-5
    y = triton_linear.decode(added, normer, norm_weight=weight, eps=eps, squares=squares, **form)
    expected = triton_linear.decode(add_rms_norm(added, weight, eps)[0], normer, **form)
    assert_close(y.double(), expected.double(), torch.float64, TOLERANCE[dtype])


def test_residual_stream_products_refuse_what_they_do_not_serve():
    layer = random_layer(40, 64, 2, 1, 32)
    stream, squares = torch.zeros(16, 40), torch.zeros(16, 3)
    with pytest.raises(ValueError, match="serve 1-2 rows"):
        triton_linear.decode(torch.randn(16, 64), layer, residual=stream, squares=squares)
    with pytest.raises(ValueError, match="serve 1-2 rows without the pair table"):
        triton_linear.decode(torch.randn(1, 64), layer, lut=True, residual=stream[:1], squares=squares[:1])
    with pytest.raises(ValueError, match="sums of squares are \\(1, 4\\)"):
        triton_linear.decode(torch.randn(1, 64), layer, norm_weight=torch.ones(64), squares=squares[:1])
    with pytest.raises(ValueError, match="contiguous rows of 40"):
        triton_linear.decode(torch.randn(1, 64), layer, residual=stream[:1, :20], squares=squares[:1])


@pytest.mark.parametrize("m", [1, 70])  # the decode kernel; dequantize + cuBLAS after the activation's kernel
def test_triton_linear_takes_gated_inputs_at_every_row_count(m):
    from lcq.kernels.elementwise import gated_activation

    layer = random_layer(24, 64, 4, 1, 64, seed=m)
    gate_up = torch.randn(m, 128)
    expected = triton_linear.triton_linear(gated_activation(gate_up, "silu"), layer)
    assert torch.equal(triton_linear.triton_linear(gate_up, layer, gated="silu"), expected)
    with pytest.raises(ValueError, match="expects 128"):
        triton_linear.triton_linear(torch.randn(m, 64), layer, gated="silu")


def test_block_k_divides_the_group():
    assert [triton_tiles.block_k(g) for g in (32, 64, 96, 128, 256)] == [32, 64, 32, 64, 64]
    assert [triton_linear.decode_block_m(m) for m in (1, 2, 3, 16, 17, 33, 64)] == [1, 2, 16, 16, 32, 64, 64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path_matches_reference(dtype):
    layer = fused_layer(bits=2)
    x = torch.randn(2, 5, 64).to(dtype)
    y = lcq_linear(x, layer)
    assert_close(y.reshape(10, -1), reference(x.reshape(10, 64), layer), dtype)
    cached = LCQLinear(layer, cache_dense=True)  # fp32: indices or the fp16 copy where those kernels run, else oneDNN
    y_cached = cached(x)
    if cached.uses_half_weights:  # weights rounded to fp16 (2^-11)
        error = ((y_cached.double() - y.double()).norm() / y.double().norm()).item()
        assert error < 3e-3, f"relative error {error:.2e}"
    else:
        assert_close(y_cached, y, dtype)


@pytest.mark.parametrize("m", [1, 3, 33])
def test_packed_cpu_weight_matches_plain_product(m):
    weight, bias = torch.randn(40, 24), torch.randn(40)
    packed = pack_weight(weight)
    assert packed.is_mkldnn == can_pack(weight)
    x = torch.randn(2, m, 24)
    torch.testing.assert_close(dense_linear(x, packed, bias), torch.nn.functional.linear(x, weight, bias))
    unpackable = weight.double()  # oneDNN packs fp32 only (bf16 needs AVX-512): left as it is
    assert pack_weight(unpackable) is unpackable


# Compiled kernels on a GPU, on realistic shapes, through the autotuned entry point.
GPU_CASES = [(4096, 4096, 2, 2, 128), (11008, 4096, 3, 1, 64), (4096, 11008, 4, 4, 128), (6144, 4096, 2, 4, 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,bits,rank,group", GPU_CASES)
@pytest.mark.parametrize("m", [1, 4, 64, 300])  # decode: FMA form, tl.dot 16 and 64 rows; dequantize + cuBLAS
def test_compiled_kernels_on_gpu(n, k, bits, rank, group, m, exact_products):
    layer = random_layer(n, k, bits, rank, group, seed=n + m).to("cuda")
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(m, k, device="cuda").to(dtype)
        y = lcq_linear(x, layer)
        torch.cuda.synchronize()
        assert_close(y.cpu(), reference(x.cpu(), layer.to("cpu")), dtype)


@pytest.mark.gpu
def test_configs_compiled_ahead_of_the_autotuner_on_gpu(monkeypatch, caplog):
    """Within a warm-up (compiling_ahead) a tuning key's first launch compiles the autotuner's configs on threads
    first: the product is right, the autotuner then chose a config for the shape, and nothing failed on the way (a
    change in Triton's AsyncCompileMode or warmup would only be logged, the builds left to the autotuner)."""
    from lcq.kernels.compile_ahead import compiling_ahead

    monkeypatch.setenv("LCQ_COMPILE_THREADS", "4")
    layer = random_layer(4096 + 16, 4096, 2, 2, 128, seed=5).to("cuda")  # a shape no other test tunes
    x = torch.randn(3, 4096, device="cuda", dtype=torch.float16)
    with caplog.at_level("WARNING", logger="lcq.kernels"), compiling_ahead():
        y = triton_linear.decode(x, layer, int8=False, byte_book=False)
    torch.cuda.synchronize()
    assert_close(y.cpu(), reference(x.cpu(), layer.to("cpu")), x.dtype)
    assert not [r for r in caplog.records if "ahead" in r.getMessage()]
    assert any(key[:2] == (4096 + 16, 4096) for key in triton_linear._decode_tuned.cache)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,bits,rank,group", GPU_CASES)
def test_compiled_byte_codebooks_on_gpu(n, k, bits, rank, group, monkeypatch):
    """BYTE_BOOK compiled (PTX prmt and lop3, fp16, or prmt and cvt, bf16, on whatever pairs of weights Triton's
    layouts hand them): its tiles at 1, 4, 16 and 32 rows of fp16 and bf16 against byte_book_weights, and the
    autotuned launch."""
    layer = random_layer(n, k, bits, rank, group, seed=rank).to("cuda")
    for m, dtype in ((1, torch.bfloat16), (4, torch.float16), (16, torch.bfloat16), (32, torch.float16)):
        x = torch.randn(m, k, device="cuda").to(dtype)
        _check_form_on_gpu(x, layer, byte_book_reference(x.cpu(), layer.to("cpu")), "byte_book",
                           triton_linear.byte_book_block_m(m), 3, "LCQ_BYTE_BOOK", monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,bits,rank,group", GPU_CASES)
@pytest.mark.parametrize("m", [1, 2, 16])
def test_compiled_decode_forms_on_gpu(n, k, bits, rank, group, m, exact_products):
    """Every decode form the autotuner may pick, compiled: plain, REDUCE_K (FMA rows only; 128 deep at 2
    bits), PREFETCH, one or two stages (tl.dot rows), K split 8 or 64 ways (FMA rows), column codebooks
    (BOOK, 3-4 bits), each checked, not only the one that wins the timing."""
    layer = random_layer(n, k, bits, rank, group, seed=n + m).to("cuda")
    x = torch.randn(m, k, device="cuda").to(torch.float16)
    expected = reference(x.cpu(), layer.to("cpu"))
    fma = m < 16
    deep = fma and bits == 2 and group % 128 == 0
    for reduce_k, prefetch, stages, split, book in itertools.product(
            (False, True) if fma else (False,), (False, True, 2), (2,) if fma else (1, 2), (8, 64) if fma else (8,),
            (False,) if bits == 2 and fma else (False, True)):
        depth = 128 if deep and reduce_k else triton_tiles.block_k(group)
        config = {"BLOCK_N": 128, "BLOCK_K": depth, "SPLIT_K": split, "REDUCE_K": reduce_k, "PREFETCH": prefetch,
                  "BOOK": book, "num_warps": 4, "num_stages": stages}
        y = triton_linear.decode(x, layer, config)
        torch.cuda.synchronize()
        assert_close(y.cpu(), expected, torch.float16)


# Two of the one-row products' configs the H100's autotuner chose (docs/kernels.md), as explicit configs: the fused
# forms' compiled arithmetic is checked without timing the autotuner's lists in the GPU session's first step
FUSED_CONFIGS = [{"BLOCK_N": 256, "BLOCK_K": 128, "SPLIT_K": 32, "REDUCE_K": True, "num_warps": 2},
                 {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 16, "REDUCE_K": True, "num_warps": 2}]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, m, activation", [(torch.float16, 1, "silu"), (torch.bfloat16, 2, "gelu_tanh")])
def test_compiled_gated_products_on_gpu(dtype, m, activation):
    """A 7B down_proj's product of act(gate) * up at 1-2 rows, compiled (products of bytes and FMA rows, two configs
    each), against the product of gated_activation's output. Compiled, the activation's arithmetic may be contracted
    otherwise in the two kernels, so an input may round one unit apart: the products' tolerance."""
    from lcq.kernels.elementwise import gated_activation

    layer = random_layer(4096, 11008, 2, 2, 128, seed=m).to("cuda")
    gate_up = (torch.randn(m, 2 * 11008, device="cuda") * 3).to(dtype)
    activated = gated_activation(gate_up, activation)
    for int8, config in itertools.product((True, False), FUSED_CONFIGS):
        expected = triton_linear.decode(activated, layer, config, int8=int8)
        y = triton_linear.decode(gate_up, layer, config, int8=int8, gated=activation)
        torch.cuda.synchronize()
        assert_close(y.double(), expected.double(), torch.float64, TOLERANCE[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, m", [(torch.float16, 1), (torch.bfloat16, 2)])
def test_compiled_residual_stream_products_on_gpu(dtype, m):
    """A 7B layer's products on the residual stream at 1-2 rows, compiled (products of bytes and FMA rows, two configs
    each; the prepared inputs' kernel with the norm): o_proj adding to the stream, the gate/up product reading its
    norm, the down product of act(gate) * up adding to it, against the norm, activation and add kernels with the
    plain products (the stream exactly but for a unit where the sums' rounding differs, the products to their
    tolerance)."""
    from lcq.kernels.elementwise import add_rms_norm, gated_activation
    from lcq.kernels.linear import stream_squares

    torch.manual_seed(m)
    o_proj, gate_up, down = (random_layer(n, k, 2, 2, 128, seed=n).to("cuda")
                             for n, k in ((4096, 4096), (22016, 4096), (4096, 11008)))
    attended = torch.randn(m, 4096, device="cuda").to(dtype)
    stream = (torch.randn(m, 4096, device="cuda") * 4).to(dtype)
    weight, eps = (torch.rand(4096, device="cuda") + 0.5).to(dtype), 1e-5
    for int8, config in itertools.product((True, False), FUSED_CONFIGS):
        form = dict(config=config, int8=int8)
        squares = stream_squares(stream)
        new_stream = triton_linear.decode(attended, o_proj, residual=stream, squares=squares, **form)
        normed, expected_stream = add_rms_norm(triton_linear.decode(attended, o_proj, **form), weight, eps,
                                               stream.clone())
        torch.testing.assert_close(new_stream, expected_stream, rtol=torch.finfo(dtype).eps, atol=0)
        expected = triton_linear.decode(normed, gate_up, **form).double()
        for prepared in (False, True) if int8 else (False,):
            activated = triton_linear.decode(new_stream, gate_up, norm_weight=weight, eps=eps, squares=squares,
                                             prepared=prepared, **form)
            assert_close(activated.double(), expected, torch.float64, TOLERANCE[dtype])
        final = triton_linear.decode(activated, down, gated="silu", residual=new_stream, squares=squares, **form)
        added = triton_linear.decode(gated_activation(activated, "silu"), down, **form).float() + new_stream.float()
        torch.cuda.synchronize()
        assert_close(final.double(), added.double(), torch.float64, TOLERANCE[dtype])


def test_dependent_launch_is_off_on_cpu_and_when_turned_off(monkeypatch):
    """Dependent launch is a CUDA launch attribute: CPU tensors (the interpreter) never get it, nor does any
    tensor under LCQ_PDL=0."""
    from lcq.kernels.dependent_launch import dependent_launch
    assert dependent_launch(torch.zeros(2)) == {"PDL": False}
    monkeypatch.setenv("LCQ_PDL", "0")
    assert dependent_launch(torch.zeros(2)) == {"PDL": False}


@pytest.mark.gpu
def test_dependent_launch_chains_the_decode_kernels_in_a_graph(monkeypatch):
    """On Hopper and later a decode step's kernels start before the one they follow ends, each waiting where it
    reads that one's output: norms, products and activations chained, replayed from a CUDA graph and launched
    eagerly, give bit for bit what the same chain gives without dependent launch."""
    from lcq.kernels.dependent_launch import dependent_launch
    from lcq.kernels.elementwise import add_rms_norm, gated_activation
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16) * 0.1
    weight = torch.full((4096,), 0.05, device="cuda", dtype=torch.float16)
    assert dependent_launch(x)["PDL"] == (torch.cuda.get_device_capability() >= (9, 0))
    gate_up = random_layer(2 * 11008, 4096, 2, 2, 128, seed=1).to("cuda")
    down = random_layer(4096, 11008, 2, 2, 128, seed=2).to("cuda")

    def chain() -> torch.Tensor:
        hidden = x
        for _ in range(4):
            normed, _ = add_rms_norm(hidden, weight, 1e-5)
            hidden = lcq_linear(gated_activation(lcq_linear(normed, gate_up), "silu"), down)
        return hidden

    eager = chain()  # (autotunes and compiles outside the capture)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed = chain()
    graph.replay()
    monkeypatch.setenv("LCQ_PDL", "0")
    plain = chain()
    torch.cuda.synchronize()
    assert plain.isfinite().all()
    assert torch.equal(graphed, plain) and torch.equal(eager, plain)


@pytest.mark.parametrize("form", [[], ["--lut", "--rank", "1"]])
def test_profile_script_runs_one_checked_launch(form):
    """bench/profile_one_row.py, the launch a GPU session hands to Nsight Compute: without a GPU it runs its
    steps in the interpreter on a small shape and checks the product."""
    script = Path(__file__).resolve().parent.parent / "bench" / "profile_one_row.py"
    done = subprocess.run([sys.executable, str(script), *form], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(re.search(r"relative error (\S+) against", done.stdout).group(1)) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [1, 2, 4])
def test_compiled_pair_table_on_gpu(rank, exact_products):
    """One row of a 2-bit layer from the pair table, compiled, in each of its tiles; and the autotuned
    choice between it and the FMA form, which times both (lut_wins), gives the same products."""
    layer = random_layer(4096, 11008, 2, rank, 128, seed=rank).to("cuda")
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(1, 11008, device="cuda").to(dtype)
        expected = reference(x.cpu(), layer.to("cpu"))
        for config in triton_configs._decode_configs_for(triton_configs.DECODE_CONFIGS, {}, BLOCK_M=1, GROUP=128,
                                                        SELECT=True, LUT=True)[::5]:
            launch = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
            y = triton_linear.decode(x, layer, launch, lut=True)
            torch.cuda.synchronize()
            assert_close(y.cpu(), expected, dtype)
        assert_close(lcq_linear(x, layer).cpu(), expected, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,bits,rank,group", [(4096, 11008, 2, 2, 128), (22016, 4096, 2, 1, 128),
                                                  (4096, 4096, 2, 4, 64), (4096, 11008, 4, 2, 128),
                                                  (11008, 4096, 4, 1, 64)])
def test_compiled_products_of_bytes_on_gpu(n, k, bits, rank, group, monkeypatch):
    """INT8 compiled (PTX prmt and dp4a, not their emulation): each of its tiles at 1 and 2 rows against
    byte_products_reference, within the output dtype's tolerance (fp32 division and FMA contraction on the
    GPU may round a value at a byte's halfway point the other way), and the autotuned launch; with prepared
    inputs (input_bytes) too."""
    layer = random_layer(n, k, bits, rank, group, seed=rank).to("cuda")
    for m, dtype in ((1, torch.float16), (2, torch.bfloat16)):
        x = torch.randn(m, k, device="cuda").to(dtype)
        expected = byte_products_reference(x.cpu(), layer.to("cpu"))
        assert ((expected - reference(x.cpu(), layer.to("cpu"))).norm() / expected.norm()).item() < ROUNDING_BOUND
        _check_form_on_gpu(x, layer, expected, "int8", m, 5, "LCQ_INT8_DECODE", monkeypatch)
        assert_close(triton_linear.decode(x, layer, int8=True, prepared=True).cpu(), expected, dtype)


def _check_form_on_gpu(x: torch.Tensor, layer: PackedLinear, expected: torch.Tensor, form: str, block_m: int,
                       every: int, switch: str, monkeypatch) -> None:
    """Every `every`-th config the autotuner may time for a decode form (int8, byte_book), compiled, against
    expected; then the autotuned launch through lcq_linear with the form's switch at 1; it serves by default only
    where its defaults say, and not with its switch at 0."""
    for config in triton_configs._decode_configs_for(triton_configs.DECODE_CONFIGS, {}, BLOCK_M=block_m,
                                                    GROUP=layer.group_size, SELECT=layer.bits == 2,
                                                    **{form.upper(): True})[::every]:
        launch = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
        y = triton_linear.decode(x, layer, launch, **{form: True})
        torch.cuda.synchronize()
        assert_close(y.cpu(), expected, x.dtype)
    def taken() -> bool:
        return (triton_linear.int8_decode(x, block_m, layer.bits) if form == "int8"
                else triton_linear.byte_book_decode(x, block_m, layer.bits))

    monkeypatch.delenv(switch, raising=False)
    defaults = triton_linear.INT8_DEFAULT if form == "int8" else triton_linear.BYTE_BOOK_DEFAULT
    assert taken() == ((layer.bits, x.dtype) in defaults)
    monkeypatch.setenv(switch, "1")
    assert taken()
    if form == "byte_book":
        monkeypatch.setenv("LCQ_INT8_DECODE", "0")  # (else products of bytes take 1-2 rows)
    assert_close(lcq_linear(x, layer).cpu(), expected, x.dtype)
    monkeypatch.setenv(switch, "0")
    assert not taken()
    monkeypatch.delenv("LCQ_INT8_DECODE", raising=False)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,bits,rank,group,experts,top_k", [
    (1536, 2048, 2, 2, 128, 16, 8),  # Qwen3-30B-A3B's gate/up (16 of its 128 experts)
    (2048, 1024, 3, 1, 64, 8, 2)])
@pytest.mark.parametrize("tokens", [1, 64, 300])
def test_compiled_grouped_kernel_on_gpu(n, k, bits, rank, group, experts, top_k, tokens, exact_products,
                                      monkeypatch):
    """The mixture's grouped product compiled and autotuned, single-token to prefill-sized routings, exact; and
    under LCQ_INT8_DECODE=1, where the blocks hold 1-2 rows, in bytes (against byte_products_reference)."""
    from lcq.kernels.experts import ExpertRoutes, PackedExperts, expert_linear

    layers = [random_layer(n, k, bits, rank, group, seed=e) for e in range(experts)]
    stacked = PackedExperts.stack(layers).to("cuda")
    chosen = _routing(tokens, experts, top_k, seed=tokens)
    routes = ExpertRoutes.of(chosen.cuda(), experts)
    x = torch.randn(tokens, k, device="cuda").to(torch.float16)
    checked = range(0, tokens * top_k, max(1, tokens * top_k // 16))  # a sample of rows, in float64 on CPU
    ids = chosen.reshape(-1)
    for product in (reference, byte_products_reference) if routes.block_m <= 2 else (reference,):
        monkeypatch.setenv("LCQ_INT8_DECODE", "1" if product is byte_products_reference else "0")
        y = expert_linear(x, stacked, routes, top_k)
        torch.cuda.synchronize()
        expected = torch.stack([product(x[r // top_k:r // top_k + 1].cpu(), layers[int(ids[r])])[0]
                                for r in checked])
        assert_close(y[list(checked)].cpu(), expected, torch.float16)


needs_half_kernel = pytest.mark.skipif(not cpu_half.enabled(), reason="fp16 CPU kernel unavailable here "
                                       "(needs x86-64 Linux with AVX2/FMA/F16C and a C compiler)")


@needs_half_kernel
@pytest.mark.parametrize("m", [*range(1, 10), 16, 33])
@pytest.mark.usefixtures("both_cores")
def test_half_kernel_matches_rounded_weights(m):
    """Against the same fp16-rounded weight in float64: only fp32 summation differs (1e-5). Below 16
    rows the decode form runs (passes of up to 8 rows), from 16 cpu_gemm.c's panels and micro-tiles;
    odd K the scalar tail, M = 33 a last panel of one row."""
    k, n = 37 + 8 * m, 103  # odd K: the vector loop and the scalar tail both run
    weight = torch.randn(n, k).half()
    x = torch.randn(m, k)
    assert_close(cpu_half.half_linear(x, weight), x.double() @ weight.double().t(), torch.float32)
    assert cpu_half.half_linear(torch.randn(0, k), weight).shape == (0, n)
    with pytest.raises(ValueError, match="does not match"):
        cpu_half.half_linear(torch.randn(m, k + 1), weight)


@needs_half_kernel
@pytest.mark.parametrize("n", range(43, 49))
@pytest.mark.parametrize("m", [16, 20, 29])
def test_large_product_covers_every_partial_tile(n, m):
    """cpu_gemm.c's micro-tiles take 6 weight rows: N = 43 .. 48 ends a block of 48 on each size of
    partial tile (1 to 5 rows, and none); M = 20 ends on a panel of 8 rows (4 used), 29 on one of 16
    (13 used)."""
    weight, x = torch.randn(n, 40).half(), torch.randn(m, 40)
    assert_close(cpu_half.half_linear(x, weight), x.double() @ weight.double().t(), torch.float32)


def _bf16_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ W^T in float64 after rounding both to bf16, as the bf16 products round them."""
    return x.bfloat16().double() @ weight.bfloat16().double().t()


needs_bf16 = pytest.mark.skipif(not products_available(torch.bfloat16),
                                reason="bf16 products need AVX512_BF16 and the C kernels")


@needs_bf16
@pytest.mark.parametrize("n", [43, 46, 48])
@pytest.mark.parametrize("m, k", [(10, 40), (16, 40), (20, 37), (33, 77), (48, 576)])
def test_bf16_products_round_operands_only(n, m, k):
    """Within cpu_products(torch.bfloat16) the products from 10 rows equal float64 products of the bf16-rounded
    operands up to fp32 summation (1e-5): rounding to nearest even, pairs of K (odd K: a zero pad),
    panels of 32 and 16 rows (M = 10: one of 16; 20: one of 32 with 20 used; 33: 32 and a last one of
    1; 48: 32 and 16), tiles of 6 weight rows and partial ones (N = 43: 1 row left, 46: 4, 48: none)."""
    weight, x = torch.randn(n, k).half(), torch.randn(m, k)
    with cpu_products(torch.bfloat16):
        y = cpu_half.half_linear(x, weight)
    assert_close(y, _bf16_reference(x, weight.float()), torch.float32)
    assert _relative_error(y, x.double() @ weight.double().t()) > 1e-4  # bf16 rounding did happen


@needs_bf16
@pytest.mark.parametrize("n, k", [(43, 40), (96, 37), (128, 77), (64, 600)])
@pytest.mark.parametrize("amx", [False, True] if amx_active() else [False])
def test_half_pair_panels_give_the_bf16_products(n, k, amx):
    """An fp16 weight's kept bf16 panels (cpu_half.pair_panels: N rounded up to 32 rows, K to pairs)
    give, from 10 rows, the blocked bf16 product's values bit for bit (the same sums in the same
    order, the weights the vectors and the activations broadcast; on AMX tiles, the weights the B tiles
    in one and the A tile in the other, whose sums at K = 600 part from the register tiles'), and from
    3 rows the bf16-rounded product (below 10 the decode form, which sums in another order, is not read); SwiGLU over halves of 48 (product, then SwiGLU) and
    64 rows (per tile); 1-2 rows keep the exact fp32 decode form."""
    weight, x = torch.randn(n, k).half(), torch.randn(40, k)
    panels = cpu_half.pair_panels(weight)
    assert 4 * panels.numel() == cpu_half.pair_panel_bytes(n, k) == 4 * -(-n // 32) * 32 * ((k + 1) // 2)
    with cpu_products(torch.bfloat16), amx_tiles(amx):
        for m in (10, 16, 33, 40):
            assert torch.equal(cpu_half.half_linear(x[:m], weight, panels=panels), cpu_half.half_linear(x[:m], weight))
            if n % 2 == 0:
                gate, up = cpu_half.half_linear(x[:m], weight).chunk(2, dim=1)
                swiglu = cpu_half.half_linear(x[:m], weight, swiglu=True, panels=panels)
                assert _relative_error(swiglu, torch.nn.functional.silu(gate) * up) < 1e-6
        for m in (3, 5, 9):
            assert_close(cpu_half.half_linear(x[:m], weight, panels=panels), _bf16_reference(x[:m], weight.float()),
                         torch.float32)
        assert torch.equal(cpu_half.half_linear(x[:2], weight, panels=panels), cpu_half.half_linear(x[:2], weight))


def _int8_quantized(rows: torch.Tensor, tops: torch.Tensor | None = None) -> torch.Tensor:
    """Rows (R, K) as the int8 products take them, float64: per row and block of 64 values along K,
    scale = top / 127 and q = round half to even(v * (127 / top)) in fp32, top the block's max |v|
    unless given (R, blocks). Tensor by tensor: torch turns a division by or of a scalar into a
    reciprocal's product, which moves ties."""
    blocks = torch.nn.functional.pad(rows, (0, -rows.shape[1] % 64)).view(rows.shape[0], -1, 64)
    top = blocks.abs().amax(-1, keepdim=True) if tops is None else tops.unsqueeze(-1)
    most = torch.full_like(top, 127.0)
    q = torch.round(blocks * torch.where(top > 0, most / top, torch.zeros_like(top)))
    return (q.double() * (top / most).double()).view(rows.shape[0], -1)[:, :rows.shape[1]]


def _int8_index_reference(x: torch.Tensor, layer: PackedLinear, exact_from: int | None = None) -> torch.Tensor:
    """x @ W^T in float64 as int8 products take an LCQ weight: x quantized per block of its values, W
    per block of the codebooks of the groups the block meets (the kernel quantizes codebooks); values
    from exact_from on (the int8 decode forms' past the last whole step of 16) unquantized."""
    books, k, g = layer_codebooks(layer).abs().amax(-1), layer.in_features, layer.group_size
    tops = torch.stack([books[:, s // g:(min(s + 64, k) - 1) // g + 1].amax(-1) for s in range(0, k, 64)], 1)
    dense = dequantize(layer, torch.float32)
    rows, weights = _int8_quantized(x.float()), _int8_quantized(dense, tops)
    if exact_from is not None:
        rows[:, exact_from:], weights[:, exact_from:] = x[:, exact_from:].double(), dense[:, exact_from:].double()
    return rows @ weights.t()


needs_int8 = pytest.mark.skipif(not products_available(torch.int8),
                                reason="int8 products need AVX512_VNNI, AVX512_BF16 and AVX512_VBMI, and the C "
                                       "kernels")


@needs_int8
@pytest.mark.parametrize("n", [43, 48])
@pytest.mark.parametrize("m, k", [(10, 40), (20, 37), (33, 130), (48, 576), (70, 64)])
def test_int8_products_quantize_operands_only(n, m, k):
    """Within cpu_products(torch.int8) LCQ products from 10 rows equal float64 products of operands
    quantized to 8 bits per block of 64 (_int8_index_reference) up to fp32 scaling and summation
    (1e-5): words of 4 values (K = 37: one padded), blocks cut short (K = 40, 130), panels of 32 and
    16 rows (M = 10: one of 16; 20: one of 32; 33: 32 and 1; 48: 32 and 16; 70: 32, 32 and 6),
    partial weight tiles (N = 43), an outlier channel that sets only its own block's scale."""
    layer = random_layer(n, k, 4, 2, 32, seed=n + k)
    weight, x = cpu_index.IndexWeight(layer, wide=True), torch.randn(m, k)
    x[:, 1] *= 30
    with cpu_products(torch.int8):
        y = weight.linear(x)
    assert _relative_error(y, _int8_index_reference(x, layer)) < 1e-5
    assert _relative_error(y, reference(x, layer)) > 1e-3  # quantization did happen


def _weights_with_books(bits: int, rank: int, group: int, k: int, wide: bool):
    """A random layer of 70 rows, two IndexWeights of it (the first keeps its int8 books: 4 + 2^b bytes a group and
    32 of padding) and 7 activation rows with an outlier channel, which sets only its own block's scale."""
    layer = random_layer(70, k, bits, rank, group, seed=bits + rank + k)
    weight, plain = cpu_index.IndexWeight(layer, wide=wide), cpu_index.IndexWeight(layer, wide=wide)
    books = 70 * layer.num_groups * (4 + 2 ** bits) + 32
    assert weight.keep_books() == books and weight.nbytes == plain.nbytes + books
    x = torch.randn(7, k)
    x[:, 1] *= 30
    return layer, weight, plain, x


@needs_int8
@pytest.mark.parametrize("bits, rank, group, k", [(2, 1, 64, 576), (3, 3, 64, 500), (4, 2, 128, 150),
                                                   (2, 2, 128, 1000), (3, 1, 128, 2048), (4, 4, 64, 200),
                                                   (3, 2, 192, 37)])
@pytest.mark.usefixtures("both_cores")
def test_int8_decode_products_read_books(bits, rank, group, k):
    """A weight that keeps its int8 books takes int8 products of 1-4 rows in the int8 decode form, and
    with the row form at every row count: the int8 blocked product's operands (_int8_index_reference:
    each group's codebook quantized once, activations per block of 64), only fp32 scaling and summation
    differing (1e-5), and its last weights past a whole step of 16 exact (K = 1000, 150, 200, 37). Each
    row's values are what that row alone gives, bit for bit, in passes of 4 rows or fewer (M = 7: 4 and
    3). Whole spans of runs and blocks after them (2 bits: runs of 4 blocks, K = 1000: 15 blocks; 3 bits:
    two runs of 5 blocks, K = 500 with one taking its later steps from the next run, K = 2048; 4 bits:
    runs of 2), partial runs, groups of 1-3 blocks and a last partial group (K = 150, 200), and a block
    of 2 steps (K = 37)."""
    layer, weight, plain, x = _weights_with_books(bits, rank, group, k, wide=True)
    with cpu_products(torch.int8):
        alone = torch.cat([weight.linear(x[m:m + 1]) for m in range(7)])
        assert torch.equal(weight.linear(x[:4]), alone[:4]) and torch.equal(weight.linear(x[:3]), alone[:3])
        assert torch.equal(plain.linear(x[:9].repeat(2, 1))[:7], weight.linear(x[:9].repeat(2, 1))[:7])  # from 10
    with cpu_products(torch.int8, rows_alone=True):
        assert torch.equal(weight.linear(x), alone)
        assert _relative_error(plain.linear(x), reference(x, layer)) < 1e-6  # without books: fp32
    assert _relative_error(alone, _int8_index_reference(x, layer, exact_from=k // 16 * 16)) < 1e-5
    assert _relative_error(alone, reference(x, layer)) > 1e-3  # quantization did happen
    with cpu_products(torch.float32):
        assert _relative_error(weight.linear(x[:1]), reference(x[:1], layer)) < 1e-6
    for other in (cpu_index.IndexWeight(random_layer(70, k, bits, rank, 32, seed=1), wide=True),  # blocks of 2 groups
                  cpu_index.IndexWeight(layer, wide=False)):  # the AVX2 form has no int8 products
        assert other.keep_books() == 0


@needs_int8
def test_int8_decode_products_from_several_threads_at_once():
    """The int8 decode form quantizes its activations into the calling thread's own buffer (lcq_scratch, kept
    between calls): products of 1-4 rows of two widths from four Python threads at once (the C call releases
    the GIL), each thread's calls alternating sizes so that its buffer grows and is reused, equal what each
    product gave alone beforehand, bit for bit."""
    from concurrent.futures import ThreadPoolExecutor

    weights = [cpu_index.IndexWeight(random_layer(70, k, 2, 2, 64, seed=k), wide=True) for k in (576, 2048)]
    assert all(w.keep_books() for w in weights)
    jobs = [(w, torch.randn(m, w.in_features)) for w in weights for m in (1, 3, 4)]
    with cpu_products(torch.int8):
        expected = [w.linear(x) for w, x in jobs]

    def products(thread: int) -> list[bool]:
        with cpu_products(torch.int8):  # (the product form is the calling thread's)
            return [torch.equal(jobs[j][0].linear(jobs[j][1]), expected[j])
                    for _ in range(10) for j in ((thread + t) % len(jobs) for t in range(len(jobs)))]

    with ThreadPoolExecutor(4) as pool:
        assert all(all(equal) for equal in pool.map(products, range(4)))


needs_c_kernels = pytest.mark.skipif(native.load() is None or not cpu_index.enabled(),
                                     reason="the C kernels do not run here (or LCQ_CPU_INDEX is 0)")


@needs_c_kernels
@pytest.mark.parametrize("bits, rank, group, k", [(2, 1, 64, 576), (4, 2, 128, 150), (2, 2, 128, 1000),
                                                   (4, 4, 64, 200), (2, 3, 192, 37), (4, 1, 256, 1000),
                                                   (4, 2, 64, 16), (2, 2, 64, 8)])
@pytest.mark.usefixtures("both_cores")
def test_shuffle_decode_products_read_books(monkeypatch, bits, rank, group, k):
    """Where the AVX-512 int8 products do not run (LCQ_CPU_AVX512=0 stands in for an AVX2-only CPU), int8 products
    take the AVX2 shuffle form in the decode products of 2- and 4-bit weights with books (1-4 rows at 4 bits, 1 at
    2; any count with rows_alone): the int8 products' operands (_int8_index_reference), only fp32 scaling and
    summation differing (1e-5), weights past the last whole step of 16 exact (K = 1000, 150, 200, 37). Each row's
    values are what it alone gives, bit for bit. Runs of 2 blocks (4 bits) and 4 (2 bits), a run's blocks in one
    group or in 2-4 (K = 576 at g64), groups of 3 blocks and a last partial run (K = 37: 2 steps; K = 16: 1; K = 8:
    none, every weight a tail), one or two groups' books per run at 4 bits (g64, g128). Other weights keep no books: 3 bits, groups of 32. A NaN
    in a row makes that row's outputs NaN."""
    monkeypatch.setenv("LCQ_CPU_AVX512", "0")
    layer, weight, plain, x = _weights_with_books(bits, rank, group, k, wide=False)
    most = 4 if bits == 4 else 1
    with cpu_products(torch.int8):
        alone = torch.cat([weight.linear(x[m:m + 1]) for m in range(7)])
        assert torch.equal(weight.linear(x[:most]), alone[:most])
        assert torch.equal(weight.linear(x[:most + 1]), plain.linear(x[:most + 1]))  # past them: fp32
    with cpu_products(torch.int8, rows_alone=True):
        assert torch.equal(weight.linear(x), alone)
    assert _relative_error(alone, _int8_index_reference(x, layer, exact_from=k // 16 * 16)) < 1e-5
    assert (_relative_error(alone, reference(x, layer)) > 1e-3) == (k >= 16)  # quantization happened (K = 8: exact)
    with cpu_products(torch.float32):
        assert _relative_error(weight.linear(x[:1]), reference(x[:1], layer)) < 1e-6
    x[2, k // 2] = float("nan")
    with cpu_products(torch.int8):
        assert weight.linear(x[2:3]).isnan().all() and not weight.linear(x[3:4]).isnan().any()
    for other in (cpu_index.IndexWeight(random_layer(70, k, 3, rank, 64, seed=1), wide=False),
                  cpu_index.IndexWeight(random_layer(70, k, bits, rank, 32, seed=1), wide=False)):
        assert other.keep_books() == 0


def _byte_row_values(rows: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The weight cpu_half.byte_rows holds, (n, k) float64: each unsigned code less 128, times its block's scale."""
    blocks = -(-k // cpu_half.BYTE_BLOCK)
    codes = rows[:n * blocks * cpu_half.BYTE_BLOCK].view(torch.uint8).view(n, blocks, -1).double() - 128
    scales = rows[n * blocks * cpu_half.BYTE_BLOCK:].view(torch.float32).view(n, blocks, 1).double()
    return (codes * scales).reshape(n, -1)[:, :k], codes, scales


@needs_c_kernels
@pytest.mark.parametrize("form", ["avx512", "avx2"])
@pytest.mark.parametrize("n, k", [(43, 40), (96, 37), (70, 576), (33, 80), (40, 100)])
def test_half_byte_rows_take_int8_decode_products(monkeypatch, n, k, form):
    """An fp16 weight's int8 rows (cpu_half.byte_rows: per block of 32 values a scale max |w| / 127, codes
    within half a step of the weight) take int8 products of 1-4 rows, and with the row form every row
    count: the float64 product with the rounded weight up to the activations' two bytes (1e-4), each row
    what it gives alone, bit for bit. From 5 rows, and in fp32 products, the rows are not read. Blocks cut
    short (K = 40, 37, 100), a last chunk of one block (K = 80: 3 blocks), SwiGLU over the decode form. The same
    with AVX2 code (LCQ_CPU_AVX512=0, as on a CPU without AVX-512), whose int8 products read the rows in AVX2's
    form."""
    if form == "avx2":
        monkeypatch.setenv("LCQ_CPU_AVX512", "0")
    elif not products_available(torch.int8):
        pytest.skip("the AVX-512 int8 products need AVX512_VNNI, AVX512_VBMI and AVX512_BF16")
    weight, x = torch.randn(n, k).half(), torch.randn(9, k)
    rows = cpu_half.byte_rows(weight)
    assert rows.numel() == cpu_half.byte_row_bytes(n, k) == n * -(-k // 32) * 36
    values, codes, scales = _byte_row_values(rows, n, k)
    assert (values - weight.double()).abs().max() <= 0.5001 * scales.max()
    assert torch.equal(codes.abs().amax(-1), torch.full_like(codes[..., 0], 127.0))  # each block's largest
    exact = x.double() @ weight.double().t()
    with cpu_products(torch.int8):
        alone = torch.cat([cpu_half.half_linear(x[m:m + 1], weight, byte_rows=rows) for m in range(9)])
        for count in (2, 4):
            assert torch.equal(cpu_half.half_linear(x[:count], weight, byte_rows=rows), alone[:count])
        assert torch.equal(cpu_half.half_linear(x[:5], weight, byte_rows=rows), cpu_half.half_linear(x[:5], weight))
        if n % 2 == 0:
            gate, up = alone[:1].chunk(2, dim=1)
            swiglu = cpu_half.half_linear(x[:1], weight, swiglu=True, byte_rows=rows)
            assert _relative_error(swiglu, torch.nn.functional.silu(gate) * up) < 1e-6
    with cpu_products(torch.int8, rows_alone=True):
        assert torch.equal(cpu_half.half_linear(x, weight, byte_rows=rows), alone)
    assert _relative_error(alone, x.double() @ values.t()) < 1e-4
    assert _relative_error(alone, exact) > 1e-4  # the weight was rounded
    with cpu_products(torch.float32):
        assert torch.equal(cpu_half.half_linear(x[:1], weight, byte_rows=rows), cpu_half.half_linear(x[:1], weight))


# The int8 product forms (cpu_products(torch.int8)), by what they read and the rows they take: LCQ layers' blocked
# product (from 10 rows) with SwiGLU too, with kept int8 rows (from 3 rows; 16: AMX tiles where there are any),
# the int8 decode form of LCQ layers with books (1-4 rows, any count with rows_alone) and of an fp16 weight's int8
# rows (the head: 1-2 rows, any count with rows_alone), with SwiGLU too.
INT8_FORMS = [("blocked", 12, False), ("blocked-swiglu", 12, False), ("kept", 3, False), ("kept-amx", 16, False),
              ("books", 1, False), ("books", 4, False), ("books", 7, True), ("head", 1, False), ("head", 2, False),
              ("head", 6, True), ("head-swiglu", 1, False)]


@needs_int8
@pytest.mark.parametrize("form, rows, alone", INT8_FORMS, ids=[f"{f}-{m}{'-alone' if a else ''}" for f, m, a in INT8_FORMS])
def test_int8_products_of_a_row_holding_nan_or_inf_are_not_finite(form, rows, alone):
    """Where int8 products quantize activations (per block of 64 values, or per row for the head's two bytes),
    a row holding a NaN gives NaN in every output, as the fp32 product does, and one holding +-inf no finite
    output: +-inf where the fp32 product has them (NaN where the inf meets a weight rounded to 0, and in the
    decode form of books, whose lanes scale partial sums, some of them 0 * inf), the other rows' outputs
    unchanged bit for bit. Until 2026-12-05 a NaN could drop out of its block's largest |value| (MAXPS) and
    became a finite byte, so the row's outputs were finite: a model gone NaN generated plausible tokens under
    the default products. The value first in a block, inside one (37), last in one (63), in the second pass
    of 16 blocks (1050), and last (K = 1101: in a block cut short, a word padded, past the last whole step of
    16, which the decode form of books takes in fp32)."""
    name, _, variant = form.partition("-")
    k = 1101
    if name == "head":
        half = torch.randn(48, k).half()
        byte_rows = cpu_half.byte_rows(half)

        def product(x):
            return cpu_half.half_linear(x, half, swiglu=variant == "swiglu", byte_rows=byte_rows)
    else:
        weight = cpu_index.IndexWeight(random_layer(48, k, 4, 2, 64, seed=3), wide=True)
        assert {"books": weight.keep_books, "kept": weight.keep_byte_rows}.get(name, lambda: 1)() > 0

        def product(x):
            return weight.linear(x, swiglu=variant == "swiglu")
    x, bad = torch.randn(rows, k), rows // 2
    x[:, 1] *= 30
    others = torch.arange(rows) != bad
    with cpu_products(torch.int8, rows_alone=alone), amx_tiles(variant == "amx"):
        clean = product(x)
        for value, at in itertools.product((float("nan"), float("inf"), -float("inf")), (0, 37, 63, 1050, 1100)):
            gone = x.clone()
            gone[bad, at] = value
            y = product(gone)
            assert torch.equal(y[others], clean[others]), (value, at)
            if value != value:
                assert y[bad].isnan().all(), (value, at)
                continue
            with cpu_products(torch.float32):
                exact = product(gone)[bad]
            assert not y[bad].isfinite().any() and ((y[bad] == exact) | y[bad].isnan()).all(), (value, at)


@needs_int8
def test_int8_products_take_lcq_weights_from_10_rows_in_this_thread():
    """Without int8 books, below 10 rows int8 products are bf16 ones (the bf16 decode forms are faster there), as are
    products of full-precision weights (fp16 copies: on the demo model the head in int8 cost +0.33%
    perplexity) and of the AVX2 index form; other threads keep fp32."""
    import threading

    layer = random_layer(70, 200, 3, 2, 64, seed=7)
    wide, narrow = cpu_index.IndexWeight(layer, wide=True), cpu_index.IndexWeight(layer, wide=False)
    half, x = torch.randn(70, 200).half(), torch.randn(33, 200)
    other: list[torch.Tensor] = []
    products = {}
    for dtype in (torch.int8, torch.bfloat16):
        with cpu_products(dtype):
            products[dtype] = [wide.linear(x[:9]), narrow.linear(x), cpu_half.half_linear(x, half)]
            thread = threading.Thread(target=lambda: other.append(wide.linear(x)))
            thread.start()
            thread.join()
    assert all(torch.equal(a, b) for a, b in zip(products[torch.int8], products[torch.bfloat16]))
    assert all(_relative_error(y, reference(x, layer)) < 1e-6 for y in other)


@needs_half_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("n", [74, 128])
def test_swiglu_inside_the_product_equals_product_then_swiglu(dtype, n):
    """With swiglu the C products of a [gate; up] weight return silu(gate) * up: the blocked product
    finishes each block of both halves' outputs in cache (an intermediate width of 37 leaves a last
    block of 13 and values past whole vectors), the panel products each tile's (width 64: two panels a
    half, SwiGLU of each tile of rows on AVX-512, in register tiles and AMX tiles), the decode forms the
    whole product; the same values bit for bit as the product then cpu_ops.gated_mul (AVX2), for LCQ
    indices (AVX-512 and AVX2 forms) and fp16 copies, with every product form this CPU has."""
    layer = random_layer(n, 200, 4, 2, 64, seed=11)
    weights = [cpu_index.IndexWeight(layer, wide=False), torch.randn(n, 200).half()]
    if cpu_index.wide_available():
        weights.append(cpu_index.IndexWeight(layer, wide=True))
    x = torch.randn(40, 200)
    with cpu_products(dtype):
        for weight in weights:
            product = (lambda x, swiglu=False: cpu_half.half_linear(x, weight, swiglu)) \
                if isinstance(weight, torch.Tensor) else weight.linear
            for m in (1, 4, 7, 12, 33, 40):
                fused = product(x[:m], swiglu=True)
                assert fused.shape == (m, n // 2)
                assert torch.equal(fused, cpu_ops.gated_mul(product(x[:m]), "silu"))
    with pytest.raises(ValueError):
        cpu_half.half_linear(x, torch.randn(73, 200).half(), swiglu=True)
    with pytest.raises(ValueError):
        cpu_index.IndexWeight(random_layer(73, 200, 4, 2, 64, seed=1)).linear(x, swiglu=True)


@needs_bf16
@pytest.mark.parametrize("m, k", [(3, 576), (5, 77), (8, 100), (9, 31)])
def test_half_decode_with_bf16_products_matches_rounded_reference(m, k):
    """The fp16 kernel's decode form with bf16 operands (3-9 rows): weights and activations of the
    whole runs of 32 rounded to bf16, the rest (K = 77, 100: a tail; 31: all of it) exact fp32; only
    summation differs (1e-5). M = 9: passes of 5 and 4 rows; 2 rows stay fp32."""
    weight, x = torch.randn(70, k).half(), torch.randn(m, k)
    whole = k // 32 * 32
    rounded_x, rounded_w = x.double(), weight.double()
    rounded_x[:, :whole] = x[:, :whole].bfloat16().double()
    rounded_w[:, :whole] = weight[:, :whole].float().bfloat16().double()
    with cpu_products(torch.bfloat16):
        assert_close(cpu_half.half_linear(x, weight), rounded_x @ rounded_w.t(), torch.float32)
        assert_close(cpu_half.half_linear(x[:2], weight), x[:2].double() @ weight.double().t(), torch.float32)
        if whole:
            assert _relative_error(cpu_half.half_linear(x, weight), x.double() @ weight.double().t()) > 1e-4


@needs_bf16
def test_bf16_products_apply_to_index_weights_in_this_thread_only():
    """LCQ products of 5 rows or more round to bf16 in the block (from 10 rows the blocked product,
    below it the AVX-512 decode form); fewer rows stay exact fp32, as do products in other threads
    and after the block (thread-local, restored)."""
    import threading

    layer = random_layer(70, 128, 3, 2, 64, seed=5)
    index_weight, dense = cpu_index.IndexWeight(layer), dequantize(layer, torch.float32)
    x = torch.randn(33, 128)
    other: list[torch.Tensor] = []
    with cpu_products(torch.bfloat16):
        for m in (33, 10, 9, 5):
            assert _relative_error(index_weight.linear(x[:m]), _bf16_reference(x[:m], dense)) < 1e-6
        for m in (4, 1):
            assert _relative_error(index_weight.linear(x[:m]), reference(x[:m], layer)) < 1e-6
        thread = threading.Thread(target=lambda: other.append(index_weight.linear(x)))
        thread.start()
        thread.join()
    assert _relative_error(other[0], reference(x, layer)) < 1e-6
    assert _relative_error(index_weight.linear(x), reference(x, layer)) < 1e-6


def _relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


INDEX_FORMS = [False] + ([True] if "avx512f" in native.cpu_flags() else [])  # wide: AVX-512


@needs_half_kernel
@pytest.mark.parametrize("bits, rank, group, k", [(2, 1, 32, 80), (3, 3, 64, 100), (4, 2, 128, 150), (4, 1, 32, 37),
                                                   (2, 2, 64, 600), (3, 1, 32, 500), (4, 4, 64, 300), (3, 5, 32, 96)])
@pytest.mark.parametrize("m", [1, 3, 6, 8, 9, 16, 33])
@pytest.mark.parametrize("wide", INDEX_FORMS)
@pytest.mark.usefixtures("both_cores")
def test_index_kernel_matches_reference(monkeypatch, bits, rank, group, k, m, wide):
    """Indices read in place, codebook entries exact fp32 (only summation order differs, 1e-6): below
    16 rows the decode form (even passes of up to 4 rows; 6 in AVX-512), in the AVX2 and (where the CPU
    has it) the AVX-512 form; from 16, blocks of rows expanded to fp32 for cpu_gemm.c's product. Rows hold runs of 16
    words of 16, 10 or 8 indices (2, 3, 4 bits) and a partial run: K = 80 (2 bits) and 37 end in
    one of 2-byte lanes, 100 (3 bits) of 4-byte lanes, 150 (4 bits) after a whole run in 1-byte
    lanes, 600 and 500 after several whole runs; K = 37, 100 and 150 end inside a step of 16 (the
    scalar tail). N = 70 leaves a partial block of 48 rows, a partial tile of 16 output columns in
    the decode form, and rows packed 32 at a time a partial last chunk. Ranks 1-4 take the decode
    form whose table is held in registers, rank 5 the one that reads it from memory."""
    monkeypatch.setattr(cpu_index, "PACK_ROWS", 32)
    layer = random_layer(70, k, bits, rank, group, seed=bits + rank)
    weight = cpu_index.IndexWeight(layer, wide=wide)
    x = torch.randn(m, k)
    assert _relative_error(weight.linear(x), reference(x, layer)) < 1e-6


@needs_bf16
@pytest.mark.parametrize("bits, rank, group, k", [(2, 1, 32, 80), (3, 3, 64, 100), (4, 2, 128, 150), (4, 1, 32, 37),
                                                   (2, 2, 64, 600), (3, 1, 32, 500), (4, 4, 64, 300), (3, 5, 32, 96)])
@pytest.mark.parametrize("m", [5, 6, 7, 8, 9])
def test_index_decode_with_bf16_products_matches_rounded_reference(bits, rank, group, k, m):
    """The AVX-512 decode form with bf16 operands (5-9 rows): weights and activations of the whole
    steps of 16 rounded to bf16, the weights past them (K = 37, 100, 150: the scalar tail) exact
    fp32, as the kernel takes them; only summation differs (1e-6). Every pass size it has (4-8 rows;
    M = 9: 5 and 4), runs ending inside a pair of steps (K = 80: 5 steps), every bit width, ranks 1-4
    (tables held) and 5 (read per group), and a partial last tile of 16 columns (N = 70). At rank 5
    an entry's five fp32 products can round an ulp away from dequantize's, which can move its bf16
    rounding: 1e-5 there."""
    layer = random_layer(70, k, bits, rank, group, seed=bits + rank)
    weight, dense = cpu_index.IndexWeight(layer, wide=True), dequantize(layer, torch.float32).double()
    x = torch.randn(m, k)
    whole = k // 16 * 16
    rounded_x, rounded_w = x.double(), dense.clone()
    rounded_x[:, :whole] = x[:, :whole].bfloat16().double()
    rounded_w[:, :whole] = dense[:, :whole].bfloat16().double()
    with cpu_products(torch.bfloat16):
        y = weight.linear(x)
    assert _relative_error(y, rounded_x @ rounded_w.t()) < (1e-6 if rank <= 4 else 1e-5)


@needs_int8
@pytest.mark.parametrize("bits, rank, group, k", [(2, 1, 32, 80), (3, 3, 64, 100), (4, 2, 128, 150), (4, 1, 32, 37),
                                                   (2, 2, 64, 600), (3, 1, 32, 500), (4, 2, 96, 330)])
def test_index_weights_with_int8_products(bits, rank, group, k):
    """Every bit width and rank in int8 products: each group's codebook quantized once, a block's
    scale bounding the codebooks it meets (_int8_index_reference); only fp32 scaling and summation
    differ (1e-5), where int8 rounding itself is ~1e-2 from exact. Partial runs (K = 37, 80, 100,
    150, 330), blocks meeting two groups (g = 32, 96) and parts of one (g = 128), blocks that take
    their later steps from the next run (3 bits, K = 500: runs of 160 indices)."""
    layer = random_layer(70, k, bits, rank, group, seed=bits + rank)
    x = torch.randn(33, k)
    with cpu_products(torch.int8):
        y = cpu_index.IndexWeight(layer, wide=True).linear(x)
    assert _relative_error(y, _int8_index_reference(x, layer)) < 1e-5
    assert _relative_error(y, reference(x, layer)) > 1e-3


@needs_int8
@pytest.mark.parametrize("n, k, bits, rank, group", [(74, 200, 4, 2, 64), (43, 37, 2, 1, 32), (100, 330, 3, 3, 96),
                                                      (150, 600, 2, 2, 128), (128, 90, 4, 1, 32)])
def test_kept_int8_rows_are_what_int8_products_expand(n, k, bits, rank, group):
    """A weight that keeps its int8 rows (keep_byte_rows, panels of 32 rows) gives the products of one
    that expands them per panel, bit for bit, from 10 rows (last panels of 11, 4, 22 rows and one
    whole; activation rows past the tiles of 6); gate/up halves of 64 rows share panels with neither
    half and take SwiGLU per tile, halves of 37, 50 and 75 rows the product then SwiGLU, the same
    values either way. From 3 rows it takes int8 products (the decode forms are slower than reading
    kept bytes there), below 3 the same decode forms as without."""
    layer = random_layer(n, k, bits, rank, group, seed=n + k)
    expanding, kept = cpu_index.IndexWeight(layer, wide=True), cpu_index.IndexWeight(layer, wide=True)
    words = -(-k // 4)
    panel_rows = -(-n // 32) * 32
    assert kept.keep_byte_rows() == kept.byte_rows_nbytes == 4 * panel_rows * (words + 2 * -(-words // 16))
    assert kept.nbytes == expanding.nbytes + kept.byte_rows_nbytes
    x = torch.randn(70, k)
    with cpu_products(torch.int8):
        for m in (1, 2, 10, 16, 33, 70):
            for swiglu in (False, True) if n % 2 == 0 else (False,):
                assert torch.equal(kept.linear(x[:m], swiglu), expanding.linear(x[:m], swiglu)), (m, swiglu)
            if n % 2 == 0 and m >= 10:
                gate, up = kept.linear(x[:m]).chunk(2, dim=1)
                assert _relative_error(kept.linear(x[:m], True), torch.nn.functional.silu(gate) * up) < 1e-6
        for m in (3, 4, 9, 33):
            assert _relative_error(kept.linear(x[:m]), _int8_index_reference(x[:m], layer)) < 1e-5
    assert cpu_index.IndexWeight(layer, wide=False).keep_byte_rows() == 0  # the AVX2 form has no int8 products


needs_amx = pytest.mark.skipif(not (products_available(torch.int8) and amx_active()),
                               reason="AMX tiles need AMX-INT8 and AMX-BF16 besides what int8 products need, "
                                      "and Linux's leave to use them")


@needs_amx
@pytest.mark.parametrize("n, k, bits, rank, group", [(74, 200, 4, 2, 64), (43, 37, 2, 1, 32), (100, 330, 3, 3, 96),
                                                      (150, 600, 2, 2, 128), (64, 576, 4, 2, 64),
                                                      (32, 1536, 2, 2, 128)])
@pytest.mark.usefixtures("both_cores")
def test_amx_tiles_give_the_int8_products_bit_for_bit(n, k, bits, rank, group):
    """int8 products from 16 rows take AMX tiles for each whole 16 rows, the rest the vpdpbusd register tiles
    (from 8 rows, a tile of their own padded with zero rows): the same integer sums of each 64-value block and
    the same fp32 scaling, so the same values bit for bit, with int8 rows kept or expanded per panel. Whole
    tiles only (M = 16, 32), the rest in register tiles (17, 23, 33, 70) or a padded tile (24, 31); a last block of 16, 9, 2 or 6 words, whole blocks (K = 576, 1536), a block of one word (K = 37 has
    10 words, no whole block); last panels of 10-22 rows (N = 43, 74, 100, 150); SwiGLU per tile and after."""
    layer = random_layer(n, k, bits, rank, group, seed=n + k)
    kept, expanding = cpu_index.IndexWeight(layer, wide=True), cpu_index.IndexWeight(layer, wide=True)
    assert kept.keep_byte_rows() > 0
    x = torch.randn(70, k)
    x[:, 1] *= 30
    with cpu_products(torch.int8):
        for weight, m in itertools.product((kept, expanding), (16, 17, 23, 24, 31, 32, 33, 70)):
            for swiglu in (False, True) if n % 2 == 0 else (False,):
                with amx_tiles(False) as on:
                    assert not on and not amx_active()
                    registers = weight.linear(x[:m], swiglu)
                with amx_tiles(True) as on:
                    assert on and amx_active()
                    tiles = weight.linear(x[:m], swiglu)
                assert torch.equal(tiles, registers), (m, swiglu)
        with amx_tiles(True):
            assert _relative_error(kept.linear(x[:33]), _int8_index_reference(x[:33], layer)) < 1e-5


@needs_amx
@pytest.mark.parametrize("n, k", [(43, 40), (96, 37), (128, 77), (64, 576), (200, 1000)])
def test_amx_tiles_give_the_bf16_products_of_kept_panels(n, k):
    """bf16 products of an fp16 weight's kept panels take AMX tiles from 5 rows (tdpbf16ps: fp32 sums over
    all of K in the tile, stored once): the bf16-rounded product up to fp32 summation, in another order than
    the register tiles' (which 3-4 rows keep). The activation rows are padded with zero rows to tiles of 16,
    and each row's values do not depend on the rows beside it (M = 5, 16, 17, 33 against 70). Short last
    blocks (K = 37, 40, 77, 1000), partial panels (N = 43, 200), SwiGLU per tile (N = 64, 128, 200: halves of
    whole panels or not)."""
    weight, x = torch.randn(n, k).half(), torch.randn(70, k)
    panels = cpu_half.pair_panels(weight)
    with cpu_products(torch.bfloat16):
        with amx_tiles(True) as on:
            assert on
            tiles = {m: cpu_half.half_linear(x[:m], weight, panels=panels) for m in (3, 4, 5, 16, 17, 33, 70)}
            swiglu = cpu_half.half_linear(x, weight, swiglu=True, panels=panels) if n % 2 == 0 else None
        with amx_tiles(False):
            registers = {m: cpu_half.half_linear(x[:m], weight, panels=panels) for m in (3, 4, 70)}
    for m in (5, 16, 17, 33):
        assert torch.equal(tiles[m], tiles[70][:m]), m
    assert torch.equal(tiles[3], registers[3]) and torch.equal(tiles[4], registers[4])
    assert_close(tiles[70], _bf16_reference(x, weight.float()), torch.float32)
    if k >= 576:  # long enough sums that the two orders part somewhere
        assert not torch.equal(tiles[70], registers[70])
    if swiglu is not None:
        gate, up = tiles[70].chunk(2, dim=1)
        assert _relative_error(swiglu, torch.nn.functional.silu(gate) * up) < 1e-6


@needs_amx
@pytest.mark.parametrize("n, k, bits, rank, group", [(74, 200, 4, 2, 64), (43, 37, 2, 1, 32), (100, 330, 3, 3, 96),
                                                      (64, 576, 4, 2, 64), (1600, 576, 2, 1, 64)])
@pytest.mark.usefixtures("both_cores")
def test_int8_products_of_many_rows_take_bf16_tiles(n, k, bits, rank, group):
    """From byte_pair_rows rows (256 by default; 20 here) int8 products of LCQ layers run on bf16 AMX tiles:
    activations rounded to bf16, each weight value of the int8 form (q times its block's scale) rounded to
    bf16, fp32 sums over all of K (the bf16 product of those operands up to fp32 summation, so no longer
    the int8 products' quantized activations). Kept and expanded int8 rows; rows in tiles of 32 and a last
    one of up to 16 (M = 20, 33, 70); K whole blocks of 32 pairs (576) or padded with zeros to them (37,
    200, 330); last panels of 10-22 rows; at 1,030 rows all rows through groups of panels a block of rows at a
    time (several a thread at N = 1600, one or two tasks each at 40 KB), with and without SwiGLU, equal bit
    for bit to all rows through one panel at a time; each row's values independent of the rows beside it."""
    layer = random_layer(n, k, bits, rank, group, seed=n + k)
    kept, expanding = cpu_index.IndexWeight(layer, wide=True), cpu_index.IndexWeight(layer, wide=True)
    assert kept.keep_byte_rows() > 0
    books, g = layer_codebooks(layer).abs().amax(-1), layer.group_size
    tops = torch.stack([books[:, s // g:(min(s + 64, k) - 1) // g + 1].amax(-1) for s in range(0, k, 64)], 1)
    values = _int8_quantized(dequantize(layer, torch.float32), tops).float()  # the int8 form's weights
    x = torch.randn(70, k)
    x[:, 1] *= 30
    with cpu_products(torch.int8), amx_tiles(True), byte_pair_rows(20):
        for weight in (kept, expanding):
            products = {m: weight.linear(x[:m]) for m in (20, 33, 70)}
            for m in (20, 33):
                assert torch.equal(products[m], products[70][:m]), m
            many = torch.randn(1030, k)  # groups from 1024 rows: against a task at a time, bit for bit
            grouped = weight.linear(many)
            assert_close(grouped, _bf16_reference(many, values), torch.float32)
            grouped_swiglu = weight.linear(many, True) if n % 2 == 0 else None
            for kb in (0, 40):
                with paired_group_kb(kb):
                    assert torch.equal(weight.linear(many), grouped), kb
                    if grouped_swiglu is not None:
                        assert torch.equal(weight.linear(many, True), grouped_swiglu), kb
            if grouped_swiglu is not None:
                gate, up = grouped.chunk(2, dim=1)
                assert _relative_error(grouped_swiglu, torch.nn.functional.silu(gate) * up) < 1e-6
            assert_close(products[70], _bf16_reference(x, values), torch.float32)
            if n % 2 == 0:
                gate, up = products[70].chunk(2, dim=1)
                swiglu = weight.linear(x, True)
                assert _relative_error(swiglu, torch.nn.functional.silu(gate) * up) < 1e-6
        with byte_pair_rows(71):  # below the threshold: the int8 products
            assert _relative_error(kept.linear(x), _int8_index_reference(x, layer)) < 1e-5


def test_amx_tiles_are_asked_for_unless_turned_off(monkeypatch):
    """LCQ_CPU_AMX=0, like LCQ_CPU_AVX512=0, keeps products off AMX; elsewhere the CPU decides."""
    expected = {"amx_int8", "amx_bf16"} <= native.cpu_flags() and native.has_avx512("avx512_vnni")
    assert native.amx_allowed() == expected
    monkeypatch.setenv("LCQ_CPU_AMX", "0")
    assert not native.amx_allowed()
    monkeypatch.setenv("LCQ_CPU_AMX", "1")
    monkeypatch.setenv("LCQ_CPU_AVX512", "0")
    assert not native.amx_allowed()


@needs_half_kernel
@pytest.mark.skipif(not cpu_index.enabled(), reason="index CPU kernel unavailable here or turned off (LCQ_CPU_INDEX=0)")
@pytest.mark.parametrize("products", [torch.float32, torch.int8])
def test_rows_alone_products_give_each_row_its_own_values_at_any_row_count(products):
    """A step verifying drafts takes rows_alone products: each row gets the values it alone gives, bit for
    bit: an LCQ layer's also from 16 rows (1 sequence and 15 drafts, or 2 and 7 each), where the fp32
    blocked product sums a row's products in another order (up to 6e-4 apart at K = 4100: a near tie could
    then change a token), and an fp16 weight's (the head) at any count (its chains of sums followed the
    rows of a pass: 1e-5 apart from 2 rows)."""
    index = cpu_index.IndexWeight(random_layer(64, 576, 4, 2, 64, seed=0))
    half = torch.randn(48, 576).to(torch.float16)  # an fp16 weight's decode form: chains of sums by its rows
    x = torch.randn(20, 576)
    with cpu_products(products, rows_alone=True):
        for product in (index.linear, lambda rows: cpu_half.half_linear(rows, half)):
            assert torch.equal(product(x), torch.cat([product(x[m:m + 1]) for m in range(20)]))


@pytest.mark.skipif(not cpu_index.enabled(), reason="index CPU kernel unavailable here or turned off (LCQ_CPU_INDEX=0)")
def test_index_kernel_takes_fused_layers_and_is_small():
    layer = fused_layer(bits=4)  # three V tables picked per column, a bias on the first part
    cached = LCQLinear(layer, cache_dense=True)
    for m in (1, 5, 12):
        x = torch.randn(m, 64)
        assert _relative_error(cached(x), reference(x, layer)) < 1e-6
    assert cached.uses_index_weights and cached._half is None and cached._dense is None
    fp16_bytes = 2 * 256 * 576
    # b / 16 of an fp16 copy plus S and B (0.094 / 2) and, for the int8 expansion, the largest
    # codebook entry each block of 64 values meets (0.031 / 2); at 3 bits a word holds 10 indices (30
    # bits) and K = 576 ends in a partial run of 96 indices in 4-byte lanes (3.56 bits per index)
    for bits, ratio in ((4, 0.38), (3, 0.36), (2, 0.26)):
        weight = cpu_index.IndexWeight(random_layer(256, 576, bits, 2, 64, seed=3))
        assert weight.nbytes < ratio * fp16_bytes, (bits, weight.nbytes / fp16_bytes)


@needs_half_kernel
def test_cached_layer_keeps_only_fp16_weights_without_the_index_kernel(monkeypatch):
    """LCQ_CPU_INDEX=0: the fp16 copy serves every fp32 product (tolerance of an fp16 weight, 3e-3),
    so the layer keeps no fp32 weight either."""
    monkeypatch.setenv("LCQ_CPU_INDEX", "0")
    layer = random_layer(70, 100, 3, 2, 32, seed=5, bias=True)
    cached = LCQLinear(layer, cache_dense=True)
    for m in (1, 8, 9, 40):
        x = torch.randn(1, m, 100)
        y = cached(x)
        assert cached.uses_half_weights and not cached.uses_index_weights and cached._dense is None
        assert y.shape == (1, m, 70) and _relative_error(y[0], reference(x[0], layer)) < 3e-3


def test_released_layer_serves_its_dtype_and_refuses_others():
    """release_packed drops the packed tensors of a warmed layer (nothing before it is warmed);
    products in its dtype go on unchanged, another dtype or a move is a clear error."""
    layer = random_layer(70, 100, 3, 2, 32, seed=5, bias=True)
    cached = LCQLinear(layer, cache_dense=True)
    x = torch.randn(9, 100)
    assert cached.release_packed() == 0 and cached.layer is layer
    y = cached(x)
    assert cached.release_packed() == layer.nbytes() and cached.layer is None
    assert torch.equal(cached(x), y) and (cached.in_features, cached.out_features) == (100, 70)
    with pytest.raises(RuntimeError, match="load the model again"):
        cached(x.bfloat16())
    with pytest.raises(RuntimeError, match="load the model again"):
        cached.to("cpu")


def test_cached_layer_without_the_fp16_kernel_is_fp32(monkeypatch):
    monkeypatch.setenv("LCQ_CPU_HALF", "0")
    layer = random_layer(70, 100, 3, 2, 32, seed=5, bias=True)
    cached = LCQLinear(layer, cache_dense=True)
    x = torch.randn(9, 100)
    y = cached(x)
    assert not cached.uses_half_weights and not cached.uses_index_weights and cached._dense is not None
    ref = reference(x, layer)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5


@needs_half_kernel
def test_half_copy_keeps_full_precision_weights_full():
    from_fp16_checkpoint, fp32 = torch.randn(8, 16).half().float(), torch.randn(8, 16)
    assert torch.equal(half_copy(from_fp16_checkpoint, exact_only=True).float(), from_fp16_checkpoint)
    assert half_copy(fp32, exact_only=True) is None
    assert half_copy(fp32, exact_only=False).dtype == torch.float16


@pytest.mark.skipif(native.unsupported() is not None, reason="no C kernels here (see lcq/kernels/native.py)")
def test_c_kernels_build_into_a_folder_once(tmp_path, monkeypatch):
    """As the CPU Docker image builds them into the installed package (no compiler at run time). Over one
    small source: every source's compile runs in the suite's first use of the kernels (load)."""
    monkeypatch.setattr(native, "SOURCES", (native.FOLDER / "cpu_half.c",))
    built = native.build(tmp_path)
    assert built.is_file() and built.parent == tmp_path
    stamp = built.stat().st_mtime_ns
    assert native.build(tmp_path) == built and built.stat().st_mtime_ns == stamp
    assert list(tmp_path.iterdir()) == [built]  # no temporary folder left behind


@pytest.mark.skipif(native.unsupported() is not None, reason="no C kernels here (see lcq/kernels/native.py)")
def test_a_library_built_into_the_package_loads_without_a_compiler(tmp_path, monkeypatch):
    """The CPU Docker image's runtime stage has no compiler: the copy its build stage put into the package
    is loaded; without that copy, no compiler means no C kernels."""
    shutil.copy(native.build(cache_dir() / "native"), tmp_path / native.library_name())
    monkeypatch.setattr(native, "FOLDER", tmp_path)
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native.unsupported.cache_clear()
    native.load.cache_clear()
    try:
        assert native.unsupported() is None
        assert native.load()._name == str(tmp_path / native.library_name())
        (tmp_path / native.library_name()).unlink()
        native.unsupported.cache_clear()
        assert native.unsupported() == "no C compiler (cc, gcc or clang) on PATH"
    finally:
        native.unsupported.cache_clear()
        native.load.cache_clear()


@pytest.mark.skipif(native.unsupported() is not None, reason="no C kernels here (see lcq/kernels/native.py)")
def test_a_failed_c_build_raises_the_compiler_message_and_leaves_nothing(tmp_path, monkeypatch):
    """Sources compile in parallel: one that fails is reported with its compiler output once all have
    finished, and no library or temporary folder is left (load() then logs it and runs the torch path)."""
    broken = tmp_path / "cpu_broken.c"
    broken.write_text("int broken( {\n")
    monkeypatch.setattr(native, "SOURCES", (native.FOLDER / "cpu_ops.c", broken))
    with pytest.raises(subprocess.CalledProcessError) as failure:
        native.build(tmp_path / "built")
    assert "cpu_broken.c" in failure.value.stderr
    assert list((tmp_path / "built").iterdir()) == []


def test_c_sources_ship_with_the_package():
    """An installed package (the CPU Docker image builds there) holds every source and header."""
    import fnmatch
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["lcq.kernels"]
    for source in native.SOURCES + native.HEADERS:
        assert source.is_file() and any(fnmatch.fnmatch(source.name, p) for p in patterns), source.name


needs_cpu_ops = pytest.mark.skipif(not cpu_ops.usable(), reason="C decode ops unavailable here (see lcq/kernels/native.py)")


@needs_cpu_ops
@pytest.mark.parametrize("rows", [1, 3, 20])  # 20: the multi-threaded branch
@pytest.mark.usefixtures("both_cores")
def test_cpu_ops_match_torch(rows):
    """One-pass C versions of RMSNorm (with and without the residual add), LayerNorm (with and without bias),
    rotary and SwiGLU
    against the torch expressions: fp32 with another summation order, 1e-5."""
    from lcq.models.layers import apply_rotary

    dim, heads, kv_heads, head_dim = 72, 3, 1, 24
    x, residual, weight = torch.randn(rows, dim), torch.randn(rows, dim), torch.randn(dim)
    expected = weight * torch.nn.functional.rms_norm(x, (dim,), eps=1e-5)
    out, same = cpu_ops.norm(x, weight, 1e-5)
    assert_close(out, expected, torch.float32)
    assert same.data_ptr() == x.data_ptr()
    total = residual + x
    out, updated = cpu_ops.norm(x, weight, 1e-5, residual)
    assert updated is residual and torch.allclose(residual, total, atol=0, rtol=0)
    assert_close(out, weight * torch.nn.functional.rms_norm(total, (dim,), eps=1e-5), torch.float32)
    x = x + 3.0  # off centre, as LayerNorms' inputs may be (Cohere, StableLM)
    for bias in (None, torch.randn(dim)):
        residual = torch.randn(rows, dim)
        total = residual + x
        out, updated = cpu_ops.norm(x, weight, 1e-5, residual, bias, centred=True)
        assert updated is residual and torch.equal(residual, total)
        assert_close(out, torch.nn.functional.layer_norm(total, (dim,), weight, bias, eps=1e-5), torch.float32)
    for centred in (False, True):  # q/k norms: one weight for every head, or each head its own (Command R+)
        normed = torch.nn.functional.layer_norm if centred else torch.nn.functional.rms_norm
        for weights in (torch.randn(head_dim), torch.randn(heads, head_dim)):
            qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim)
            expected = qkv.clone()
            expected[:, :heads * head_dim] = (weights * normed(qkv[:, :heads * head_dim].view(rows, heads, head_dim),
                                                               (head_dim,), eps=1e-5)).flatten(1)
            cpu_ops.head_norm_(qkv, heads, head_dim, weights, 1e-5, head_dim if weights.dim() == 2 else 0, centred)
            assert_close(qkv, expected, torch.float32)

    angles = torch.randn(rows, 1, head_dim // 2)
    cos, sin = angles.cos(), angles.sin()
    rotated = (heads + kv_heads) * head_dim
    for interleaved in (False, True):  # pairs (i, i + d/2), or (2i, 2i + 1) (GLM-4-0414)
        qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim)
        turned = apply_rotary(qkv[:, :rotated].view(rows, -1, head_dim), cos, sin, interleaved).reshape(rows, -1)
        expected = torch.cat([turned, qkv[:, rotated:]], dim=1)
        cpu_ops.rotary_(qkv, heads + kv_heads, head_dim, cos, sin, interleaved)
        assert_close(qkv, expected, torch.float32)
    quarter = angles[..., :head_dim // 8]  # a partial rotary embedding (Qwen3.5's): each head's first quarter turned
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim)
    turned = apply_rotary(qkv[:, :rotated].view(rows, -1, head_dim), quarter.cos(), quarter.sin()).reshape(rows, -1)
    expected = torch.cat([turned, qkv[:, rotated:]], dim=1)
    cpu_ops.rotary_(qkv, heads + kv_heads, head_dim, quarter.cos(), quarter.sin())
    assert_close(qkv, expected, torch.float32)
    assert torch.equal(qkv.view(rows, -1, head_dim)[:, :heads + kv_heads, head_dim // 4:],
                       expected.view(rows, -1, head_dim)[:, :heads + kv_heads, head_dim // 4:])
    pairs = torch.randn(1, 1, head_dim)  # interleaved: pair i is dimensions 2i and 2i + 1, turned by angle i
    turned = apply_rotary(pairs, cos[:1], sin[:1], interleaved=True)[0, 0]
    assert_close(turned[0::2], pairs[0, 0, 0::2] * cos[0, 0] - pairs[0, 0, 1::2] * sin[0, 0], torch.float32)

    gate_up = torch.randn(rows, 2 * dim)
    assert_close(cpu_ops.gated_mul(gate_up, "silu"), torch.nn.functional.silu(gate_up[:, :dim]) * gate_up[:, dim:],
                 torch.float32)
    gate, up = (gate_up * 4).chunk(2, dim=1)  # gpt-oss's clamped SwiGLU (limit 7: some values past it)
    clamped = gate.clamp(max=7.0) * torch.sigmoid(gate.clamp(max=7.0) * 1.702) * (up.clamp(-7.0, 7.0) + 1)
    assert_close(cpu_ops.gated_mul(gate_up * 4, "swiglu_oai", torch.tensor([1.702, 7.0])), clamped, torch.float32)
    # MLPs without a gate (Nemotron-H's relu(x)^2, Apertus's xIELU), and Qwen3.5's attention output gate read in place
    up = torch.randn(rows, dim) * 3
    assert torch.equal(cpu_ops.ungated(up, "relu2"), torch.relu(up).square())
    factors = torch.tensor([0.8, 0.6, 0.5, -1e-6])
    alpha_p, alpha_n, beta, eps = factors
    expected = torch.where(up > 0, alpha_p * up * up + beta * up, (torch.expm1(torch.minimum(up, eps)) - up) * alpha_n
                           + beta * up)
    assert_close(cpu_ops.ungated(up, "xielu", factors), expected, torch.float32)
    projection = torch.randn(rows, heads, 2, head_dim)
    out = torch.randn(rows, heads, head_dim)
    gated = out * torch.sigmoid(projection[:, :, 1])
    cpu_ops.sigmoid_gate_(out, projection[:, :, 1])
    assert_close(out, gated, torch.float32)


@needs_cpu_ops
@pytest.mark.parametrize("seqs", [1, 3])
def test_recurrent_mixers_gated_norm_matches_torch(seqs):
    """The recurrent mixers' gated norm in C (their prefill outputs; tests/test_models.py checks their whole
    decode step) against torch (fp32, relative error under 1e-5): the gate applied before the norm (Mamba-2) or
    after it (Qwen3.5, Falcon-H1), its weight per value or shared by the groups, the gates read in place from a
    wider projection."""
    generator = torch.Generator().manual_seed(seqs)
    width, group = 48, 12
    values = torch.randn(seqs, width, generator=generator)
    projection = torch.randn(seqs, 2 * width, generator=generator)
    gates = projection[:, width:]
    for norm_weight in (torch.randn(width, generator=generator), torch.randn(group, generator=generator)):
        tiled = norm_weight.repeat(width // norm_weight.numel())
        for gate_first in (True, False):
            normed = values * torch.nn.functional.silu(gates) if gate_first else values
            normed = torch.nn.functional.rms_norm(normed.view(seqs, -1, group), (group,), eps=1e-6).view(seqs, -1)
            expected = normed * tiled * (1 if gate_first else torch.nn.functional.silu(gates))
            assert_close(cpu_ops.gated_group_norm(values, gates, norm_weight, group, 1e-6, gate_first), expected,
                         torch.float32)


@needs_cpu_ops
@pytest.mark.parametrize("width", [1, 13, 4096])
def test_cpu_geglu_matches_torch_gelu_tanh(width):
    """Gemma's GeGLU in C against torch's gelu(approximate="tanh") * up, per value: within 2 ulp (1e-6
    of the value, 1e-6 absolute where gelu nears 0) from -12 to 12, and every value the same whether it
    falls in a vector or the tail."""
    gate = torch.linspace(-12, 12, 3 * width).view(3, width)
    up = torch.randn(3, width)
    out = cpu_ops.gated_mul(torch.cat([gate, up], dim=1), "gelu_tanh")
    torch.testing.assert_close(out, torch.nn.functional.gelu(gate, approximate="tanh") * up, rtol=1e-6, atol=1e-6)
    ones = torch.ones(1, 3 * width)
    flat = cpu_ops.gated_mul(torch.cat([gate.view(1, -1), ones], dim=1), "gelu_tanh").view(3, width)
    assert torch.equal(out, flat * up)


@needs_cpu_ops
@pytest.mark.parametrize("width", [1, 13, 4096])
def test_cpu_silu_of_very_negative_gates_makes_no_subnormals(width):
    """SwiGLU in C below gate -80: silu(g) * up within 1e-30 of torch's and never a subnormal float, whose
    microcode assists made it ten times slower; vector lanes and the tail alike. Ordinary gates keep their
    values (2 ulp)."""
    gate = torch.linspace(-130, -60, 3 * width).view(3, width)
    up = (torch.rand(3, width) + 0.5) * 1e-3  # small enough that e^87.3's sigmoid times them is subnormal
    out = cpu_ops.gated_mul(torch.cat([gate, up], dim=1), "silu")
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up, rtol=0, atol=1e-30)
    tiny = torch.finfo(torch.float32).tiny
    assert not ((out != 0) & (out.abs() < tiny)).any()
    ones = torch.ones(1, 3 * width)
    flat = cpu_ops.gated_mul(torch.cat([gate.view(1, -1), ones], dim=1), "silu").view(3, width)
    assert torch.equal(out, flat * up)
    gate, up = torch.linspace(-20, 20, 3 * width).view(3, width), torch.randn(3, width)
    out = cpu_ops.gated_mul(torch.cat([gate, up], dim=1), "silu")
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-6)


@needs_cpu_ops
@pytest.mark.parametrize("width", [1, 7, 8, 33, 49152])
def test_cpu_argmax_matches_torch(width):
    """The sampler's C argmax gives torch.argmax's index exactly: the first of tied maxima (rows of
    few distinct values), the first NaN of a row with NaNs, rows of -inf and of signed zeros, widths
    that are not a multiple of the vector, and 1 to 20 rows (20: the multi-threaded branch)."""
    generator = torch.Generator().manual_seed(width)
    for rows in (1, 20):
        x = torch.randint(0, 4, (rows, width), generator=generator).float() if width > 1 else torch.randn(rows, 1)
        x[0] = torch.randn(width, generator=generator)
        if rows > 1:
            x[1] = float("-inf")
            x[2] = -0.0
            x[2, width // 2] = 0.0
            x[3, width - 1] = float("nan")
            x[3, width // 3] = float("nan")
        assert torch.equal(cpu_ops.argmax(x), x.argmax(dim=-1))


FLOAT_MAX = torch.finfo(torch.float32).max


def _int8_head_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What an int8 KV cache stores for fp32 head rows (..., head_dim), in torch: +-inf saturated at
    +-FLOAT_MAX, top = the largest |v| but NaN, q = round((v * boost) * (127 / (top * boost))) half to even
    (boost 2^64 where top < 2^-120, else 1: 127 / top would overflow) and -128 for a NaN, scale top / 127,
    one step down where 127 times it is inf, and NaN where the row holds a NaN."""
    finite = rows.clamp(-FLOAT_MAX, FLOAT_MAX)  # keeps NaN
    magnitude = finite.abs()
    top = torch.where(magnitude.isnan(), 0.0, magnitude).amax(-1)
    boost = torch.where(top < 2.0 ** -120, 2.0 ** 64, 1.0)
    most = torch.full_like(top, 127.0)
    inverse = torch.where(top > 0, most / (top * boost), 0.0)
    q = torch.round(finite * boost.unsqueeze(-1) * inverse.unsqueeze(-1))
    q = torch.where(q.isnan(), -128.0, q).to(torch.int8)
    scale = top / most
    scale = torch.where((scale * most).isinf(), torch.nextafter(scale, torch.zeros_like(scale)), scale)
    return q, torch.where(rows.isnan().any(-1), float("nan"), scale)


def _special_rows(tokens: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Random K/V rows (tokens, kv_heads, head_dim), head rows holding NaN, +-inf, a max |v| near FLOAT_MAX,
    subnormal and tiny maxima, zeros, each at the row's start (vector lanes) and end (the scalar tail)."""
    generator = torch.Generator().manual_seed(head_dim)
    x = torch.randn(tokens, kv_heads, head_dim, generator=generator)
    heads = x.view(-1, head_dim)
    nan, inf = float("nan"), float("inf")
    heads[0, 0] = nan
    heads[1, -1] = nan
    heads[2, 1], heads[2, -1] = inf, -inf
    heads[3, 0], heads[3, -1] = -inf, nan
    heads[4] = -nan
    heads[5, -1] = FLOAT_MAX
    heads[6, 0] = -FLOAT_MAX
    heads[7] *= 1e-39  # a subnormal max: 127 / max overflows
    heads[8] *= 1e-37  # normal, still past 127 / FLOAT_MAX
    heads[9] *= 1e-36
    heads[10] = torch.randint(-1, 2, (head_dim,), generator=generator) * 1e-45  # the smallest subnormal
    heads[11] = 0.0
    heads[12, 2] = 1e6  # an outlier
    return x


def _stored(rows: torch.Tensor, cache_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V caches (one slot per token, the tokens in reverse) after the C write of rows as K and
    -rows as V, each read back as (tokens, kv_heads, cache row) in token order."""
    tokens, kv_heads, head_dim = rows.shape
    shape = cpu_ops.cache_shape(tokens, 1, kv_heads, head_dim, cache_dtype)
    caches = [torch.full(shape, 7, dtype=cache_dtype) for _ in range(2)]
    slots = torch.arange(tokens - 1, -1, -1)
    cpu_ops.store_kv(rows, -rows, *caches, slots)
    return tuple(cache.view(tokens, kv_heads, -1)[slots] for cache in caches)


@needs_cpu_ops
@pytest.mark.parametrize("kv_heads, head_dim", [(2, 16), (3, 20), (1, 5), (2, 64), (1, 36)])
def test_c_fp16_cache_writes_equal_the_torch_path_keeping_nan(kv_heads, head_dim):
    """The C fp16 KV write equals the torch path's (_cache_values: clamp at +-65504, then round) bit for bit
    on rows with NaN (which stays NaN, as in an fp32 cache, rather than becoming 65504 in the vector loop
    and NaN in the tail), +-inf and values past 65504 (saturated), fp16 subnormals and ordinary values, in
    the vector loop and the scalar tail alike."""
    from lcq.models.attention import _cache_values

    rows = _special_rows(16, kv_heads, head_dim)
    rows.view(-1)[::7] *= 1e-6  # fp16 subnormals
    for stored, values in zip(_stored(rows, torch.float16), (rows, -rows)):
        expected = _cache_values(values, torch.float16)
        assert torch.equal(stored.view(torch.int16), expected.view(torch.int16))
        assert torch.equal(stored.isnan(), values.isnan())
        heads = stored.view(-1, head_dim)
        assert not stored.isinf().any() and stored[~stored.isnan()].abs().max() == 65504.0
        assert heads[2, 1] == (65504.0 if values is rows else -65504.0) and heads[2, -1] == -heads[2, 1]


@needs_cpu_ops
@pytest.mark.parametrize("kv_heads, head_dim", [(2, 16), (3, 20), (1, 5), (2, 64), (1, 36)])
def test_c_int8_cache_writes_keep_nan_saturate_inf_and_stay_exact_for_tiny_rows(kv_heads, head_dim):
    """The C int8 KV write gives _int8_head_rows bit for bit, in the vector loop and the scalar tail: a head
    row holding a NaN gets a NaN scale, so it reads back as NaN, as from an fp32 cache (it was stored as a
    finite -128 * scale); +-inf saturate (q = +-127, the rest of the row as usual: it was NaN with an inf
    scale) and read back finite; a row whose max |v| is subnormal or below 2^-120 keeps the formula (every
    value was -128), so its bytes are those of the row times 2^64. Rows of zeros: scale 0."""
    rows = _special_rows(16, kv_heads, head_dim)
    heads = rows.view(-1, head_dim)
    for stored, values in zip(_stored(rows, torch.int8), (rows, -rows)):
        q = stored[..., :head_dim].reshape(-1, head_dim)
        scales = stored[..., head_dim:].contiguous().view(torch.float32).view(-1)
        expected_q, expected_scales = _int8_head_rows(values.view(-1, head_dim))
        assert torch.equal(q, expected_q)
        assert torch.equal(scales.view(torch.int32), expected_scales.view(torch.int32))
        read = q.float() * scales.unsqueeze(-1)
        has_nan = values.view(-1, head_dim).isnan().any(-1)
        assert read[has_nan].isnan().all() and torch.isfinite(read[~has_nan]).all()
        assert has_nan.tolist()[:5] == [True, True, False, True, True] and not has_nan[5:].any()
        assert q[2].tolist()[1] == (127 if values is rows else -127) and q[2].tolist()[-1] == -q[2].tolist()[1]
        assert q[5, -1].abs() == 127 and q[6, 0].abs() == 127  # FLOAT_MAX: 127 times the scale is finite
        assert heads[10].any() and (q[7:11].abs().amax(-1) == 127).all()
        assert scales[11] == 0 and not q[11].any()
    boosted = heads[7:10]
    assert torch.equal(_stored(boosted.unsqueeze(1), torch.int8)[0][:, 0, :head_dim],
                       _stored((boosted * 2.0 ** 64).unsqueeze(1), torch.int8)[0][:, 0, :head_dim])


def _assert_a_model_gone_nan_fails(folder: Path, engines: list[dict]) -> None:
    """The tiny Qwen2 in folder (full precision, or an LCQ checkpoint of it) with a NaN in its layer 1 K (one
    k_proj bias entry, set here: its first heads' attention outputs go NaN) ends a request with finish_reason
    "error" and no tokens (no token has a finite probability) in an engine made with each of `engines`."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from lcq.runtime import LLM
    from lcq.runtime.sampling_params import SamplingParams

    key = "model.layers.1.self_attn.k_proj.bias"
    for file in folder.glob("*.safetensors"):
        tensors = load_file(file)
        if key in tensors:
            with safe_open(file, "pt") as stored:
                metadata = stored.metadata()
            tensors[key][5] = float("nan")
            save_file(tensors, file, metadata=metadata)
            break
    else:
        raise AssertionError(f"no {key} in {folder}")
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for engine in engines:
        out = LLM(str(folder), block_size=8, **engine).generate(["Hello, world! How are you"], params)[0]
        assert (out.finish_reason, out.token_ids) == ("error", []), engine


@needs_cpu_ops
def test_a_model_gone_nan_fails_with_every_cpu_kv_cache_dtype(tmp_path, one_thread):
    """A tiny model whose K holds a NaN ends its request with an error with every CPU KV cache form: the fp16
    and int8 C writes kept the NaN finite (65504, -128 * scale), so those caches generated plausible tokens
    where fp32 failed."""
    from tests.tiny_model import make_tiny_hf

    _assert_a_model_gone_nan_fails(make_tiny_hf(tmp_path / "qwen2", "qwen2"), [
        dict(kv_cache_dtype=cache_dtype, cpu_matmul_dtype="float32") for cache_dtype in ("float32", "float16", "int8")])


@needs_cpu_ops
def test_an_lcq_model_gone_nan_fails_with_the_default_cpu_products(tmp_path, one_thread):
    """An LCQ model (W4 g64: its layers keep int8 books) whose K holds a NaN ends its request with an error
    with the default CPU products (int8 where the CPU has them) as with fp32 ones: its o_proj's input rows
    hold NaN in the first heads' values only, and int8 products had quantized them to finite bytes, so the
    model generated plausible tokens (until 2026-12-05)."""
    from tests.tiny_model import make_tiny_lcq

    folder = make_tiny_lcq(tmp_path, "qwen2", bits=4, rank=2, group_size=64, method="rtn")
    _assert_a_model_gone_nan_fails(folder, [dict(cpu_matmul_dtype="auto"), dict(cpu_matmul_dtype="float32")])
