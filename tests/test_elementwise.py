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
