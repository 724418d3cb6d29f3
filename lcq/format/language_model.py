"""The text model inside a multimodal checkpoint, read as a checkpoint of its own.

Gemma 3 from 4B up (Gemma3ForConditionalGeneration), Mistral Small 3.1 (Mistral3ForConditionalGeneration)
and LLaVA-style models keep a Llama-family language model beside a vision tower: its config under
`text_config` and its tensors under a prefix. lcq serves and quantizes that language model alone, so a
reader sees the text model's config (completed with transformers' defaults, since the Hub's files
leave out every default) and the text model's tensor names; the vision tower and projector are never
read. A quantized result is a plain text checkpoint (its config says Gemma3ForCausalLM, ...).
"""
from __future__ import annotations

from typing import Any

WRAPPERS = ("Gemma3ForConditionalGeneration", "Mistral3ForConditionalGeneration", "LlavaForConditionalGeneration")
# Where a wrapper keeps the language model's tensors, and their text-model names: the Hub's files (and
# what transformers writes) first, then transformers 4.52-4.57's own saves.
TEXT_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                 ("model.language_model.", "model."), ("lm_head.", "lm_head."))
# Top-level settings a wrapper's text model inherits where its text_config has none.
INHERITED = ("torch_dtype", "dtype")
# Top-level settings that win over text_config's: transformers ties a wrapper's head to its embedding
# table by the wrapper's own setting (a Mistral3 whose text_config says untied is saved without a head).
OVERRIDING = ("tie_word_embeddings",)


class LanguageModelError(ValueError):
    """A multimodal checkpoint whose language model cannot be read."""


def is_wrapper(config: dict[str, Any]) -> bool:
    architectures = config.get("architectures") or []
    return bool(architectures) and architectures[0] in WRAPPERS


def language_model_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json of the model lcq runs: `config` itself, or a wrapper's text model as a CausalLM config
    (its defaults filled in by transformers)."""
    if not is_wrapper(config):
        return config
    text = dict(config.get("text_config") or {})
    if "model_type" not in text:
        raise LanguageModelError(f"{config['architectures'][0]}: text_config has no model_type")
    try:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        model_type = text.pop("model_type")
        completed = AutoConfig.for_model(model_type, **text).to_dict()
    except (ImportError, ValueError, KeyError) as e:
        raise LanguageModelError(f"{config['architectures'][0]}: this transformers cannot read its text model "
                                 f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    for key in ("transformers_version", "_name_or_path", "id2label", "label2id"):
        completed.pop(key, None)
    for key in INHERITED:
        if completed.get(key) is None and key in config:
            completed[key] = config[key]
    completed.update({key: config[key] for key in OVERRIDING if key in config})
    completed["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, model_type)]
    return completed


def text_model_name(name: str) -> str | None:
    """A wrapper's stored tensor name as the text model's, or None for the other parts' tensors."""
    for stored, text in TEXT_PREFIXES:
        if name.startswith(stored):
            return text + name[len(stored):]
    return None
