"""Small building blocks of a Llama-family decoder: RMSNorm (also per head), rotary embedding, gated MLP activations.

fp32 CPU tensors take the one-call C versions (lcq.kernels.cpu_ops) where they build, CUDA rows the one-kernel
Triton versions of the norm, the rotary embedding and the gated activation (lcq.kernels.elementwise, imported
only then, so that CPU-only installs need no triton); the torch expressions below are the same computations
for every other device and dtype.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from lcq.format import PackedLinear, dequantize, output_rows
from lcq.kernels import cpu_ops, linear


def _on_gpu(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """True where lcq.kernels.elementwise takes a step: x CUDA rows (tokens, width) of unit stride in a dtype it
    handles, and the other tensors (None: absent) in x's dtype with unit-stride rows too."""
    if not (linear.runs_triton(x) and x.dim() == 2 and x.stride(-1) == 1
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        return False
    return all(t is None or (t.dtype == x.dtype and t.stride(-1) == 1) for t in others)


class PackedEmbedding(torch.nn.Module):
    """Embeddings looked up from a packed table (their own, or the packed lm_head they are tied to): each
    token's row dequantized as it is looked up (the rows of a step, a few KB, where the table would take
    vocab x hidden x 2 bytes)."""

    def __init__(self, layer: PackedLinear):
        super().__init__()
        self.layer = layer

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return dequantize(output_rows(self.layer, input_ids))


class RMSNorm(torch.nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(s), s) for s = x, or s = residual + x (the decoder's residual stream, added here so
        that the C path does the add and the norm in one pass; it updates residual in place).
        Normalised in fp32, scaled in the model dtype, as transformers does."""
        if cpu_ops.usable(x, residual, self.weight):
            return cpu_ops.norm(x, self.weight, self.eps, residual)
        if _on_gpu(x, residual, self.weight) and (residual is None or residual.shape == x.shape):
            from lcq.kernels.elementwise import add_rms_norm
            return add_rms_norm(x, self.weight, self.eps, residual)
        s = x if residual is None else residual + x
        return self.weight * F.rms_norm(s.float(), (s.shape[-1],), eps=self.eps).to(s.dtype), s


class LayerNorm(RMSNorm):
    """Cohere's and StableLM's norm: centred, scaled by its weight (plus StableLM's bias), in fp32; the same
    residual contract as RMSNorm's, and the same C kernel on CPU (the one-call decode step's)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype = torch.float32, bias: bool = False):
        super().__init__(size, eps, dtype)
        self.bias = torch.nn.Parameter(torch.zeros(size, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if cpu_ops.usable(x, residual, self.weight, self.bias):
            return cpu_ops.norm(x, self.weight, self.eps, residual, self.bias, centred=True)
        s = x if residual is None else residual + x
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(s.float(), (s.shape[-1],), self.weight.float(), bias, self.eps).to(s.dtype), s


def head_norm_(x: torch.Tensor, heads: int, head_dim: int, weight: torch.Tensor, eps: float,
               weights_per_head: bool = False, centred: bool = False) -> None:
    """RMS-normalise (or where centred, LayerNorm), in place, each of the first `heads` heads of every row of x
    (tokens, width), a view into the fused projection, times weight (head_dim values, or heads x head_dim where
    weights_per_head: Command R+'s): Qwen3's q_norm and k_norm before the rotary embedding, Hunyuan's after it."""
    if cpu_ops.usable(x, weight) and x.stride(-1) == 1:
        return cpu_ops.head_norm_(x, heads, head_dim, weight, eps, head_dim if weights_per_head else 0, centred)
    rows = x[:, :heads * head_dim].unflatten(-1, (heads, head_dim))
    normed = F.layer_norm(rows.float(), (head_dim,), eps=eps) if centred else F.rms_norm(rows.float(), (head_dim,),
                                                                                         eps=eps)
    rows.copy_((weight.view(heads, head_dim) if weights_per_head else weight) * normed.to(x.dtype))


ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "dynamic")
# The table of layers that apply no rotary embedding (SmolLM3's NoPE layers): an identity rotation, so
# that every path treats them as any other layer. Internal only: configs cannot ask for it.
NO_ROTATION = {"rope_type": "none", "rope_theta": 1.0}


def rope_settings(config: dict) -> dict:
    """Rotary settings from either config style: transformers 5 `rope_parameters`, or the older
    top-level `rope_theta` plus `rope_scaling`. Scaled types without an original context length
    take the model's, and YaRN and LongRoPE without a factor the ratio of the two, as transformers does
    (Phi-3's top-level original_max_position_embeddings first)."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        params["original_max_position_embeddings"] = (config.get("original_max_position_embeddings")
                                                      or params.get("original_max_position_embeddings")
                                                      or config.get("max_position_embeddings", 4096))
    if params["rope_type"] in ("yarn", "longrope") and params.get("factor") is None:
        params["factor"] = config.get("max_position_embeddings", 4096) / params["original_max_position_embeddings"]
    return params


def query_temperatures(positions: torch.Tensor, beta: float, span: int, shift: int = 0) -> torch.Tensor:
    """Llama 4's attention temperature: each query at position p multiplied by 1 + beta * log(1 + floor((p
    + shift) / span)), so that attention stays sharp past `span` tokens (1 before; Ministral 3 counts
    from p, Llama 4 from p + 1)."""
    return 1 + beta * torch.log1p(torch.floor((positions.float() + shift) / span))


def rotary_frequencies(head_dim: int, rope: dict, context: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float64) and the factor on cos and sin (YaRN's and LongRoPE's attention
    scaling, else 1) for a model served with up to `context` tokens (only LongRoPE depends on it).
    Dynamic NTK with a fixed alpha (Hunyuan) is a base stretched by alpha^(d / (d - 2)) at every length."""
    theta = rope["rope_theta"]
    if rope["rope_type"] == "dynamic" and rope.get("alpha"):
        theta *= rope["alpha"] ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = rope["rope_type"]
    if kind in ("default", "dynamic"):  # dynamic NTK rescales the base only past the model's context, never served
        return inv_freq, 1.0
    if kind == NO_ROTATION["rope_type"]:  # every angle 0: cos 1, sin 0 leave q and k as they are
        return torch.zeros_like(inv_freq), 1.0
    if kind == "linear":
        return inv_freq / rope["factor"], 1.0
    if kind == "llama3":  # keep high frequencies, divide low ones by `factor`, blend in between
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        original = rope["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelength - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= original / high) & (wavelength <= original / low)
        return torch.where(medium, blended, scaled), 1.0
    if kind == "yarn":
        return _yarn(inv_freq, head_dim, rope)
    if kind == "longrope":
        return _longrope(inv_freq, rope, context)
    raise ValueError(f"rope type {kind!r} is not supported ({', '.join(ROPE_TYPES)})")


def _yarn(inv_freq: torch.Tensor, head_dim: int, rope: dict) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): dimensions that turn fewer than beta_slow times over the original
    context are interpolated (divided by `factor`), those that turn more than beta_fast times are
    kept, a linear ramp blends the ones between; cos and sin are scaled by 0.1 ln(factor) + 1
    (or the ratio of two such terms with mscale / mscale_all_dim, or attention_factor as given)."""
    factor, original, base = rope["factor"], rope["original_max_position_embeddings"], rope["rope_theta"]

    def magnitude(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        attention_factor = (magnitude(factor, mscale) / magnitude(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else magnitude(factor))

    def dimension(turns: float) -> float:  # the dimension whose frequency turns `turns` times over `original`
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension(rope.get("beta_fast") or 32), dimension(rope.get("beta_slow") or 1)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / max(high - low, 0.001)).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp), float(attention_factor)


def _longrope(inv_freq: torch.Tensor, rope: dict, context: int) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3.5, the 128k Phi-3 models): each frequency divided by its own factor, the long
    factors where the context served is longer than the original one, else the short ones; cos and sin
    scaled by sqrt(1 + ln(factor) / ln(original)). The choice is per engine, not per sequence (as vLLM
    makes it): a sequence that crossed the original length would otherwise hold keys rotated by both."""
    original = rope["original_max_position_embeddings"]
    factors = rope["long_factor"] if context > original else rope["short_factor"]
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        factor = rope["factor"]
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return inv_freq / torch.tensor(factors, dtype=torch.float64), float(attention_factor)


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables (fp32) for every position up to max_positions, applied in the half-split layout.
    They are built for a context of max_positions tokens; `fit` rebuilds them, in place, for the context an
    engine serves (LongRoPE's factors depend on it)."""

    def __init__(self, head_dim: int, max_positions: int, rope: dict):
        super().__init__()
        self.head_dim, self.rope, self.max_positions = head_dim, rope, max_positions
        cos, sin = self._tables(max_positions)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """In float64 through numpy, on one thread: torch's cos of a few thousand float64 values, the first
        region its threads run in a process, gave its second thread's half wrong by up to 7e-9 in about one
        process of four (torch 2.13, 2 threads), so the tables, and a batch-invariant server's logits, differed
        from one start to the next."""
        inv_freq, scale = rotary_frequencies(self.head_dim, self.rope, context)
        freqs = np.outer(np.arange(self.max_positions, dtype=np.float64), inv_freq.numpy())
        return (torch.from_numpy(np.cos(freqs) * scale).float(), torch.from_numpy(np.sin(freqs) * scale).float())

    def fit(self, context: int) -> None:
        """Tables for a served context of `context` tokens, written into the same tensors (the CPU decode
        step and CUDA graphs keep their addresses). Only LongRoPE's tables depend on it."""
        if self.rope["rope_type"] != "longrope":
            return
        cos, sin = self._tables(context)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, 1, d/2) for positions (T,): looked up once per step, used by every layer."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """x (T, heads, d) rotated by the angles of its tokens: pairs (i, i + d/2), or interleaved (2i, 2i + 1); with
    fewer angles than d/2 (Qwen3.5's partial rotary embedding), its first 2 x angles dimensions only."""
    if 2 * cos.shape[-1] < x.shape[-1]:
        turned = 2 * cos.shape[-1]
        return torch.cat([apply_rotary(x[..., :turned], cos, sin, interleaved), x[..., turned:]], dim=-1)
    if interleaved:
        pairs = x.float().unflatten(-1, (-1, 2))
        first, second = pairs[..., 0], pairs[..., 1]
        return torch.stack([first * cos - second * sin, second * cos + first * sin], dim=-1).flatten(-2).to(x.dtype)
    first, second = x.float().chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1).to(x.dtype)


