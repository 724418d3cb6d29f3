"""Sliding-window attention (window W > 0: the query at position i sees the positions j with
i - W < j <= i), chunked attention (window -C < 0, Llama 4's: the positions j <= i of i's chunk,
j // C = i // C), Gemma 2's soft-capped scores (C > 0: each score s becomes C tanh(s / C) before the
softmax) and gpt-oss's attention sinks (one more key per head, of a learned score and value zero) in every
attention path, against a dense reference: each sequence's K/V gathered from the cache, the explicit mask,
torch.softmax, in float64.

Tolerances: fp32 arithmetic over fp32, fp16 or int8 caches (the reference takes the same cache
values, dequantized exactly) sums a few hundred products in another order: 1e-5, as the existing
attention tests. bf16 products (C prefill) round queries, keys, values and weights to 8 bits of
mantissa: 2e-2. Triton with fp16 queries and caches rounds the softmax weights to fp16 for the
second product: 2e-2.
"""
from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from lcq.kernels import cpu_ops
from lcq.kernels.cpu_matmul import cpu_products, products_available
from lcq.models.attention import PagedAttention
from tests.test_models import BLOCK, _int8_rows, _random_paged_context, needs_cpu_ops

KEYS = 32  # keys per chunk of the C prefill (cpu_prefill_attention.c) and per tile of the Triton kernels (BLOCK_N)

# W = 1; within one block of 4; not a multiple of the block size; past a key chunk (32) and not a multiple of
# it; past the first part (32 blocks of 4) of a long decode context; past every context (= full attention)
WINDOWS = pytest.mark.parametrize("window", [1, 3, 6, 33, 301, 1000])
CASES = pytest.mark.parametrize("new, cached", [
    ([1, 1, 1], [0, 6, 36]),  # decode
    ([1] * 9, [0, 3, 16, 17, 31, 2, 5, 40, -1]),  # 8+ sequences (C: whole cache rows), a padding sequence
    ([1, 1], [299, 700]),  # C: contexts in parts of 32 blocks, the window beginning inside the first's first block
    ([7, 1, 3], [0, 5, 9]),  # prefill: cached prefixes before chunks, a single new token
    ([50, 2, 1], [70, 100, 0]),  # several query tiles and key chunks
    ([45, 3], [200, 30]),  # long prefixes: C stages no chunk before the first new token's window
])
SHAPES = pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (8, 4, 256)])  # GQA; Gemma 3's heads

# The Triton kernels run interpreted on CPU tensors where there is no GPU, compiled on CUDA tensors where there is
# one: the cuda case is marked gpu, so that `-m gpu` (make test-gpu, bench/gpu_session.sh) selects it and
# conftest.py skips it without a GPU; the interpreter is not set up where there is one, so the cpu case is skipped.
_INTERPRETED = pytest.mark.skipif(torch.cuda.is_available(), reason="compiled on CUDA: the cuda case")
TRITON_DEVICES = pytest.mark.parametrize("device", [pytest.param("cpu", marks=_INTERPRETED),
                                                    pytest.param("cuda", marks=pytest.mark.gpu)])
TRITON_PATHS = [pytest.param("triton", marks=_INTERPRETED), pytest.param("triton-cuda", marks=pytest.mark.gpu)]


def _paged_caches(new, cached, kv_heads, head_dim, dtype, block_size=BLOCK):
    """_random_paged_context's context and caches; int8 caches (the C kernels' form) of random values and
    scales."""
    k_cache, v_cache, context = _random_paged_context(new, cached, kv_heads, head_dim,
                                                      torch.float32 if dtype == torch.int8 else dtype, block_size)
    if dtype == torch.int8:
        shape = cpu_ops.cache_shape(k_cache.shape[0], block_size, kv_heads, head_dim, torch.int8)
        k_cache, v_cache = (torch.randint(-127, 128, shape, dtype=torch.int8) for _ in range(2))
        for cache in (k_cache, v_cache):
            cache[..., head_dim:] = (torch.rand(*shape[:3], 1) * 0.02).view(torch.int8)  # values up to 2.5
    return k_cache, v_cache, context


