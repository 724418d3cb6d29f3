"""Folders lcq reads as an architecture it runs: the config and tensor names a reader sees.

Each family's reading is in the module of its kind: wrappers.py (multimodal and Qwen VL folders,
base-model saves), rotary.py (rotary embeddings and fused projections read as Llama's), experts.py
(mixtures' names and 3-D experts), folded.py (Granite's and Falcon-H1's factors), hybrids.py (Qwen3-Next,
Nemotron-H, LFM2); common.py holds what they share.

A quantized result is a plain checkpoint of the architecture read (Gemma3ForCausalLM, MistralForCausalLM,
LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM).
"""
from __future__ import annotations

from typing import Any

from ..fp8 import is_fp8
from .common import StoredTensor, ViewError, with_defaults
from .experts import GPT_OSS_EXPERTS, MXFP4, SPLIT_EXPERTS, ernie_moe_names, expert_parts, mixtral_name
from .folded import (GRANITE_EXPERTS, falcon_h1_config, falcon_h1_scales, granite4_as_llama, granite4_is_dense,
                     granite_as_llama, granite_experts_config, granite_scales)
from .hybrids import FINAL_NORMS, LFM2, interleaved_parts, nemotron_h_config, nemotron_h_names, qwen3_next_parts
from .rotary import (AS_LLAMA, INTERLEAVED, WHOLE_HEAD, as_llama, glm4_parts, glm_as_qwen2, glm_parts,
                     half_split_parts, phi3_as_mistral, phi3_parts, rotated_first_parts, whole_head_config)
from .wrappers import BASE_MODEL_PREFIX, WRAPPERS, base_model_save, text_model_config, wrapper_tensors

__all__ = ["FINAL_NORMS", "LFM2", "VIEWED_ARCHITECTURES", "StoredTensor", "ViewError", "interleaved_parts",
           "source_parts", "view_config", "view_tensors"]

# Architectures read as another one (named in the errors that list what lcq reads).
VIEWED_ARCHITECTURES = ("Phi3ForCausalLM", "GraniteForCausalLM", *GRANITE_EXPERTS.values(), "GlmForCausalLM",
                        "Glm4ForCausalLM", "StableLmForCausalLM", "Qwen3NextForCausalLM", *AS_LLAMA.values(),
                        *WRAPPERS)


def source_parts(config: dict[str, Any], stored_name: str) -> dict[str, StoredTensor]:
    """The view's tensors read from the stored tensor `stored_name` of a folder whose config.json is
    `config`, with where each lies in it (none for a tensor the view does not read): how a matrix of
    the source model, such as a LoRA adapter's, maps onto the view's."""
    return view_tensors(config, [stored_name]) or {stored_name: StoredTensor(stored_name)}


def view_config(config: dict[str, Any], stored: list[str] | None = None) -> dict[str, Any]:
    """config.json of the model lcq runs for a folder whose config.json is `config` and whose tensors are
    `stored` (None: not known; only a base-model save's head depends on them)."""
    if not isinstance(config, dict):
        raise ViewError(f"config.json holds a JSON {type(config).__name__}, not an object of settings")
    if is_fp8(config.get("quantization_config")):  # decoded as read (CheckpointReader)
        return view_config({key: value for key, value in config.items() if key != "quantization_config"}, stored)
    architecture = (config.get("architectures") or [None])[0]
    if architecture in WRAPPERS:
        return text_model_config(config, architecture)
    if architecture == "Phi3ForCausalLM" or config.get("model_type") == "phi3":
        return phi3_as_mistral(config)
    if architecture == "GraniteForCausalLM" or config.get("model_type") == "granite":
        return granite_as_llama(config)
    if config.get("model_type") == "granitemoehybrid" and granite4_is_dense(config):
        return granite4_as_llama(config)
    if config.get("model_type") in GRANITE_EXPERTS:
        return granite_experts_config(config)
    if config.get("model_type") == "glm":
        return glm_as_qwen2(config)
    if config.get("model_type") in WHOLE_HEAD:
        return whole_head_config(config, WHOLE_HEAD[config["model_type"]])
    if config.get("model_type") in AS_LLAMA:
        return as_llama(config)
    if config.get("model_type") == "ernie4_5_moe":  # its own defaults (head_dim, tied head, MoE layers)
        return with_defaults(config, "Ernie4_5_MoeForCausalLM")
    if config.get("model_type") == "qwen3_next":  # its own defaults (linear attention's dimensions)
        return with_defaults(config, "Qwen3NextForCausalLM")
    if config.get("model_type") == "minimax_m2":  # its own defaults (rotary base, partial rotary from rotary_dim)
        return with_defaults(config, "MiniMaxM2ForCausalLM")
    if config.get("model_type") in LFM2:  # their own defaults (tied head, layer types)
        return with_defaults(config, LFM2[config["model_type"]])
    if config.get("model_type") == "bamba":  # its own defaults (Mamba-2's head width, half of each head turning)
        return with_defaults(config, "BambaForCausalLM")
    if config.get("model_type") == "nemotron_h":
        return nemotron_h_config(config)
    if config.get("model_type") == "falcon_h1":
        return falcon_h1_config(config)
    if config.get("model_type") == "apertus":  # its own defaults (rotary base 12,000,000, llama3 scaling)
        return with_defaults(config, "ApertusForCausalLM")
    if config.get("model_type") == "gpt_oss" and (config.get("quantization_config") or {}).get("quant_method") == MXFP4:
        return {key: value for key, value in config.items() if key != "quantization_config"}  # decoded as read
    if stored is not None and base_model_save(stored):
        return {**config, "tie_word_embeddings": True}
    return config


def view_tensors(config: dict[str, Any], stored: list[str]) -> dict[str, StoredTensor] | None:
    """The view's tensor names and where each is stored, for a folder with config.json `config` and
    tensors `stored`; None where the names are the stored ones."""
    architecture = (config.get("architectures") or [None])[0]
    if architecture in WRAPPERS:
        return wrapper_tensors(config, architecture, stored)
    if architecture == "Phi3ForCausalLM" or config.get("model_type") == "phi3":
        return phi3_parts(config, stored)
    if architecture == "GraniteForCausalLM" or config.get("model_type") in ("granite", *GRANITE_EXPERTS):
        return granite_scales(config, stored)
    if config.get("model_type") in INTERLEAVED:
        return half_split_parts(as_llama(config), stored)
    if config.get("model_type") == "glm":
        return glm_parts(config, stored)
    if config.get("model_type") in ("mixtral", "minimax_m2", *LFM2):
        return {mixtral_name(name): StoredTensor(name) for name in stored}
    if config.get("model_type") == "qwen3_next":
        return qwen3_next_parts(config, stored)
    if config.get("model_type") == "nemotron_h":
        return nemotron_h_names(stored)
    if config.get("model_type") == "falcon_h1":
        return falcon_h1_scales(config, stored)
    if config.get("model_type") == "ernie4_5_moe":
        return ernie_moe_names(stored)
    if config.get("model_type") in SPLIT_EXPERTS and any(name.endswith(GPT_OSS_EXPERTS) for name in stored):
        return expert_parts(config, stored)
    if config.get("model_type") in ("stablelm", "glm4_moe"):
        return rotated_first_parts(config, stored)
    if config.get("model_type") == "glm4":
        return glm4_parts(config, stored)
    if base_model_save(stored):
        return {BASE_MODEL_PREFIX + name: StoredTensor(name) for name in stored}
    return None