def rotary_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, cos: torch.Tensor,
               sin: torch.Tensor, interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused projection (T, (heads + 2 kv_heads) d) into q, k, v (T, heads, d), q and k
    rotated (on the C path and on CUDA in place, so q, k and v stay views of qkv)."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    in_place = qkv.stride(-1) == 1 and 2 * cos.shape[-1] <= head_dim
    rotate_ = None
    if in_place and cpu_ops.usable(qkv, cos, sin):
        rotate_ = cpu_ops.rotary_
    elif in_place and _on_gpu(qkv) and cos.is_contiguous() and sin.is_contiguous():
        from lcq.kernels.elementwise import rotary_ as rotate_
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    if rotate_ is not None:
        rotate_(qkv, num_heads + num_kv_heads, head_dim, cos, sin, interleaved)
    else:
        q = apply_rotary(q.view(-1, num_heads, head_dim), cos, sin, interleaved)
        k = apply_rotary(k.view(-1, num_kv_heads, head_dim), cos, sin, interleaved)
    return (q.reshape(-1, num_heads, head_dim), k.reshape(-1, num_kv_heads, head_dim),
            v.reshape(-1, num_kv_heads, head_dim))


# activations of an MLP without a gate, whose input projection is up_proj alone (Nemotron-H, Arcee; Apertus's
# xIELU, which has learned factors: xielu)
UNGATED = ("relu2", "xielu")