def _values(cache: torch.Tensor) -> torch.Tensor:
    """The cache's values as float64 rows (slots, kv_heads, head_dim)."""
    if cache.dtype == torch.int8:
        values, scales = _int8_rows(cache)
        cache = values.double() * scales.double().unsqueeze(-1)
    return cache.double().flatten(0, 1)


def dense_attention(q, k_cache, v_cache, context, block_size, scale, window, softcap=0.0, sinks=None):
    """Attention of every new token over its sequence's gathered K/V, masked explicitly, with sinks (heads,)
    a column of each head's sink appended to its scores before the softmax and dropped after it (gpt-oss's
    eager_attention_forward); padding sequences (context length 0) zeros."""
    k_rows, v_rows = _values(k_cache), _values(v_cache)
    group = q.shape[1] // k_rows.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    starts = context.query_start.tolist()
    for i, length in enumerate(context.context_lens.tolist()):
        begin, end = starts[i], starts[i + 1]
        if length == 0:
            continue
        keys = torch.arange(length)
        slots = context.block_tables[i].long()[keys // block_size] * block_size + keys % block_size
        k, v = (rows[slots].repeat_interleave(group, 1) for rows in (k_rows, v_rows))  # (length, heads, d)
        positions = torch.arange(length - (end - begin), length).unsqueeze(1)
        beyond = (keys > positions - window) if window > 0 else (keys // -window == positions // -window) \
            if window < 0 else True
        seen = (keys <= positions) & beyond
        scores = torch.einsum("qhd,khd->hqk", q[begin:end].double(), k) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~seen, float("-inf"))
        if sinks is not None:
            scores = torch.cat([scores, sinks.double().view(-1, 1, 1).expand(-1, end - begin, 1)], -1)
        out[begin:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1)[..., :length], v)
    return out


def _sinks(heads: int) -> torch.Tensor:
    """Attention sinks that matter: random of std 2, one far above every score (8) and one far below (-30)."""
    sinks = torch.randn(heads) * 2
    sinks[0], sinks[-1] = 8.0, -30.0
    return sinks


def _zero_padding(out: torch.Tensor, context) -> torch.Tensor:
    """out with the rows of padding sequences zeroed (SDPA leaves them NaN)."""
    for i, length in enumerate(context.context_lens.tolist()):
        if length == 0:
            out[context.query_start[i]:context.query_start[i + 1]] = 0
    return out


def _check_paged_attention(monkeypatch, c_ops, new, cached, heads, kv_heads, head_dim, cache_dtype, window,
                           block_size=BLOCK, products=torch.float32, tolerance=1e-5, softcap=0.0, with_sinks=False):
    """PagedAttention.attend with fp32 queries, through the C kernels or the torch path, against the reference;
    with_sinks: with attention sinks (_sinks)."""
    monkeypatch.setattr(cpu_ops, "ENABLED", c_ops)
    k_cache, v_cache, context = _paged_caches(new, cached, kv_heads, head_dim, cache_dtype, block_size)
    q = torch.randn(sum(new), heads, head_dim)
    sinks = _sinks(heads) if with_sinks else None
    scale = head_dim ** -0.5
    paged = PagedAttention(context, block_size, torch.device("cpu"), torch.float32, cache_dtype)
    assert paged.use_cpu_ops == c_ops
    with cpu_products(products):
        out = paged.attend(q, k_cache, v_cache, scale, window=window, softcap=softcap, sinks=sinks)
    expected = dense_attention(q, k_cache, v_cache, context, block_size, scale, window, softcap, sinks).float()

    def assert_far_off(other: torch.Tensor) -> None:  # well past the tolerance (bf16 products' 2e-2: ten times)
        assert (_zero_padding(other.float(), context) - expected).abs().max() > min(100 * tolerance, 0.2)

    if softcap:  # the cap bends these scores (std about 1) enough that the uncapped product is far off
        assert_far_off(dense_attention(q, k_cache, v_cache, context, block_size, scale, window, sinks=sinks))
    if sinks is not None:  # and the sinks move the weights enough that leaving them out is far off
        assert_far_off(dense_attention(q, k_cache, v_cache, context, block_size, scale, window, softcap))
    torch.testing.assert_close(_zero_padding(out, context), expected, atol=tolerance, rtol=tolerance)


