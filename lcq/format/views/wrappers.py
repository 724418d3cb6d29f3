"""Language models inside other folders, read alone.

- Multimodal wrappers (Gemma 3 from 4B up: Gemma3ForConditionalGeneration; Mistral Small 3.1:
  Mistral3ForConditionalGeneration; LlavaForConditionalGeneration; SmolVLM: Idefics3 and
  SmolVLMForConditionalGeneration; InternVL3: InternVLForConditionalGeneration) keep a Llama-family
  language model beside a vision tower: its config under `text_config`, its tensors under a prefix. They read as that
  language model alone (its config completed with transformers' defaults, since the Hub's files leave
  out every default); the vision tower and projector are never read.
- Qwen's vision-language models (Qwen2-VL, Qwen2.5-VL: Qwen2's decoder; Qwen3-VL: Qwen3's) read the
  same way, as Qwen2ForCausalLM or Qwen3ForCausalLM. Their multimodal rotary embedding gives each token
  three position components (time, height, width), which for text are all the token's position: the
  rotation is then ordinary RoPE at the same base. Qwen2.5-VL's files keep the text settings at the top
  level (no text_config) and the text model's tensors under their CausalLM names, the vision tower's
  under visual.*; Qwen3-VL's visual embeddings added to early layers (deepstack) come only with images.
  Qwen3-VL-MoE reads as Qwen3-MoE, its router renormalizing as it always does; its experts are 3-D tensors
  (gate's columns, then up's), (in, out) in the Hub's files and (out, in) as transformers 5 saves them,
  told apart by shape as transformers does (read as stored where it has the (out, in) shape, square ones
  included), read as each expert's gate_proj, up_proj and down_proj.
- Folders saved from the base model (Qwen3-Embedding 4B and 8B: tensors named layers.*, embed_tokens.*,
  norm.*, no head) read with the model. prefix, their head tied to the embedding table (an embedding
  model is served for /v1/embeddings, which reads no head).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .common import StoredTensor, ViewError, completed_config
from .experts import SPLIT_EXPERTS, expert_parts

# Qwen's vision-language wrappers and the family each one's text model reads as.
QWEN_VL = {"Qwen2VLForConditionalGeneration": "qwen2", "Qwen2_5_VLForConditionalGeneration": "qwen2",
           "Qwen3VLForConditionalGeneration": "qwen3", "Qwen3VLMoeForConditionalGeneration": "qwen3_moe"}
QWEN_CAUSAL_LM = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
WRAPPERS = ("Gemma3ForConditionalGeneration", "Mistral3ForConditionalGeneration", "LlavaForConditionalGeneration",
            "Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration", "InternVLForConditionalGeneration",
            "Llama4ForConditionalGeneration", "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration",
            *QWEN_VL)
# Where a wrapper keeps the language model's tensors, and their text-model names: the Hub's files (and
# what transformers writes) first, then transformers 4.52-4.57's own saves; Qwen3.5's multi-token-prediction
# layer beside them (lcq/format/mtp.py).
TEXT_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                 ("model.language_model.", "model."), ("model.text_model.", "model."), ("lm_head.", "lm_head."),
                 ("mtp.", "mtp."),
                 *((f"model.{part}.", f"model.{part}.") for part in ("layers", "embed_tokens", "norm")))  # Qwen2.5-VL
BASE_MODEL_PREFIX = "model."  # what a CausalLM's tensor names have that its base model's lack
# Top-level settings a wrapper's text model inherits where its text_config has none (its quantization_config:
# a quantized release's (GPTQ, AWQ, bitsandbytes, int8 compressed-tensors) is refused as a plain folder's is,
# not read as full precision; FP8's is decoded before this, in view_config).
INHERITED = ("torch_dtype", "dtype", "quantization_config")
# Top-level settings that win over text_config's: transformers ties a wrapper's head to its embedding
# table by the wrapper's own setting (a Mistral3 whose text_config says untied is saved without a head).
OVERRIDING = ("tie_word_embeddings",)


def wrapper_tensors(config: dict[str, Any], architecture: str, stored: list[str]) -> dict[str, StoredTensor]:
    """A wrapper's text model's tensors under their text-model names (Llama 4's 3-D experts as each expert's)."""
    texts = {text: name for name in stored if (text := text_model_name(name)) is not None}
    text_config = text_model_config(config, architecture)
    if text_config["model_type"] not in SPLIT_EXPERTS:
        return {text: StoredTensor(name) for text, name in texts.items()}
    return {view: dataclasses.replace(part, name=texts[part.name])
            for view, part in expert_parts(text_config, list(texts)).items()}


def base_model_save(stored: list[str]) -> bool:
    """Saved from the base model: decoder layers without the CausalLM's model. prefix, and no head."""
    return any(name.startswith("layers.") for name in stored) and \
        not any(name.startswith((BASE_MODEL_PREFIX, "lm_head.")) for name in stored)


def text_model_config(config: dict[str, Any], architecture: str) -> dict[str, Any]:
    text = dict(config.get("text_config") or {})
    if not text and architecture in QWEN_VL and "model_type" in config:  # Qwen2(.5)-VL: the settings at the top
        text = {key: value for key, value in config.items() if key not in ("vision_config", "architectures")}
        text["model_type"] = f"{text['model_type']}_text"
    if "model_type" not in text:
        raise ViewError(f"{architecture}: text_config has no model_type")
    model_type = text.pop("model_type")
    completed = completed_config(model_type, text, architecture)
    for key in INHERITED:
        if completed.get(key) is None and key in config:
            completed[key] = config[key]
    completed.update({key: config[key] for key in OVERRIDING if key in config})
    return _qwen_vl_text(completed, architecture) if architecture in QWEN_VL else completed


def _qwen_vl_text(config: dict[str, Any], architecture: str) -> dict[str, Any]:
    """A Qwen VL text model's completed config as its family's: the multimodal rotary settings as ordinary
    RoPE at their base (what they are for text alone)."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    kind = rope.get("rope_type", "default") if rope.get("type") != "mrope" else "mrope"
    if kind not in ("default", "mrope"):
        raise ViewError(f"{architecture}: rope type {kind!r} is not supported")
    family = QWEN_VL[architecture]
    config = {key: value for key, value in config.items() if key not in ("rope_parameters", "rope_scaling")}
    if family == "qwen3_moe":  # Qwen3-VL-MoE's router always renormalizes the chosen experts' weights
        config["norm_topk_prob"] = True
    return {**config, "model_type": family, "architectures": [QWEN_CAUSAL_LM[family]],
            "rope_parameters": {"rope_type": "default", "rope_theta": rope.get("rope_theta", config.get("rope_theta"))}}


def text_model_name(name: str) -> str | None:
    """A wrapper's stored tensor name as the text model's, or None for the other parts' tensors."""
    for stored, text in TEXT_PREFIXES:
        if name.startswith(stored):
            return text + name[len(stored):]
    return None
