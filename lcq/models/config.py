"""The few numbers our model needs, read from a Hugging Face config.json."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lcq.errors import UserError

from .layers import ROPE_TYPES, rope_settings

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                           "Qwen3ForCausalLM": "qwen3"}


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm on each query and key head before the rotary embedding
    rope: dict

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise UserError(f"{folder}: no config.json (not a Hugging Face model folder)")
        try:
            c = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON ({e.msg})") from None
        architecture = (c.get("architectures") or [c.get("model_type", "?")])[0]
        if architecture not in SUPPORTED_ARCHITECTURES and c.get("model_type") not in SUPPORTED_ARCHITECTURES.values():
            raise UserError(f"{folder}: architecture {architecture} is not supported "
                            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        rope = rope_settings(c)
        if rope["rope_type"] not in ROPE_TYPES:
            raise UserError(f"{folder}: rope type {rope['rope_type']!r} is not supported "
                            f"(supported: {', '.join(ROPE_TYPES)})")
        heads = c["num_attention_heads"]
        return cls(
            model_type=c["model_type"], vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"], num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads, rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            max_position_embeddings=_attention_span(c, rope),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=c["model_type"] == "qwen2" or bool(c.get("attention_bias", False)),
            qk_norm=c["model_type"] == "qwen3", rope=rope,
        )


def _attention_span(c: dict, rope: dict) -> int:
    """Longest context we serve. YaRN extends it to factor x the original length (the model card's
    recipe for long context: add the scaling to the config; vLLM does the same). Attention here is
    always full, so a model trained with a sliding window (Mistral v0.1; Qwen2 with
    use_sliding_window) is capped at its window, where both agree."""
    span = c.get("max_position_embeddings", 4096)
    if rope["rope_type"] == "yarn":
        span = max(span, int(rope["original_max_position_embeddings"] * rope["factor"]))
    window = c.get("sliding_window") if c["model_type"] == "mistral" or c.get("use_sliding_window") else None
    return min(span, window) if window else span