@WINDOWS
@CASES
@SHAPES
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_torch_path_window_matches_dense_reference(monkeypatch, new, cached, heads, kv_heads, head_dim, cache_dtype,
                                                   window):
    _check_paged_attention(monkeypatch, False, new, cached, heads, kv_heads, head_dim, cache_dtype, window)


@needs_cpu_ops
@WINDOWS
@CASES
@SHAPES
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize("block_size", [BLOCK, 16])  # blocks of 16: the C decode scores 8 rows at a time
@pytest.mark.usefixtures("both_cores")
def test_c_window_matches_dense_reference(monkeypatch, new, cached, heads, kv_heads, head_dim, cache_dtype, window,
                                          block_size):
    _check_paged_attention(monkeypatch, True, new, cached, heads, kv_heads, head_dim, cache_dtype, window,
                           block_size)


# Chunks of 1 (each query its own key); within a block of 4; not a multiple of the block size; past a key chunk
# of the C prefill (32) and not a multiple of it; past the first part of a long decode context; past every context
CHUNKS = pytest.mark.parametrize("chunk", [1, 6, 33, 301, 1000])


@CHUNKS
@CASES
@pytest.mark.parametrize("path, cache_dtype", [("torch", torch.float32), ("torch", torch.float16),
                                               *(("c", dtype) for dtype in (torch.float32, torch.int8)
                                                 if cpu_ops.usable())])
def test_chunked_attention_matches_dense_reference(monkeypatch, path, new, cached, cache_dtype, chunk):
    """Llama 4's chunked attention (window -chunk) in the torch path and the C kernels (decode, decode in
    parts past 32 blocks, prefill tiles), GQA."""
    _check_paged_attention(monkeypatch, path == "c", new, cached, 9, 3, 64, cache_dtype, -chunk)


@pytest.mark.parametrize("chunk", [1, 6, 33, 1000])
@pytest.mark.parametrize("new, cached", [([1, 1, 1], [0, 6, 36]), ([1, 1], [4, -1]), ([7, 1, 3], [0, 5, 9]),
                                         ([50, 2, 1], [70, 100, 0])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@TRITON_DEVICES
def test_triton_chunked_attention_matches_dense_reference(new, cached, dtype, chunk, device):
    """The Triton kernels with chunks (under the interpreter without a GPU), 4 query heads on 2 kv heads."""
    k_cache, v_cache, context = _paged_caches(new, cached, 2, 64, dtype)
    q = torch.randn(sum(new), 4, 64, dtype=dtype)
    out = _triton_attention(device, q, k_cache, v_cache, context, 0.125, -chunk)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    expected = dense_attention(q, k_cache, v_cache, context, BLOCK, 0.125, -chunk).to(dtype)
    torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)


@needs_cpu_ops
@pytest.mark.skipif(not products_available(torch.bfloat16), reason="bf16 products need AVX512_BF16 and the C kernels")
@pytest.mark.parametrize("window", [3, 33])
@pytest.mark.parametrize("new, cached", [([50, 2, 1], [70, 100, 0]), ([45, 3], [200, 30])])
@SHAPES
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])
def test_c_prefill_window_with_bf16_products(monkeypatch, new, cached, heads, kv_heads, head_dim, cache_dtype, window):
    _check_paged_attention(monkeypatch, True, new, cached, heads, kv_heads, head_dim, cache_dtype, window,
                           products=torch.bfloat16, tolerance=2e-2)


@needs_cpu_ops
@pytest.mark.skipif(not products_available(torch.bfloat16), reason="bf16 products need AVX512_BF16 and the C kernels")
@pytest.mark.parametrize("window, softcap, sinks", [(0, 0.0, False), (3, 0.0, False), (200, 0.0, True),
                                                    (0, 0.7, True), (150, 0.7, False)])
