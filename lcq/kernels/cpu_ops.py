"""The small operations of a CPU step in one C call each (cpu_ops.c), sampling (cpu_sample.c), paged
attention (cpu_decode_attention.c, cpu_prefill_attention.c) and the one-call decode step (cpu_decode_step.c).

torch spends 5-15 us dispatching each tiny operation on a CPU, and RMSNorm, rotary embedding and
SwiGLU are several operations apiece, run 61, 30 and 30 times per token of a 30-layer model;
attention gathered every cached K/V row into a new tensor before it could call SDPA, per sequence
in prefill. The C versions do one pass each and attention reads the paged cache in place. Used for
fp32 CPU tensors (KV caches fp32, fp16 or int8: cache_shape) where the library builds (native.py);
LCQ_CPU_OPS=0 keeps the torch path everywhere.
"""
from __future__ import annotations

import ctypes
import functools
import os
from typing import Callable

import torch

from . import native



# LCQ_CPU_OPS=0 keeps the torch path (read at import; tests switch ENABLED itself).
ENABLED = os.environ.get("LCQ_CPU_OPS", "1") != "0"


def usable(*tensors: torch.Tensor | None) -> bool:
    """True when the C ops run here and every given tensor is an fp32 CPU tensor. Called several
    times per layer and token, so kept to attribute reads; the tensors are checked first, so that
    GPU tensors (the sampler's logits on a GPU) never build the library."""
    for t in tensors:
        if t is not None and (t.dtype is not torch.float32 or not t.is_cpu):
            return False
    return ENABLED and library() is not None


def norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
         bias: torch.Tensor | None = None, centred: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * norm(s), s) for s = x, or s = residual + x written into residual: an RMSNorm, or where centred a
    LayerNorm (plus bias, where given)."""
    x = x.contiguous()
    if residual is not None and not residual.is_contiguous():
        raise ValueError("norm updates the residual in place: it must be contiguous")
    out = torch.empty_like(x)
    library().lcq_norm(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(),
                       None if bias is None else bias.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1],
                       x.shape[-1], eps, int(centred))
    return out, x if residual is None else residual


def head_norm_(x: torch.Tensor, heads: int, head_dim: int, weight: torch.Tensor, eps: float, weight_stride: int = 0,
               centred: bool = False) -> None:
    """RMS-normalise (or where centred, LayerNorm), in place, each of the first `heads` heads of every row of x
    (tokens, width) by `weight`: head_dim values for every head, or (weight_stride head_dim) one row per head
    (Command R+'s): Qwen3's q and k norms on the fused projection."""
    if x.stride(-1) != 1 or not weight.is_contiguous() or heads * head_dim > x.shape[-1] or \
            weight.numel() < (heads - 1) * weight_stride + head_dim:
        raise ValueError("head_norm_ needs unit-stride rows holding the heads and a contiguous weight for each")
    library().lcq_head_norm(x.data_ptr(), x.shape[0], x.stride(0), heads, head_dim, weight.data_ptr(), weight_stride,
                            eps, int(centred))


def rotary_(x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor,
            interleaved: bool = False) -> None:
    """Rotate, in place, the first `heads` heads of every row of x (tokens, width): pairs (i, i + r/2), or
    interleaved (2i, 2i + 1), of each head's first r dimensions; cos and sin hold (tokens, r / 2) values (r =
    head_dim, or fewer: a partial rotary embedding)."""
    if x.stride(-1) != 1 or not (cos.is_contiguous() and sin.is_contiguous()) or heads * head_dim > x.shape[-1] or \
            2 * cos.shape[-1] > head_dim:
        raise ValueError("rotary_ needs unit-stride rows holding the heads and contiguous cos/sin tables")
    library().lcq_rotary(x.data_ptr(), x.shape[0], x.stride(0), heads, head_dim, 2 * cos.shape[-1], cos.data_ptr(),
                         sin.data_ptr(), None, int(interleaved))


ACTIVATIONS = ("silu", "gelu_tanh", "swiglu_oai")  # gated activations of the C MLP (ModelConfig.activation), in
# cpu_exp.h's order
UNGATED = ("relu2", "xielu")  # and those without a gate, after them


def gated_mul(gate_up: torch.Tensor, activation: str, factors: torch.Tensor | None = None) -> torch.Tensor:
    """act(gate) * up for gate_up (..., 2 * width) = [gate, up]: SwiGLU (silu), Gemma's GeGLU (gelu_tanh,
    torch's gelu with approximate="tanh"), or gpt-oss's clamped SwiGLU (swiglu_oai, factors (alpha, limit) fp32:
    layers.mlp_activation)."""
    if activation == "swiglu_oai" and (factors is None or factors.numel() != 2 or factors.dtype != torch.float32):
        raise ValueError("swiglu_oai needs its two fp32 factors, alpha and limit")
    gate_up = gate_up.contiguous()
    width = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], width)
    library().lcq_gated_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // gate_up.shape[-1], width,
                            ACTIVATIONS.index(activation), None if factors is None else factors.contiguous().data_ptr())
    return out


def ungated(x: torch.Tensor, activation: str, factors: torch.Tensor | None = None) -> torch.Tensor:
    """act(x) of an MLP without a gate: relu(x)^2 (relu2), or xIELU (xielu) with its factors (alpha_p, alpha_n,
    beta, eps; fp32), as layers.mlp_activation and layers.xielu write them (lcq_ungated)."""
    x = x.contiguous()
    if activation == "xielu" and (factors is None or factors.numel() != 4 or factors.dtype != torch.float32):
        raise ValueError("xielu needs its four fp32 factors")
    out = torch.empty_like(x)
    library().lcq_ungated(x.data_ptr(), out.data_ptr(), x.numel() // max(x.shape[-1], 1), x.shape[-1],
                          len(ACTIVATIONS) + UNGATED.index(activation),
                          None if factors is None else factors.contiguous().data_ptr())
    return out


def sigmoid_gate_(x: torch.Tensor, gate: torch.Tensor) -> None:
    """x (rows, heads, head_dim) *= sigmoid(gate) in place, gate of x's shape with unit-stride heads (Qwen3.5's
    attention output gate, a view of q_proj's output)."""
    if not x.is_contiguous() or gate.shape != x.shape or gate.stride(-1) != 1:
        raise ValueError("sigmoid_gate_ needs a contiguous x and a gate of its shape with unit-stride heads")
    library().lcq_sigmoid_gate(x.data_ptr(), gate.data_ptr(), x.shape[0], x.shape[1], x.shape[2], gate.stride(0),
                               gate.stride(1))


