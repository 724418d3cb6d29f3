"""MXFP4, the OCP microscaling format gpt-oss's experts are published in: each run of 32 weights along a
row shares a power-of-two scale (one byte, exponent biased by 127) and each weight is a 4-bit E2M1
float (sign, two exponent bits, one mantissa bit), two to a byte, the low nibble first."""
from __future__ import annotations

import torch

BLOCK = 32  # weights sharing one scale
# The sixteen E2M1 values by code: 0-7 positive, 8-15 their negatives.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127


def decode_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Weights (..., G * 32) in bf16 from blocks (..., G, 16) uint8 and scales (..., G) uint8: exact, since
    every E2M1 value times a power of two in bf16's range is a bf16 value."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match "
                         f"(blocks (..., G, {BLOCK // 2}), scales (..., G))")
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).long()  # low nibble first
    values = table[codes].flatten(-2) * torch.exp2(scales.float() - SCALE_BIAS).unsqueeze(-1)
    return values.flatten(-2).to(torch.bfloat16)