@pytest.mark.parametrize("new, cached", [([130, 2, 1], [500, 40, 9]), ([600], [0])])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])
def test_c_prefill_long_chunks_with_bf16_products(monkeypatch, new, cached, cache_dtype, window, softcap, sinks):
    """Contexts of 512 tokens or more take chunks of 128 keys and tiles of 96 query rows with bf16 products:
    windows that begin inside a chunk or skip whole ones, capped scores and sinks, as in the dense reference."""
    _check_paged_attention(monkeypatch, True, new, cached, 9, 3, 64, cache_dtype, window, products=torch.bfloat16,
                           tolerance=2e-2, softcap=softcap, with_sinks=sinks)


@pytest.mark.parametrize("window", [1, 6, 33, 1000])
@pytest.mark.parametrize("new, cached", [
    ([1, 1, 1], [0, 6, 36]), ([1, 1], [4, -1]),  # decode, with a padding sequence
    ([7, 1, 3], [0, 5, 9]), ([50, 2, 1], [70, 100, 0])])  # prefill: prefixes; several query and key tiles
@pytest.mark.parametrize("head_dim", [64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # the interpreter's bf16 tl.dot is wrong
@TRITON_DEVICES
def test_triton_window_matches_dense_reference(new, cached, head_dim, dtype, window, device):
    """The Triton kernels (under the interpreter without a GPU: conftest.py), 4 query heads on 2 kv heads."""
    k_cache, v_cache, context = _paged_caches(new, cached, 2, head_dim, dtype)
    q = torch.randn(sum(new), 4, head_dim, dtype=dtype)
    scale = head_dim ** -0.5
    out = _triton_attention(device, q, k_cache, v_cache, context, scale, window)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    expected = dense_attention(q, k_cache, v_cache, context, BLOCK, scale, window).to(dtype)
    torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)


SOFTCAP_CASES = pytest.mark.parametrize("new, cached", [
    ([1, 1, 1], [0, 6, 36]), ([1] * 9, [0, 3, 16, 17, 31, 2, 5, 40, -1]), ([1, 1], [299, 700]),  # decode forms
    ([7, 1, 3], [0, 5, 9]), ([50, 2, 1], [70, 100, 0])])  # prefill


@pytest.mark.parametrize("path", ["torch", "c"] if cpu_ops.usable() else ["torch"])
@pytest.mark.parametrize("window", [0, 6])
@SOFTCAP_CASES
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])
def test_softcapped_scores_match_dense_reference(monkeypatch, path, new, cached, cache_dtype, window):
    """Gemma 2's cap (0.7 here, so that it bends scores of std about 1) in the torch path (the product
    written out, SDPA has no cap) and the C kernels (decode, prefill tiles, decode in parts), with and
    without a window, 9 query heads on 3 kv heads."""
    if path == "torch" and cache_dtype == torch.int8:
        pytest.skip("an int8 cache needs the C attention")
    _check_paged_attention(monkeypatch, path == "c", new, cached, 9, 3, 64, cache_dtype, window, softcap=0.7)


@pytest.mark.parametrize("window", [0, 6])
@SOFTCAP_CASES
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@TRITON_DEVICES
def test_triton_softcapped_scores_match_dense_reference(new, cached, dtype, window, device):
    k_cache, v_cache, context = _paged_caches(new, cached, 2, 64, dtype)
    q = torch.randn(sum(new), 4, 64, dtype=dtype)
    out = _triton_attention(device, q, k_cache, v_cache, context, 0.125, window, softcap=0.7)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    expected = dense_attention(q, k_cache, v_cache, context, BLOCK, 0.125, window, softcap=0.7).to(dtype)
    torch.testing.assert_close(_zero_padding(out, context), expected, atol=tolerance, rtol=tolerance)