CACHE_DTYPES = (torch.float32, torch.float16, torch.int8)  # the KV cache forms the C attention reads, in
# cpu_cache.h's order; only the C kernels read int8 caches
NO_BLOCK = -3  # LCQ_NO_BLOCK (cpu_cache.h): a block table entry the attention would read holds no block


def check_blocks(status: int, kernel: str) -> None:
    """RuntimeError where a C attention kernel refused to read a block table entry that holds no block
    (one a sliding-window group handed back, or past the table's row): a bug in the tables, caught
    before it reads memory outside the cache."""
    if status == NO_BLOCK:
        raise RuntimeError(f"{kernel}: a block table entry the attention would read holds no block")


HALF_WEIGHT, INDEX_WEIGHT = 0, 1  # kinds of linear weight in lcq_decode_layers' table (cpu_decode_step.c)
INT8_SCALE_BYTES = 4  # an int8 cache's head row: head_dim values, then their fp32 scale


def cache_shape(blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> tuple[int, ...]:
    """The shape of a K or V cache: (blocks, block_size, kv_heads, head row), a head row being head_dim
    values, and for int8 their scale's 4 bytes after them (cpu_cache.h)."""
    return blocks, block_size, kv_heads, head_dim + (INT8_SCALE_BYTES if dtype == torch.int8 else 0)


def cache_form(k_cache: torch.Tensor, v_cache: torch.Tensor) -> int:
    """The C functions' cache form (cpu_cache.h) of two CPU caches of one dtype; others are refused."""
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in CACHE_DTYPES or not k_cache.is_cpu:
        raise ValueError(f"the C attention takes fp32, fp16 or int8 CPU caches, got {k_cache.dtype}")
    return CACHE_DTYPES.index(k_cache.dtype)


def cache_head_dim(cache: torch.Tensor) -> int:
    """head_dim of a cache of cache_shape."""
    return cache.shape[3] - (INT8_SCALE_BYTES if cache.dtype == torch.int8 else 0)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k, v (tokens, kv_heads, head_dim), rows of one stride, into cache slots (int64; -1 skipped);
    an fp16 cache gets the rows rounded to nearest, an int8 one each head row quantized with its scale
    (max |v| / 127)."""
    rows_ok = all(t.stride(2) == 1 and t.stride(1) == t.shape[2] for t in (k, v)) and k.stride(0) == v.stride(0)
    shape_ok = k_cache.shape[2] == k.shape[1] and cache_head_dim(k_cache) == k.shape[2]
    if not (rows_ok and shape_ok and k_cache.is_contiguous() and v_cache.is_contiguous()
            and slots.dtype == torch.int64):
        raise ValueError("store_kv needs packed K/V rows of one stride and the caches' head shape, contiguous "
                         "caches and int64 slots")
    slots = slots.contiguous()
    library().lcq_store_kv(k.data_ptr(), v.data_ptr(), k.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                           slots.data_ptr(), k.shape[0], k.shape[1], k.shape[2], cache_form(k_cache, v_cache))


def _sinks_pointer(sinks: torch.Tensor | None, heads: int) -> int | None:
    """The address of fp32 attention sinks, one per query head (gpt-oss), or None (NULL: no sinks)."""
    if sinks is None:
        return None
    if sinks.shape != (heads,) or sinks.dtype != torch.float32 or not sinks.is_cpu or not sinks.is_contiguous():
        raise ValueError(f"attention sinks must be a contiguous fp32 CPU tensor of shape ({heads},)")
    return sinks.data_ptr()


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, window: int = 0, softcap: float = 0.0,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence, q (seqs, heads, head_dim), over its cached tokens (caches of
    cache_shape), or with window > 0 over the last `window` of them, with window < 0 over those of its chunk
    of -window positions (only those are read) -> same shape.
    softcap > 0: scores become softcap * tanh(score / softcap) before the softmax (Gemma 2). sinks (heads,)
    fp32: each head's attention sink (gpt-oss), one more key of that score and value zero, or None."""
    if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
        q = q.contiguous()
    block_tables, context_lens = block_tables.contiguous(), context_lens.contiguous()
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("decode_attention takes int32 block tables and context lengths")
    seqs, heads, head_dim = q.shape
    out = q.new_empty(q.shape)
    status = library().lcq_decode_attention(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), cache_form(k_cache, v_cache),
        block_tables.data_ptr(),
        block_tables.shape[1], context_lens.data_ptr(), out.data_ptr(), seqs, heads, k_cache.shape[2], head_dim,
        k_cache.shape[1], scale, softcap, window, _sinks_pointer(sinks, heads))
    check_blocks(status, "decode_attention")
    if status != 0:
        raise MemoryError("decode_attention could not allocate its score buffers")
    return out