def xielu(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Apertus's xIELU: alpha_p x^2 + beta x for x > 0, else alpha_n (expm1(min(x, eps)) - x) + beta x; factors
    (alpha_p, alpha_n, beta, eps) with the learned alphas already through their softplus (alpha_n's plus beta)."""
    if cpu_ops.usable(x, factors):
        return cpu_ops.ungated(x, "xielu", factors)
    alpha_p, alpha_n, beta, eps = factors.to(x.dtype).unbind()
    return torch.where(x > 0, alpha_p * x * x + beta * x, (torch.expm1(torch.minimum(x, eps)) - x) * alpha_n + beta * x)


def swiglu_factors(activation: str, alpha: float, limit: float) -> torch.Tensor | None:
    """The C kernels' factors of gpt-oss's clamped SwiGLU, (alpha, limit) in fp32; None for other activations."""
    return torch.tensor([alpha, limit], dtype=torch.float32) if activation == "swiglu_oai" else None


def mlp_activation(gate_up: torch.Tensor, activation: str, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """What an MLP's down_proj reads from its input projection's output. Gated: act(gate) * up for gate_up
    (..., 2 * width) = [gate, up]: SwiGLU (silu), Gemma's GeGLU (gelu_tanh), or gpt-oss's clamped SwiGLU
    (swiglu_oai: gate capped at `limit`, up clamped to +-limit, then gate * sigmoid(alpha * gate) * (up + 1)).
    Ungated (UNGATED): act(up), Nemotron-H's relu(up)^2."""
    if activation == "relu2":
        return cpu_ops.ungated(gate_up, activation) if cpu_ops.usable(gate_up) else torch.relu(gate_up).square()
    if activation in cpu_ops.ACTIVATIONS and cpu_ops.usable(gate_up):
        return cpu_ops.gated_mul(gate_up, activation, swiglu_factors(activation, alpha, limit))
    if _on_gpu(gate_up):
        from lcq.kernels.elementwise import GATED, gated_activation
        if activation in GATED:
            return gated_activation(gate_up, activation)
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "swiglu_oai":
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        return gate * torch.sigmoid(gate * alpha) * (up + 1)
    return (F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")) * up