SINK_CASES = pytest.mark.parametrize("new, cached", [
    ([1, 1, 1], [0, 6, 36]), ([1] * 9, [0, 3, 16, 17, 31, 2, 5, 40, -1]),  # decode, whole rows and a padding sequence
    ([1, 1], [299, 700]),  # C: decode in parts, the sink added once where they are combined
    ([7, 1, 3], [0, 5, 9]), ([50, 2, 1], [70, 100, 0]), ([45, 3], [200, 30])])  # prefill after cached prefixes


@pytest.mark.parametrize("path", ["torch", "c"] if cpu_ops.usable() else ["torch"])
@pytest.mark.parametrize("window, softcap", [(0, 0.0), (6, 0.0), (301, 0.0), (0, 0.7), (6, 0.7)])
@SINK_CASES
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])
def test_attention_sinks_match_dense_reference(monkeypatch, path, new, cached, cache_dtype, window, softcap):
    """gpt-oss's sinks in the torch path (the product written out, the sink one more column) and the C kernels
    (decode, decode in parts, prefill tiles and single new tokens), with and without a window and a cap,
    9 query heads on 3 kv heads."""
    if path == "torch" and cache_dtype == torch.int8:
        pytest.skip("an int8 cache needs the C attention")
    _check_paged_attention(monkeypatch, path == "c", new, cached, 9, 3, 64, cache_dtype, window, softcap=softcap,
                           with_sinks=True)


@pytest.mark.parametrize("window, softcap", [(0, 0.0), (6, 0.0), (6, 0.7)])
@pytest.mark.parametrize("new, cached", [([1, 1, 1], [0, 6, 36]), ([1, 1], [4, -1]),  # decode, a padding sequence
                                         ([7, 1, 3], [0, 5, 9]), ([50, 2, 1], [70, 100, 0])])  # prefill
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@TRITON_DEVICES
def test_triton_attention_sinks_match_dense_reference(new, cached, dtype, window, softcap, device):
    k_cache, v_cache, context = _paged_caches(new, cached, 2, 64, dtype)
    q = torch.randn(sum(new), 4, 64, dtype=dtype)
    sinks = _sinks(4)
    out = _triton_attention(device, q, k_cache, v_cache, context, 0.125, window, softcap, sinks)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    expected = dense_attention(q, k_cache, v_cache, context, BLOCK, 0.125, window, softcap, sinks).to(dtype)
    torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("path", (["torch", "c"] if cpu_ops.usable() else ["torch"]) + TRITON_PATHS)
