"""Triton kernels for a decoder layer's steps between its products, on CUDA: the residual add with its
RMSNorm, the rotary embedding of queries and keys, and the gated activation of an MLP.

Why: in torch each of these steps is several kernels (the norm: the add, an fp32 copy, the norm, a cast
and the scale; the rotary embedding: a copy, four products, two sums, a concatenation and a cast, for
queries and keys each), ~30 a layer and ~1,000 a token for a 32-layer model, and replayed from a CUDA
graph every one of them still costs its launch and its ramp. At 2 bits a layer's products take about a
hundred microseconds at one row, so those small kernels cost a 7B model about as much as its products
do. One kernel per step computes what the torch expressions of lcq.models.layers compute, with the same
roundings to the activation dtype (tests/test_elementwise.py holds them to each other, in the
interpreter and on a GPU); they differ only where fp32 arithmetic may be contracted or ordered otherwise.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .dependent_launch import dependent_launch, wait_for_earlier_kernels

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GATED = ("silu", "gelu_tanh")  # activations gated_activation (and load_inputs) computes; others stay in torch
GATED_BLOCK = 1024


def fusing_steps() -> bool:
    """Whether one kernel rotates queries and keys and writes the cache, and, at 1-2 rows, the residual stream runs
    through the products (LCQLinear.takes_stream: the norms, the residual adds and the MLP's activation inside them):
    for a 32-layer Llama 32 launches a step fewer, 128 at batch 1-2. LCQ_FUSED_STEPS=0: each its own kernel, as
    before (bench/generate.py --variants unfused-steps)."""
    return os.environ.get("LCQ_FUSED_STEPS", "1") != "0"


def _warps(elements: int) -> int:
    """Warps for a program that holds `elements` values: ~8 a thread, at most 16 warps."""
    return max(1, min(16, triton.next_power_of_2(elements) // 256))


@triton.jit
def rms_normed(s, scale, weight, dtype: tl.constexpr):
    """The RMSNorm of fp32 values s whose rows' scale is rsqrt(mean(s^2) + eps): (s * scale rounded to dtype) * the
    fp32 weight, rounded to dtype, as transformers computes it; the norm kernel's and the products' that take the
    residual stream's norm as they load it (triton_tiles._tile_inputs, triton_bytes._input_bytes_kernel)."""
    return ((s * scale).to(dtype).to(tl.float32) * weight).to(dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, width, stride_x, stride_r, stride_o, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One row: s = x (+ residual, rounded to the dtype and written back into residual), then
    (s * rsqrt(mean(s^2) + eps) in fp32, rounded to the dtype) * weight."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < width
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    wait_for_earlier_kernels(PDL)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    s = x.to(tl.float32)
    if HAS_RESIDUAL:  # rounded once to the dtype, as torch's add (arithmetic on 16-bit values is done in fp32
        # throughout: the interpreter misreads bf16 operands, and fp32 then one rounding is torch's result too)
        s += tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        s = s.to(x.dtype).to(tl.float32)
        tl.store(residual_ptr + row * stride_r + offs, s.to(x.dtype), mask=mask)
    scale = tl.rsqrt(tl.sum(s * s, axis=0) / width + eps)
    tl.store(out_ptr + row * stride_o + offs, rms_normed(s, scale, weight, x.dtype), mask=mask)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * norm(s), s) for s = x, or s = residual + x written into residual (layers.RMSNorm's
    contract). x and residual (rows, width) with unit-stride rows, weight (width,) of x's dtype."""
    rows, width = x.shape
    out = torch.empty_like(x)
    block = triton.next_power_of_2(width)
    target = residual if residual is not None else x
    _rms_norm_kernel[(rows,)](x, target, weight, out, width, x.stride(0), target.stride(0), out.stride(0), eps,
                              HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_warps(block),
                              **dependent_launch(x))
    return out, target


@triton.jit
def rotate_token(qkv_ptr, cos_ptr, sin_ptr, token, stride_t, stride_c, heads, HEAD_DIM: tl.constexpr,
                 PAIRS: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """Every pair of the token's first `heads` heads rotated by the token's angles, in fp32, rounded back to the
    dtype in place."""
    head = tl.arange(0, BLOCK_H)[:, None]
    pair = tl.arange(0, BLOCK_P)[None, :]
    mask = (head < heads) & (pair < PAIRS)
    if INTERLEAVED:
        first_at = 2 * pair
        second_at = first_at + 1
    else:
        first_at = pair
        second_at = pair + PAIRS
    row = qkv_ptr + token * stride_t + head * HEAD_DIM
    first = tl.load(row + first_at, mask=mask, other=0.0)
    second = tl.load(row + second_at, mask=mask, other=0.0)
    cos = tl.load(cos_ptr + token * stride_c + pair, mask=pair < PAIRS, other=0.0)
    sin = tl.load(sin_ptr + token * stride_c + pair, mask=pair < PAIRS, other=0.0)
    first32 = first.to(tl.float32)
    second32 = second.to(tl.float32)
    tl.store(row + first_at, (first32 * cos - second32 * sin).to(first.dtype), mask=mask)
    tl.store(row + second_at, (second32 * cos + first32 * sin).to(first.dtype), mask=mask)


@triton.jit
def _rotary_kernel(qkv_ptr, cos_ptr, sin_ptr, stride_t, stride_c, heads,
                   HEAD_DIM: tl.constexpr, PAIRS: tl.constexpr, INTERLEAVED: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, PDL: tl.constexpr):
    """One token a program (rotate_token)."""
    wait_for_earlier_kernels(PDL)
    rotate_token(qkv_ptr, cos_ptr, sin_ptr, tl.program_id(0), stride_t, stride_c, heads, HEAD_DIM, PAIRS,
                 INTERLEAVED, BLOCK_H, BLOCK_P)


def rotary_launch(heads: int, pairs: int) -> dict:
    """A rotation's tile (BLOCK_H heads x BLOCK_P pairs) and its warps, for a launch's constants."""
    block_h, block_p = triton.next_power_of_2(heads), triton.next_power_of_2(pairs)
    return dict(BLOCK_H=block_h, BLOCK_P=block_p, num_warps=_warps(block_h * block_p))


def rotary_(qkv: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor,
            interleaved: bool = False) -> None:
    """Rotate, in place, the first `heads` heads of every row of qkv (tokens, width), unit-stride rows: pairs
    (i, i + r/2), or interleaved (2i, 2i + 1), of each head's first r dimensions; cos and sin fp32, r / 2
    contiguous values per token (r = head_dim, or fewer: a partial rotary embedding)."""
    tokens, pairs = qkv.shape[0], cos.shape[-1]
    cos, sin = cos.reshape(tokens, pairs), sin.reshape(tokens, pairs)
    _rotary_kernel[(tokens,)](qkv, cos, sin, qkv.stride(0), cos.stride(0), heads, HEAD_DIM=head_dim, PAIRS=pairs,
                              INTERLEAVED=interleaved, **rotary_launch(heads, pairs), **dependent_launch(qkv))


# what a kernel's GATED argument names: its inputs as they are, or act(gate) * up from [gate, up] rows
GATED_CODES = {None: 0, "silu": 1, "gelu_tanh": 2}


@triton.jit
def load_inputs(ptr, offsets, mask, width, GATED: tl.constexpr):
    """The values at ptr + offsets, or with GATED (GATED_CODES) act(gate) rounded to the dtype, times up, rounded
    to the dtype, for rows [gate, up] whose up is width values after its gate: what _gated_kernel stores, so that a
    product can take its inputs from the gate/up product's output without that kernel between (masked: 0)."""
    gate = tl.load(ptr + offsets, mask=mask, other=0.0)
    if GATED == 0:
        return gate
    up = tl.load(ptr + offsets + width, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    if GATED == 2:  # 0.5 g (1 + tanh(u)), with 1 + tanh(u) = 2 / (1 + e) for u >= 0, else 2 e / (1 + e), e = exp(-2|u|)
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        e = tl.exp(-2.0 * tl.abs(inner))
        activated = g * tl.where(inner >= 0, 1.0, e) / (1.0 + e)
    else:
        activated = g / (1.0 + tl.exp(-g))
    return (activated.to(gate.dtype).to(tl.float32) * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _gated_kernel(gate_up_ptr, out_ptr, width, stride_in, stride_out, GATED: tl.constexpr, BLOCK: tl.constexpr,
                  PDL: tl.constexpr):
    """act(gate) * up for one row's BLOCK columns (load_inputs)."""
    wait_for_earlier_kernels(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < width
    tl.store(out_ptr + row * stride_out + offs, load_inputs(gate_up_ptr + row * stride_in, offs, mask, width, GATED),
             mask=mask)


def gated_activation(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up for gate_up (rows, 2 * width) = [gate, up] with unit-stride rows; activation in GATED."""
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, width, dtype=gate_up.dtype, device=gate_up.device)
    grid = (rows, triton.cdiv(width, GATED_BLOCK))
    _gated_kernel[grid](gate_up, out, width, gate_up.stride(0), out.stride(0), GATED=GATED_CODES[activation],
                        BLOCK=GATED_BLOCK, num_warps=4, **dependent_launch(gate_up))
    return out
