"""FP8 source checkpoints, decoded as read: the form in which DeepSeek-V3, MiniMax-M2 and the -FP8 releases of
Qwen3, Qwen3-Next and GLM-4.5 are published, and in which they reach the quantizer.

Each weight is an E4M3 (or E5M2) float times the scale of its block: quant_method `fp8` (transformers'
fine-grained FP8) stores the scales as `<weight>_scale_inv`, one per weight_block_size block of rows and columns
(the last blocks may be partial: 576 rows in blocks of 128 have 5), or one per tensor where weight_block_size is
null; `compressed-tensors` in float-quantized format stores them as `<weight>_scale`, one per tensor, per
output row (strategy channel) or per block (block_structure). Both multiply. Activation scales (`input_scale`,
and an FP8 KV cache's `k_scale` and `v_scale`) are not used: activations and the cache stay in lcq's dtypes.
"""
from __future__ import annotations

from typing import Any

import torch

FP8_METHOD = "fp8"
COMPRESSED_TENSORS = "compressed-tensors"
FLOAT_QUANTIZED = "float-quantized"
SCALE_SUFFIXES = ("_scale_inv", "_scale")  # a weight's scales: fp8's, compressed-tensors'
# Scales of activations and of an FP8 KV cache (compressed-tensors' kv_cache_scheme), which lcq does not use
ACTIVATION_SCALES = ("input_scale", "output_scale", "k_scale", "v_scale")
E8M0_BIAS = 127  # UE8M0 scales stored as bytes: 2 ** (byte - 127)


def is_fp8(quant: dict[str, Any] | None) -> bool:
    """Whether a source config's quantization_config is an FP8 one this reader decodes."""
    quant = quant or {}
    return quant.get("quant_method") == FP8_METHOD or (
        quant.get("quant_method") == COMPRESSED_TENSORS and quant.get("format") == FLOAT_QUANTIZED)


def block_size(quant: dict[str, Any]) -> tuple[int, int] | None:
    """The rows and columns that share a scale, where the scales are per block (None: per tensor or per row,
    told apart by the scales' shape)."""
    if quant.get("quant_method") == FP8_METHOD:
        block = quant.get("weight_block_size")
    else:
        blocks = {tuple(weights["block_structure"]) for group in (quant.get("config_groups") or {}).values()
                  if (weights := group.get("weights") or {}).get("strategy") == "block"}
        if len(blocks) > 1:
            raise ValueError(f"compressed-tensors groups with different block structures {sorted(blocks)}")
        block = next(iter(blocks), None)
    if block is None:
        return None
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"FP8 block size {list(block)} is not [rows, columns]")
    return int(block[0]), int(block[1])


def scale_names(names: list[str]) -> dict[str, str]:
    """Each stored weight that has scales, and their name (fp8's or compressed-tensors')."""
    present = set(names)
    return {name: scale for name in names for suffix in SCALE_SUFFIXES
            if (scale := name + suffix) in present and not name.endswith(SCALE_SUFFIXES)}


def is_auxiliary(name: str, scaled: dict[str, str]) -> bool:
    """Whether a stored tensor is a weight's scales or an activation's: read with its weight, or not at all."""
    return name in scaled.values() or name.rsplit(".", 1)[-1] in ACTIVATION_SCALES


def decode_fp8(weight: torch.Tensor, scales: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """A weight (..., rows, columns) in fp32 from its FP8 values and their scales: one (a scalar, or one per
    matrix), one per row ((..., rows, 1)), or one per `block` ((..., ceil(rows / b0), ceil(columns / b1))).
    fp32, not the bf16 these models were trained in: a 4-bit significand times an fp32 scale rounds only at
    fp32's precision, and the quantizer computes in fp32 anyway (the serving loader casts)."""
    if weight.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"weight of dtype {str(weight.dtype).replace('torch.', '')} has FP8 scales")
    scales = (scales.float() - E8M0_BIAS).exp2() if scales.dtype == torch.uint8 else scales.float()
    rows, columns = weight.shape[-2:]
    if scales.numel() == weight[..., 0, 0].numel():  # per tensor (or per expert)
        return weight.float() * scales.reshape(*weight.shape[:-2], 1, 1)
    if scales.shape[-2:] == (rows, 1):
        return weight.float() * scales
    if block is None or scales.shape[-2:] != (-(-rows // block[0]), -(-columns // block[1])):
        raise ValueError(f"FP8 scales {tuple(scales.shape)} do not fit weight {tuple(weight.shape)}"
                         + (f" in blocks of {list(block)}" if block else " (weight_block_size not given)"))
    # Scales over rows, broadcast over each block's columns (the last block padded): no weight-sized scales.
    column_blocks = scales.shape[-1]
    padded = torch.nn.functional.pad(weight.float(), (0, column_blocks * block[1] - columns))
    by_block = padded.unflatten(-1, (column_blocks, block[1]))
    by_block *= scales.repeat_interleave(block[0], dim=-2)[..., :rows, :, None]
    return by_block.flatten(-2)[..., :columns].contiguous()