def test_attention_sinks_match_transformers_gpt_oss(monkeypatch, path):
    """A prompt of 40 tokens, 6 query heads on 2 kv heads, through PagedAttention (or the Triton kernels) against
    transformers' own gpt-oss attention with a causal mask."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    monkeypatch.setattr(cpu_ops, "ENABLED", path == "c")
    length, heads, kv_heads, head_dim, scale = 40, 6, 2, 32, 32 ** -0.5
    k_cache, v_cache, context = _paged_caches([length], [0], kv_heads, head_dim, torch.float32)
    q, k, v = torch.randn(length, heads, head_dim), *torch.randn(2, length, kv_heads, head_dim)
    sinks = _sinks(heads)
    paged = PagedAttention(context, BLOCK, torch.device("cpu"), torch.float32)
    paged.write(k, v, k_cache, v_cache)
    if path.startswith("triton"):
        out = _triton_attention(_triton_device(path), q, k_cache, v_cache, context, scale, 0, sinks=sinks)
    else:
        out = paged.attend(q, k_cache, v_cache, scale, sinks=sinks)
    module = types.SimpleNamespace(sinks=sinks, num_key_value_groups=heads // kv_heads, training=False)
    causal = torch.full((length, length), float("-inf")).triu(1).view(1, 1, length, length)
    expected, _ = eager_attention_forward(module, *(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), causal, scale)
    torch.testing.assert_close(out, expected[0], atol=1e-5, rtol=1e-5)


def _poisoned(cache: torch.Tensor, context, block_size: int, bound) -> torch.Tensor:
    """A copy of the cache with NaN in the rows of each sequence's positions before bound(i, length, n)
    (an int8 cache: in their scales)."""
    cache = cache.clone()
    rows = (cache[..., -cpu_ops.INT8_SCALE_BYTES:].view(torch.float32) if cache.dtype == torch.int8 else cache)
    starts = context.query_start.tolist()
    for i, length in enumerate(context.context_lens.tolist()):
        for j in range(bound(length, starts[i + 1] - starts[i])):
            rows[context.block_tables[i, j // block_size], j % block_size] = float("nan")
    return cache


@pytest.mark.parametrize("path", ["torch", "c"] if cpu_ops.usable() else ["torch"])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize("new, cached, window", [
    ([1, 1, 1], [37, 8, 100], 6), ([1] * 9, [35, 3, 16, 17, 31, 2, 5, 40, 60], 5),  # windows inside blocks
    ([1, 1], [299, 700], 301),  # in parts
    ([40, 1, 3], [100, 50, 70], 33)])  # prefill
def test_rows_before_the_window_are_not_read(monkeypatch, path, cache_dtype, new, cached, window):
    """NaN in every cache row before a decode query's window leaves its output finite and equal to the
    reference: the decode kernels start at the window, even inside a block of 16. Prefill reads from the
    first new token's window on (the C kernel from the chunk of 32 keys where it begins), so NaN before
    that chunk changes nothing either."""
    if path == "torch" and cache_dtype == torch.int8:
        pytest.skip("an int8 cache needs the C attention")
    monkeypatch.setattr(cpu_ops, "ENABLED", path == "c")
    k_cache, v_cache, context = _paged_caches(new, cached, 2, 64, cache_dtype, 16)
    q = torch.randn(sum(new), 6, 64)
    expected = dense_attention(q, k_cache, v_cache, context, 16, 0.125, window).float()

    def bound(length, n):
        first = max(0, length - n - window + 1)
        return first if n == 1 else first // KEYS * KEYS

    paged = PagedAttention(context, 16, torch.device("cpu"), torch.float32, cache_dtype)
    out = paged.attend(q, *(_poisoned(cache, context, 16, bound) for cache in (k_cache, v_cache)), 0.125,
                       window=window)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("new, cached, window", [([1, 1], [37, 100], 6), ([40, 3], [100, 70], 33)])
@TRITON_DEVICES
def test_triton_reads_from_the_window_tile(new, cached, window, device):
    """The Triton kernels: decode loads only the window (the rows before it in its first tile are masked
    loads), prefill from the tile of 32 where its first query's window begins."""
    k_cache, v_cache, context = _paged_caches(new, cached, 2, 64, torch.float32)
    q = torch.randn(sum(new), 4, 64)
    expected = dense_attention(q, k_cache, v_cache, context, BLOCK, 0.125, window).float()

    def bound(length, n):
        first = max(0, length - n - window + 1)
        return first if n == 1 else first // KEYS * KEYS

    k_cache, v_cache = (_poisoned(cache, context, BLOCK, bound) for cache in (k_cache, v_cache))
    out = _triton_attention(device, q, k_cache, v_cache, context, 0.125, window)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _triton_device(path: str) -> str:
    return "cuda" if path == "triton-cuda" else "cpu"