def gated_group_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group: int, eps: float,
                     gate_first: bool) -> torch.Tensor:
    """The recurrent mixers' gated norm of rows x (rows, width) with gates z (same shape, unit-stride rows): each
    group of `group` values RMS-normalized and times its weight (weight: width values, or group values every group
    shares), silu(z) applied before the norm (gate_first) or after it (lcq_gated_group_norm)."""
    rows, width = x.shape
    if z.shape != x.shape or width % group or weight.numel() not in (width, group):
        raise ValueError("gated_group_norm needs gates of x's shape, whole groups and a weight per value or group")
    x, weight = x.contiguous(), weight.contiguous()
    z = z if z.stride(-1) == 1 else z.contiguous()
    out = torch.empty_like(x)
    library().lcq_gated_group_norm(x.data_ptr(), z.data_ptr(), z.stride(0), weight.data_ptr(), weight.numel(), rows,
                                   width, group, eps, int(gate_first), out.data_ptr())
    return out


class BuiltOnce:
    """A C structure (a recurrent mixer's, a mixture's, a latent attention layer's) built at its first use where the
    C kernels run, kept with the tensors and tables its addresses point to; None from then on where its build found
    the layer is not one they run (build returns the structure and what it points to, or None)."""

    def __init__(self, build: Callable[[], tuple[ctypes.Structure, list] | None]):
        self.build = build
        self.built: tuple[ctypes.Structure, list] | bool | None = None

    def get(self) -> ctypes.Structure | None:
        if not usable():  # (checked first: C kernels switched off now do not refuse the layer for good)
            return None
        if self.built is None:
            self.built = self.build() or False
        return self.built[0] if self.built else None


