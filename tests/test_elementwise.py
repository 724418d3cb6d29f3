"""The CUDA decoder's one-kernel steps (lcq.kernels.elementwise) against the torch expressions of
lcq.models.layers they replace: under TRITON_INTERPRET=1 on CPU tensors here, compiled on a GPU (-m gpu).

Tolerance: the kernels round to the activation dtype where torch does, and only their fp32 arithmetic
may be contracted or summed in another order, so a value rounded to the dtype can land one unit of it
apart. The rotary embedding and the activation round once: torch.testing's defaults (rtol 1e-3 for fp16,
1.6e-2 for bf16, 1.3e-6 for fp32). The norm rounds twice, the normalised value and then its product with
the weight (up to 1.5 here), so up to ~3 units, and one more for the interpreter's bf16 (below): rtol 4 eps
of the dtype (1e-5 in fp32). The residual stream,
a single add either way, must be equal, but for one thing: the interpreter (Triton 3.6 to 3.9) truncates
fp32 to bf16 where a GPU rounds to nearest, which costs its bf16 results one more unit (the GPU test
below holds the stream to equality in bf16 too).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lcq.models.layers import RMSNorm, apply_rotary, mlp_activation

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# Each kernel interpreted on CPU tensors where there is no GPU, compiled on CUDA tensors where there is one: the cuda
# case is marked gpu, so that `-m gpu` (make test-gpu, bench/gpu_session.sh) selects it and conftest.py skips it
# without a GPU; the interpreter is not set up where there is one (conftest.py), so the cpu case is skipped there.
DEVICES = pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="compiled on CUDA: the cuda case")),
    pytest.param("cuda", marks=pytest.mark.gpu)])


def _rows(rows: int, width: int, dtype: torch.dtype, device: str, pad: int = 0) -> torch.Tensor:
    """Random rows, each `pad` values short of its stride (a view into a wider tensor)."""
    return torch.randn(rows, width + pad, dtype=torch.float32).to(dtype).to(device)[:, :width]


def _norm_tolerance(dtype: torch.dtype) -> dict:
    eps = torch.finfo(dtype).eps
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=4 * eps, atol=eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [96, 100])
@pytest.mark.parametrize("with_residual", [False, True])
@DEVICES
def test_add_rms_norm(dtype, width, with_residual, device, one_thread):
    from lcq.kernels.elementwise import add_rms_norm

    torch.manual_seed(width)
    norm = RMSNorm(width, 1e-5, dtype)
    norm.weight.data = (torch.rand(width) + 0.5).to(dtype)
    x = _rows(5, width, dtype, device, pad=7)
    residual = _rows(5, width, dtype, device) if with_residual else None
    expected, stream = norm(x.cpu(), None if residual is None else residual.cpu().clone())
    got, got_stream = add_rms_norm(x, norm.weight.to(device), norm.eps, residual)
    torch.testing.assert_close(got.cpu(), expected, **_norm_tolerance(dtype))
    if dtype == torch.bfloat16 and device == "cpu":
        torch.testing.assert_close(got_stream, stream, rtol=torch.finfo(dtype).eps, atol=0)
    else:
        assert torch.equal(got_stream.cpu(), stream)
    if with_residual:  # the stream is written into residual, as the C path does
        assert got_stream.data_ptr() == residual.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("pairs", [8, 3])  # the whole head, or a partial rotary embedding of 6 of its 16
@DEVICES
def test_rotary(dtype, interleaved, pairs, device, one_thread):
    from lcq.kernels.elementwise import rotary_

    heads, kv_heads, head_dim, tokens = 4, 2, 16, 5
    torch.manual_seed(pairs)
    angles = torch.rand(tokens, 1, pairs) * 6
    cos, sin = angles.cos(), angles.sin()
    qkv = _rows(tokens, (heads + 2 * kv_heads) * head_dim, dtype, device, pad=16)
    source = qkv.cpu().clone()
    rotary_(qkv, heads + kv_heads, head_dim, cos.to(device), sin.to(device), interleaved)
    q, k, v = source.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    expected = torch.cat([apply_rotary(q.reshape(tokens, heads, head_dim), cos, sin, interleaved).flatten(1),
                          apply_rotary(k.reshape(tokens, kv_heads, head_dim), cos, sin, interleaved).flatten(1),
                          v], dim=-1)
    torch.testing.assert_close(qkv.cpu(), expected)
    assert torch.equal(qkv.cpu()[:, (heads + kv_heads) * head_dim:], v)  # values untouched


@pytest.mark.parametrize("dtype, cache_dtype", [(torch.float32, None), (torch.float16, None), (torch.bfloat16, None),
                                                (torch.float16, torch.float8_e4m3fn)])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("pairs", [8, 3])
@DEVICES
def test_rotary_and_cache_write_in_one_kernel(dtype, cache_dtype, interleaved, pairs, device, one_thread):
    """rotary_store_kv leaves qkv and the caches exactly as rotary_ then store_kv do: queries and keys rotated in
    place, the rotated keys and the values in their slots (an fp8 cache clamped and rounded alike), slot -1 skipped."""
    from lcq.kernels.elementwise import rotary_
    from lcq.kernels.paged_attention import rotary_store_kv, store_kv

    if cache_dtype is not None and device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 e4m3 needs compute capability 8.9 or later")
    heads, kv_heads, head_dim, tokens = 4, 2, 16, 5
    torch.manual_seed(pairs)
    angles = torch.rand(tokens, 1, pairs) * 6
    cos, sin = angles.cos().to(device), angles.sin().to(device)
    qkv = _rows(tokens, (heads + 2 * kv_heads) * head_dim, dtype, device, pad=16) * 200  # beyond fp8's 448 too
    slots = torch.tensor([3, -1, 0, 7, 5], device=device)
    results = []
    for fused in (False, True):
        rows = qkv.clone()
        caches = [torch.zeros(2, 4, kv_heads, head_dim, dtype=cache_dtype or dtype, device=device) for _ in range(2)]
        if fused:
            rotary_store_kv(rows, heads, kv_heads, head_dim, cos, sin, interleaved, *caches, slots)
        else:
            rotary_(rows, heads + kv_heads, head_dim, cos, sin, interleaved)
            k, v = rows[:, heads * head_dim:].unflatten(1, (2 * kv_heads, head_dim)).split(kv_heads, dim=1)
            store_kv(k, v, *caches, slots)
        results.append([rows.cpu(), *(cache.cpu().view(torch.uint8) for cache in caches)])
    for unfused, fused in zip(*results):
        assert torch.equal(unfused, fused)
    assert results[1][1].view(-1, kv_heads * head_dim * (cache_dtype or dtype).itemsize)[[1, 2, 4, 6]].eq(0).all()


def test_rotary_and_cache_write_compiles_for_hopper():
    """The fused kernel's sm_90 build (no GPU; the installed Triton, without the interpreter): its barrier between
    the rotation's stores and the store's loads, and the fp8 clamp's NaN-propagating min and max."""
    code = """if True:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from lcq.kernels.paged_attention import _rotary_store_kv_kernel as fn
        types = dict(qkv_ptr="*fp16", cos_ptr="*fp32", sin_ptr="*fp32", k_cache_ptr="*fp8e4nv",
                     v_cache_ptr="*fp8e4nv", slot_ptr="*i64", stride_t="i32", stride_c="i32", heads="i32")
        constants = dict(KEYS_AT=4096, HEAD_DIM=128, PAIRS=64, INTERLEAVED=False, BLOCK_H=64, BLOCK_P=64, ROW=1024,
                         BLOCK=1024, LIMIT=448.0, PDL=True)
        source = ASTSource(fn=fn, signature={n: types.get(n, "constexpr") for n in fn.arg_names},
                           constexprs={(fn.arg_names.index(n),): v for n, v in constants.items()})
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                             options={"launch_pdl": True, "num_warps": 16}).asm["ptx"]
        print(ptx.count("bar.sync"), ptx.count("max.NaN"), ptx.count("min.NaN"))"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    barriers, maxima, minima = map(int, result.stdout.split()[-3:])
    assert barriers > 0 and maxima > 0 and minima > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("width", [80, 1100])  # one block with a masked tail; two blocks
@DEVICES
def test_gated_activation(dtype, activation, width, device, one_thread):
    from lcq.kernels.elementwise import gated_activation

    torch.manual_seed(width)
    gate_up = _rows(3, 2 * width, dtype, device, pad=5) * 3
    expected = mlp_activation(gate_up.cpu(), activation)
    torch.testing.assert_close(gated_activation(gate_up, activation).cpu(), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layers_dispatch_cuda_rows_to_the_kernels(dtype):
    """The model's building blocks on CUDA rows go through the kernels and give the CPU's torch results."""
    torch.manual_seed(0)
    width = 4096
    norm = RMSNorm(width, 1e-6, dtype)
    x, residual = torch.randn(3, width).to(dtype), torch.randn(3, width).to(dtype)
    expected = norm(x, residual.clone())
    got = norm.cuda()(x.cuda(), residual.cuda())
    torch.testing.assert_close(got[0].cpu(), expected[0], **_norm_tolerance(dtype))
    assert torch.equal(got[1].cpu(), expected[1])
    gate_up = torch.randn(3, 2 * 11008).to(dtype)
    torch.testing.assert_close(mlp_activation(gate_up.cuda(), "silu").cpu(), mlp_activation(gate_up, "silu"))
