"""What a model's generation_config.json tells the engine: its end-of-sequence ids and the sampling
its makers tuned it for.

Chat models ship sampling defaults (Qwen3: temperature 0.6, top_p 0.95, top_k 20; Llama 3 Instruct:
0.6 and 0.9), and a thinking model decoded greedily or at temperature 1 loops or rambles. As vLLM
does by default (`--generation-config auto`), a request that leaves a setting unset gets the model's
value; `vllm` keeps the built-in (OpenAI) defaults; a folder reads its generation_config.json instead.
"""
from __future__ import annotations

import json
from pathlib import Path

from .sampling_params import SamplingParams

FILE = "generation_config.json"
# generation_config.json key -> SamplingParams field (vLLM reads the same six)
SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def read_generation_config(folder: str | Path) -> dict:
    """The folder's generation_config.json as a dict; {} where it has none."""
    path = Path(folder) / FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    return config


def eos_token_ids(model_dir: str | Path, tokenizer) -> set[int]:
    """EOS ids from the tokenizer and generation_config.json (chat models often list several)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    value = read_generation_config(model_dir).get("eos_token_id")
    ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    return ids


def sampling_defaults(setting: str, model_dir: str | Path, override: dict | None = None) -> dict[str, float | int]:
    """The SamplingParams fields a request leaves unset take these values: the model's (`auto`),
    none (`vllm`), or those of another folder's generation_config.json, each key of `override` (vLLM's
    --override-generation-config, in generation_config.json's names) replacing the file's. ValueError for a
    setting that names no such folder or file, a key no request setting takes, or values outside what a request
    may ask."""
    if unknown := sorted(set(override or {}) - set(SAMPLING_KEYS)):
        raise ValueError(f"override_generation_config: {', '.join(map(repr, unknown))} not read (it takes "
                         f"{', '.join(SAMPLING_KEYS)})")
    folder = Path(model_dir if setting in ("auto", "vllm") else setting)
    if setting not in ("auto", "vllm") and not (folder / FILE).is_file():
        raise ValueError(f"generation_config must be auto, vllm or a folder holding {FILE} (got {setting})")
    config = {**({} if setting == "vllm" else read_generation_config(folder)), **(override or {})}
    defaults = {name: config[key] for key, name in SAMPLING_KEYS.items() if config.get(key) is not None}
    try:
        SamplingParams(**defaults).validate()
    except (TypeError, ValueError) as e:
        where = "override_generation_config" if override and setting == "vllm" else \
            f"{folder / FILE}{' with override_generation_config' if override else ''}"
        raise ValueError(f"{where}: {e}") from None
    return defaults