def linear_table(linears: list) -> tuple[ctypes.Array, list[torch.Tensor]] | None:
    """The (kind, weight, bias) entries of linear layers as the C functions read them (their decode_weights; None:
    a layer absent, a placeholder), and the tensors they point to; None where a layer keeps no weight the C
    products read."""
    weights = [(HALF_WEIGHT, None, None) if linear is None else linear.decode_weights() for linear in linears]
    if any(w is None for w in weights):
        return None
    entries = [e for w in weights for e in w]
    table = (ctypes.c_void_p * len(entries))(*[e.data_ptr() if isinstance(e, torch.Tensor) else e for e in entries])
    return table, [e for e in entries if isinstance(e, torch.Tensor)]


RECURRENT_KINDS = ("mamba", "delta", "short_conv")  # the mixers lcq_recurrent_step runs, in cpu_recurrent.c's order
NORMS = ("gated", "before_gate", "none")  # Mamba-2's output norms (MambaDims.norm), in its order


class RecurrentLayer(ctypes.Structure):
    """One recurrent mixer layer as lcq_recurrent_step reads it (cpu_recurrent.c): its kind and sizes, and the
    addresses of its states and parameters (the mixer keeps the tensors alive)."""

    _fields_ = [(name, ctypes.c_int) for name in ("kind", "heads", "head_dim", "groups", "state_dim", "norm",
                                                   "conv_channels", "conv_kernel")] + \
               [(name, ctypes.c_float) for name in ("eps", "dt_min", "dt_max")] + \
               [(name, ctypes.c_void_p) for name in ("conv_states", "states", "conv_weight", "conv_bias", "decay",
                                                      "dt_bias", "skip", "norm_weight")]


def recurrent_step(layer: RecurrentLayer, slots: torch.Tensor, projected: torch.Tensor, width: int) -> torch.Tensor:
    """One token per sequence through a recurrent mixer: its input projection's output (seqs, in width) -> its
    output projection's input (seqs, width), each sequence's states advanced in place in slot slots[s] (int64)."""
    projected, slots = projected.contiguous(), slots.contiguous()
    if slots.dtype != torch.int64 or slots.shape[0] != projected.shape[0]:
        raise ValueError("recurrent_step needs an int64 slot per row")
    out = projected.new_empty(projected.shape[0], width)
    if library().lcq_recurrent_step(ctypes.byref(layer), slots.data_ptr(), projected.shape[0], projected.data_ptr(),
                                    out.data_ptr()):
        raise MemoryError("recurrent_step could not allocate its buffers")
    return out


class Mixture(ctypes.Structure):
    """A mixture of experts as lcq_mixture_step reads it (cpu_mixture.c): its sizes and routing switches, and the
    addresses of its router, biases and the tables of its experts' linear layers (the mixture keeps them alive)."""

    _fields_ = [(name, ctypes.c_int) for name in ("num_experts", "top_k", "hidden", "width", "shared_width",
                                                   "activation", "sigmoid", "norm_topk_prob", "input_weights",
                                                   "groups", "kept_groups", "group_score_experts", "latent")] + \
               [("routed_scale", ctypes.c_float)] + \
               [(name, ctypes.c_void_p) for name in ("router", "router_bias", "correction", "shared_gate", "factors",
                                                      "experts", "shared", "latent_projections")]