def _triton_attention(device: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context,
                      scale: float, window: int, softcap: float = 0.0, sinks: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """The step's Triton attention on `device`: compiled on "cuda" (the gpu-marked cases, which `make test-gpu`
    and bench/gpu_session.sh run), interpreted on "cpu" (without a GPU); the output on the CPU."""
    from lcq.kernels.paged_attention import decode_attention, prefill_attention

    q, k_cache, v_cache = (t.to(device) for t in (q, k_cache, v_cache))
    sinks = None if sinks is None else sinks.to(device)
    c = dataclasses.replace(context, **{name: getattr(context, name).to(device) for name in
                                        ("slot_mapping", "query_start", "context_lens", "block_tables")})
    if c.is_prefill:
        out = prefill_attention(q, k_cache, v_cache, c.block_tables, c.context_lens, c.query_start, c.max_query_len,
                                scale, window, softcap, sinks)
    else:
        out = decode_attention(q, k_cache, v_cache, c.block_tables, c.context_lens, scale, window, softcap, sinks)
    return out.cpu()


def _handed_back(context, block_size: int, window: int):
    """The context with -1 for every table entry that a sliding-window layer group has handed back by this
    step (BlockManager.first_kept of the sequence's first new token), as the runtime passes it."""
    from lcq.runtime.block_manager import BlockManager

    manager = BlockManager(1, block_size, enable_prefix_caching=False, windows=(window,))
    tables = context.block_tables.clone()
    starts = context.query_start.tolist()
    for i, length in enumerate(context.context_lens.tolist()):
        tables[i, :manager.first_kept(0, max(length - (starts[i + 1] - starts[i]), 0))] = -1
    return dataclasses.replace(context, block_tables=tables)


@pytest.mark.parametrize("path", (["torch", "c"] if cpu_ops.usable() else ["torch"]) + TRITON_PATHS)
@pytest.mark.parametrize("new, cached, window", [
    ([1, 1, 1], [37, 8, 100], 6), ([1] * 9, [35, 3, 16, 17, 31, 2, 5, 40, 60], 5), ([1, 1], [299, 700], 301),
    ([40, 1, 3], [100, 50, 70], 33), ([50, 2], [70, 100], 8)])
def test_handed_back_blocks_are_never_read(monkeypatch, path, new, cached, window):
    """Block tables with -1 where a sliding-window group has handed blocks back (lcq/runtime/block_manager.py:
    before the key tile where the first new token's window begins) give the reference's output on every path:
    no kernel reads those entries."""
    monkeypatch.setattr(cpu_ops, "ENABLED", path == "c")
    k_cache, v_cache, context = _paged_caches(new, cached, 2, 64, torch.float32, 16)
    q = torch.randn(sum(new), 6, 64)
    expected = dense_attention(q, k_cache, v_cache, context, 16, 0.125, window).float()
    released = _handed_back(context, 16, window)
    assert bool((released.block_tables == -1).any())
    if path.startswith("triton"):
        out = _triton_attention(_triton_device(path), q, k_cache, v_cache, released, 0.125, window)
    else:
        out = PagedAttention(released, 16, torch.device("cpu"), torch.float32).attend(q, k_cache, v_cache, 0.125,
                                                                                        window=window)
    torch.testing.assert_close(_zero_padding(out, context), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not cpu_ops.usable(), reason="the C kernels do not build here")
@pytest.mark.parametrize("new, cached, window", [([1, 1, 1], [37, 8, 100], 6), ([40, 1, 3], [100, 50, 70], 33),
                                                 ([1, 1], [299, 700], 0)])
def test_c_attention_refuses_tables_without_a_block_it_would_read(monkeypatch, new, cached, window):
    """A table entry inside what a step reads holding -1 (a bug upstream: the block manager hands back only
    blocks before the window's key tile) makes the C kernels raise instead of reading memory outside the
    cache, in decode steps and prefill; so does a context longer than the table's row."""
    monkeypatch.setattr(cpu_ops, "ENABLED", True)
    k_cache, v_cache, context = _paged_caches(new, cached, 2, 64, torch.float32, 16)
    q = torch.randn(sum(new), 6, 64)
    released = _handed_back(context, 16, window) if window else context
    broken = released.block_tables.clone()
    last = context.context_lens[-1].item() - 1
    broken[-1, last // 16] = -1  # the block of the last sequence's newest token
    for tables in (broken, broken[:, :last // 16]):
        attention = PagedAttention(dataclasses.replace(released, block_tables=tables.contiguous()), 16,
                                   torch.device("cpu"), torch.float32)
        with pytest.raises(RuntimeError, match="a block table entry the attention would read holds no block"):
            attention.attend(q, k_cache, v_cache, 0.125, window=window)
