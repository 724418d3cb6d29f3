"""What each layer of a model does with attention, as transformers reads the config: its sliding window or
attention chunks, and whether it applies the rotary embedding."""
from __future__ import annotations

from .families import GEMMA


def layer_windows(c: dict) -> list[int]:
    """Each layer's sliding window (0: full attention), as transformers reads the config: Gemma's
    layer_types (or every sliding_window_pattern-th layer full: Gemma 3's every 6th, Gemma 2's every
    2nd), all of Mistral's layers, Qwen2/3's layers from max_window_layers on where use_sliding_window
    is set, and all of Qwen3-MoE's then."""
    count, kind = c["num_hidden_layers"], c["model_type"]
    if kind in GEMMA:
        window = c.get("sliding_window") or 4096
        pattern = c.get("sliding_window_pattern", 2 if kind == "gemma2" else 6)
        default = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(count)]
    elif kind in ("mistral", "ministral3", "mixtral"):
        return [c.get("sliding_window") or 0] * count
    elif kind == "qwen3_moe":  # every layer where use_sliding_window is set: its config has no max_window_layers
        return [(c.get("sliding_window") or 0) if c.get("use_sliding_window") else 0] * count
    elif kind == "exaone4":
        window, default = c.get("sliding_window"), _exaone4_layer_types(c)
    elif kind == "cohere2":
        window, default = c.get("sliding_window"), _cohere2_layer_types(c)
    elif kind == "dots1":  # its layer_types' sliding layers, whatever use_sliding_window says (as transformers)
        window, default = c.get("sliding_window"), ["full_attention"] * count
    elif kind == "gpt_oss":  # every other layer sliding, from the first, as transformers' GptOssConfig has it
        window = c.get("sliding_window", 128)
        default = ["full_attention" if i % 2 else "sliding_attention" for i in range(count)]
    elif kind == "olmo3":  # every 4th layer full, as transformers' Olmo3Config has it
        window = c.get("sliding_window", 4096)
        default = ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(count)]
    else:
        window = c.get("sliding_window") if c.get("use_sliding_window") else None
        first = c.get("max_window_layers", 28)
        default = ["sliding_attention" if window and i >= first else "full_attention" for i in range(count)]
    types = c.get("layer_types") or default
    return [(window or 0) if layer == "sliding_attention" else 0 for layer in types]


def _cohere2_layer_types(c: dict) -> list[str]:
    """Cohere 2's layer types where its config has none: every sliding_window_pattern-th layer (4th) full."""
    pattern = c.get("sliding_window_pattern") or 4
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(c["num_hidden_layers"])]


def _exaone4_layer_types(c: dict) -> list[str]:
    """EXAONE 4's layers as its config describes them without layer_types: sliding_window_pattern an
    interval (every n-th layer full) or a string of L (local) and G (global) repeated; all full without a
    sliding window."""
    count, pattern = c["num_hidden_layers"], c.get("sliding_window_pattern", 4)
    if not c.get("sliding_window") or not pattern:
        return ["full_attention"] * count
    if isinstance(pattern, str):
        return ["full_attention" if pattern[i % len(pattern)] == "G" else "sliding_attention" for i in range(count)]
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(count)]


def rope_layers(c: dict) -> list[bool]:
    """Which layers apply the rotary embedding, as transformers reads SmolLM3's config (no_rope_layers, 1
    where a layer does; by default every no_rope_layer_interval-th layer does not), EXAONE 4's (with a
    sliding window only its sliding layers do: the global ones are NoPE), Cohere 2's (its sliding layers
    only), Granite 4.0-H's (none with position_embedding_type nope) and Nemotron-H's (none); [] for the others."""
    if c["model_type"] == "exaone4":
        types = c.get("layer_types") or _exaone4_layer_types(c)
        return [not c.get("sliding_window") or kind == "sliding_attention" for kind in types]
    if c["model_type"] == "granitemoehybrid":  # Granite 4.0-H's attention: NoPE, unless position_embedding_type rope
        return [c.get("position_embedding_type") == "rope"] * c["num_hidden_layers"]
    if c["model_type"] == "nemotron_h":  # its attention has no rotary embedding
        return [False] * c["num_hidden_layers"]
    if c["model_type"] == "cohere2":  # only its sliding-window layers turn (Command R7B, Command A)
        return [kind == "sliding_attention" for kind in c.get("layer_types") or _cohere2_layer_types(c)]
    if c["model_type"] not in ("smollm3", "llama4_text"):
        return []
    interval = c.get("no_rope_layer_interval", 4)
    flags = c.get("no_rope_layers") or [(i + 1) % interval != 0 for i in range(c["num_hidden_layers"])]
    return [bool(flag) for flag in flags[:c["num_hidden_layers"]]]


def layer_chunks(c: dict) -> list[int]:
    """Llama 4's chunked attention: its layer_types' chunked_attention layers (by default its rotary ones,
    as transformers reads the config) attend within chunks of attention_chunk_size tokens; [] for the
    others."""
    chunk = c.get("attention_chunk_size") if c["model_type"] == "llama4_text" else None
    if not chunk:
        return []
    types = c.get("layer_types") or ["chunked_attention" if rope else "full_attention" for rope in rope_layers(c)]
    return [chunk if kind == "chunked_attention" else 0 for kind in types]