def mixture_step(mixture: Mixture, x: torch.Tensor) -> torch.Tensor:
    """A mixture of experts' output for rows x (rows, hidden): routed, each chosen expert run over the rows that
    chose it, weighted and summed, plus the shared expert's (lcq_mixture_step)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    if library().lcq_mixture_step(ctypes.byref(mixture), x.data_ptr(), x.shape[0], out.data_ptr()):
        raise MemoryError("mixture_step could not allocate its buffers or run a product")
    return out


class LatentLayer(ctypes.Structure):
    """A latent attention layer (DeepSeek's MLA) as cpu_latent.h describes it: its sizes, and the addresses of its
    norms, kv_b_proj's two parts and the table of its three input projections (the layer keeps them alive)."""

    _fields_ = [(name, ctypes.c_int) for name in ("heads", "kv_rank", "q_rank", "nope_dim", "rope_dim", "value_dim",
                                                   "interleaved")] + [("eps", ctypes.c_float)] + \
               [(name, ctypes.c_void_p) for name in ("q_down_norm", "kv_norm", "key_up", "value_up", "projections")]


def latent_queries(layer: LatentLayer, q: torch.Tensor, compressed: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A latent attention layer's queries (rows, heads, kv_rank + rope_dim) and cache rows (rows, 1, kv_rank +
    rope_dim) from its query projection q (rows, heads, nope_dim + rope_dim) and kv_a_proj_with_mqa's output
    compressed (rows, kv_rank + rope_dim); cos, sin: each row's angles (rows, ..., rope_dim / 2)
    (lcq_latent_queries)."""
    q, compressed, cos, sin = (t.contiguous() for t in (q, compressed, cos, sin))
    rows = q.shape[0]
    queries = q.new_empty(rows, layer.heads, layer.kv_rank + layer.rope_dim)
    cache_rows = q.new_empty(rows, 1, layer.kv_rank + layer.rope_dim)
    library().lcq_latent_queries(ctypes.byref(layer), q.data_ptr(), compressed.data_ptr(), rows, cos.data_ptr(),
                                 sin.data_ptr(), None, queries.data_ptr(), cache_rows.data_ptr())
    return queries, cache_rows


def latent_values(layer: LatentLayer, out: torch.Tensor) -> torch.Tensor:
    """Each head's value (rows, heads * value_dim) from the attention's output (rows, heads, kv_rank + rope_dim)
    (lcq_latent_values)."""
    out = out.contiguous()
    values = out.new_empty(out.shape[0], layer.heads * layer.value_dim)
    library().lcq_latent_values(ctypes.byref(layer), out.data_ptr(), out.shape[0], values.data_ptr())
    return values


def argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, dim=-1) for an fp32 CPU tensor (usable(x)), int64."""
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError("argmax needs a non-empty last dimension")
    x = x.contiguous()
    out = torch.empty(x.shape[:-1], dtype=torch.int64)
    library().lcq_argmax_rows(x.data_ptr(), x.numel() // max(x.shape[-1], 1), x.shape[-1], out.data_ptr())
    return out


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, min_p: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """A token per row of fp32 CPU logits (rows, n) (usable(logits)): softmax at the row's temperature, min-p,
    top-k (n or more: none) and top-p, then the inverse of the kept probabilities' running sum at uniform,
    as sampler.filtered_probs and sampler.draw do (lcq_sample_rows). Settings: one value per row."""
    logits = logits.contiguous()
    rows, n = logits.shape
    settings = [t.contiguous().to(dtype) for t, dtype in ((temperature, torch.float32), (min_p, torch.float32),
                                                          (top_k, torch.int64), (top_p, torch.float32),
                                                          (uniform, torch.float32))]
    if any(t.shape != (rows,) for t in settings):
        raise ValueError(f"sample_rows takes one setting per row ({rows})")
    tokens = torch.empty(rows, dtype=torch.int64)
    if library().lcq_sample_rows(logits.data_ptr(), rows, n, *(t.data_ptr() for t in settings), tokens.data_ptr()):
        raise MemoryError("lcq_sample_rows could not allocate its buffers")
    return tokens


# fp32 values of K/V one prefill call stages at most at once (64 MiB), unless one sequence needs more
STAGE_LIMIT_FLOATS = 16 << 20


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      context_lens: torch.Tensor, query_start: torch.Tensor, scale: float,
                      stage_limit_floats: int = STAGE_LIMIT_FLOATS, window: int = 0, softcap: float = 0.0,
                      sinks: torch.Tensor | None = None, tile_every_query: bool = False) -> torch.Tensor:
    """Causal attention of a step's new tokens, q (tokens, heads, head_dim), each over its sequence's
    cached tokens up to its own position (their K/V already written), or with window > 0 over the last
    `window` of those, with window < 0 over those of its chunk -> same shape; softcap and sinks as
    decode_attention's. Sequences are staged and attended in groups of at most stage_limit_floats
    staged values (or one sequence). tile_every_query: a sequence's single new token is tiled as several
    are (not the decode form), so that each query's values are the same however many share its call."""
    if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
        q = q.contiguous()
    tables, lengths, starts = (t.contiguous() for t in (block_tables, context_lens, query_start))
    if any(t.dtype != torch.int32 for t in (tables, lengths, starts)):
        raise ValueError("prefill_attention takes int32 block tables, context lengths and query starts")
    heads, head_dim = q.shape[1:]
    out = q.new_empty(q.shape)
    status = library().lcq_prefill_attention(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), cache_form(k_cache, v_cache),
        tables.data_ptr(), tables.shape[1], lengths.data_ptr(), starts.data_ptr(), out.data_ptr(), lengths.shape[0],
        heads, k_cache.shape[2], head_dim, k_cache.shape[1], scale, softcap, window, stage_limit_floats,
        _sinks_pointer(sinks, heads), int(tile_every_query))
    if status == -2:
        raise ValueError("prefill_attention: a sequence has more new tokens than tokens in its context")
    check_blocks(status, "prefill_attention")
    if status != 0:
        raise MemoryError("prefill_attention could not allocate its buffers")
    return out


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled ops (native.load), or None where they cannot run here."""
    lib = native.load()
    if lib is None:
        return None
    p, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    signatures = {
        "lcq_norm": [p, p, p, p, p, i64, i32, f32, i32],
        "lcq_head_norm": [p, i64, i64, i32, i32, p, i32, f32, i32],
        "lcq_rotary": [p, i64, i64, i32, i32, i32, p, p, p, i32],
        "lcq_gated_mul": [p, p, i64, i64, i32, p],
        "lcq_ungated": [p, p, i64, i64, i32, p],
        "lcq_sigmoid_gate": [p, p, i64, i32, i32, i64, i64],
        "lcq_argmax_rows": [p, i64, i64, p],
        "lcq_recurrent_step": [p, p, i32, p, p],
        "lcq_mixture_step": [p, p, i32, p],
        "lcq_latent_queries": [p, p, p, i32, p, p, p, p, p],
        "lcq_latent_values": [p, p, i32, p],
        "lcq_gated_group_norm": [p, p, i64, p, i32, i64, i32, i32, f32, i32, p],
        "lcq_sample_rows": [p, i64, i64, p, p, p, p, p, p],
        "lcq_store_kv": [p, p, i64, p, p, p, i64, i32, i32, i32],
        "lcq_decode_attention": [p, i64, p, p, i32, p, i32, p, p, i32, i32, i32, i32, i32, f32, f32, i32, p],
        "lcq_prefill_attention": [p, i64, p, p, i32, p, i32, p, p, p, i32, i32, i32, i32, i32, f32, f32, i32, i64, p,
                                  i32],
        "lcq_decode_layers": [p, i32, p, p, i64, i32, f32, p, p, p, p, i32, i32, i32, i32, i32, i32, f32, p, i64, p,
                              p, i32, p, i32, f32, f32, p, i32, i32, i32, i32, i32, i32, i32, i32, i32, i32, p, i32,
                              i32, p, p, p, p, i32, i32],
    }
    for name, argtypes in signatures.items():
        getattr(lib, name).argtypes = argtypes
        status = name.endswith(("attention", "layers", "sample_rows", "_step"))  # (the others return nothing)
        getattr(lib, name).restype = ctypes.c_int if status else None
    lib.lcq_use_wide_attention.argtypes = [i32]
    lib.lcq_use_wide_attention(int(native.has_avx512("avx512vl")))
    return lib
