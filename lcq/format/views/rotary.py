"""Families whose rotary embeddings (and fused projections) read as Llama's, Mistral's or Qwen2's, exactly.

- Phi-3 and Phi-4 (Phi3ForCausalLM) are Mistral's decoder (sliding window included) with q/k/v and
  gate/up each stored as one matrix. They read as Mistral, each part a range of the fused matrix's rows
  (read alone from the file), so every part is quantized and fused again as in the other families.
  Phi-4-mini's partial rotary embedding reads as a whole-head one, exactly: its query and key rows
  reordered within each head, LongRoPE factors that give the rotated dimensions their frequencies and
  the others none (_phi3_rotation).
- InternLM3 is Llama's decoder with its own config defaults (head_dim 128); ERNIE 4.5 (dense) and Helium
  are Llama's decoder with a rotary embedding that turns adjacent pairs of dimensions (2i, 2i + 1), where
  Llama's turns (i, i + d/2). They read as Llama, ERNIE's and Helium's with each query and key head's rows
  reordered, even ones first (half_split_parts).
- GLM-4 (glm-4-9b-chat-hf, glm-4-9b-hf, GLM-Edge: GlmForCausalLM) is Qwen2's decoder (Llama's where it
  has no q/k/v biases) with gate/up stored as one matrix and a rotary embedding that turns adjacent pairs
  (2i, 2i + 1) of each head's first half only. It reads as Qwen2 with gate/up split as Phi-3's and each
  query and key head's rows reordered as Phi-4-mini's, adjacent pairs first (_rotated_first).
- GLM-4-0414 (GLM-4-9B-0414, GLM-4-32B-0414, GLM-Z1: Glm4ForCausalLM) is GLM-4's layer with norms on the
  attention's and the MLP's outputs too. It reads as itself, with gate/up split as Phi-3's and its rotary
  embedding over half of each head as an interleaved whole-head one (LongRoPE factors that turn the other
  pairs by angle 0, exact in transformers too), which lcq runs natively (ModelConfig.rotary_interleaved).
  transformers' Glm4ForCausalLM computes the same with its MLP's gate_up_proj as two matrices
  (lcq.quantizer.reference.as_stored), which is how its LCQ checkpoints store them.
- StableLM (StableLmForCausalLM: StableLM 2, StableLM 3B) turns pairs (i, i + r/2) of each head's first r
  dimensions only; it reads as itself with Phi-4-mini's row order and the same LongRoPE factors, a
  whole-head rotary embedding that transformers runs alike. GLM-4.5 (Glm4MoeForCausalLM: GLM-4.5,
  GLM-4.5-Air) turns half of each head the same way and reads so too, its per-head q/k norms' weights
  in the same order.
"""
from __future__ import annotations

import math
from typing import Any

from .common import KEPT, StoredTensor, ViewError, split_rows, with_defaults

# Llama's layer under other names (model types, and their architectures); INTERLEAVED: with the rotary
# embedding turning adjacent pairs of dimensions.
AS_LLAMA = {"ernie4_5": "Ernie4_5ForCausalLM", "helium": "HeliumForCausalLM", "internlm3": "InternLM3ForCausalLM"}
INTERLEAVED = ("ernie4_5", "helium")
# Families read as themselves with their partial rotary embeddings over whole heads (whole_head_config).
WHOLE_HEAD = {"glm4": "Glm4ForCausalLM", "stablelm": "StableLmForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}
# LongRoPE's factor for the frequencies that must not turn (a partial rotary embedding's other dimensions).
UNTURNED = 1e30


def phi3_as_mistral(config: dict[str, Any]) -> dict[str, Any]:
    """Phi-3's config as Mistral's. Long-context rotary scaling (Phi-3.5, the 128k Phi-3 models) becomes
    Mistral's LongRoPE settings, with the original context length Phi-3 keeps at the top level (4096 by
    default, as transformers reads it) and the older names of the type ("su", "yarn") read as transformers
    does. A partial rotary embedding (Phi-4-mini: 96 of 128 dimensions) becomes a whole-head one
    (_phi3_rotation)."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "longrope", "su", "yarn"):
        raise ViewError(f"Phi3ForCausalLM: rope type {kind!r} is not supported")
    rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    head_dim, rotary, _ = _phi3_rotation(config)
    settings = {"rope_type": "default", "rope_theta": rope_theta}
    if kind != "default" or rotary < head_dim:
        original = config.get("original_max_position_embeddings", 4096) if kind != "default" else \
            config.get("max_position_embeddings", 4096)
        settings = {**{key: value for key, value in rope.items() if key not in ("type", "partial_rotary_factor")},
                    **settings, "rope_type": "longrope", "original_max_position_embeddings": original}
        settings.setdefault("factor", config.get("max_position_embeddings", 4096) / original)  # transformers' default
    if rotary < head_dim:
        for factors in ("short_factor", "long_factor"):
            values = rope.get(factors) or rope.get("short_factor") or [1.0] * (rotary // 2)
            if len(values) != rotary // 2:
                raise ViewError(f"Phi3ForCausalLM: longrope needs {rotary // 2} {factors} values (one per rotary "
                                f"frequency), config.json gives {len(values)}")
            settings[factors] = _whole_head_factors(values, rope_theta, rotary, head_dim)
        settings["attention_factor"] = 1.0  # folded into the queries' rotated rows (phi3_parts)
    kept = {key: config[key] for key in KEPT if key in config and key not in ("rope_parameters", "rope_scaling")}
    return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", **kept, "rope_theta": rope_theta,
            "rope_parameters": settings, "head_dim": head_dim}


def _phi3_rotation(config: dict[str, Any]) -> tuple[int, int, float]:
    """A Phi-3 config's head_dim, rotary dimensions and, where they are fewer than head_dim, the LongRoPE
    attention factor that scales their cos and sin (1.0 otherwise).

    A partial rotary embedding rotates pairs (i, i + r/2) of a head's first r dimensions and leaves the rest
    as they are; Mistral's rotates pairs (i, i + d/2) of all d. Reordering each query and key head's rows
    (the first r/2, the first half of the rest, the second r/2, the second half of the rest) makes the
    rotated pairs Mistral's first r/2, whose frequencies LongRoPE's per-frequency factors can give
    exactly; the other pairs get factors so large (UNTURNED) that their angle is 0 in fp32 at any position
    (cos 1, sin below 1e-28). Scores are sums over a head's dimensions, so reordering both sides leaves
    them as they were. Mistral would scale the unrotated pairs' cos by the attention factor too, so the
    view sets it to 1 and scales the queries' rotated rows by its square instead (both the query's and
    the key's factor)."""
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    rotary = int(head_dim * partial)
    if rotary == head_dim:
        return head_dim, head_dim, 1.0
    if rotary <= 0 or rotary % 2 or (head_dim - rotary) % 2:
        raise ViewError(f"Phi3ForCausalLM: partial_rotary_factor {partial} rotates {rotary} of a head's {head_dim} "
                        f"dimensions; only even numbers of rotated and unrotated dimensions are supported")
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        original = config.get("original_max_position_embeddings", 4096)
        factor = rope.get("factor") or config.get("max_position_embeddings", 4096) / original
        is_scaled = rope.get("rope_type", rope.get("type", "default")) != "default" and factor > 1
        attention_factor = math.sqrt(1 + math.log(factor) / math.log(original)) if is_scaled else 1.0
    return head_dim, rotary, float(attention_factor)


def phi3_parts(config: dict[str, Any], stored: list[str]) -> dict[str, StoredTensor]:
    """Every stored tensor under its own name, but each fused projection as its parts' row ranges; with a
    partial rotary embedding, the query and key rows reordered and the rotated query rows scaled
    (_phi3_rotation)."""
    head_dim, rotary, attention_factor = _phi3_rotation(config)
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    queries, keys = heads * head_dim, kv_heads * head_dim
    intermediate = config["intermediate_size"]
    within = _rotated_first(head_dim, rotary, interleaved=False)

    def reordered(count: int) -> tuple[int, ...] | None:
        return None if rotary == head_dim else tuple(h * head_dim + i for h in range(count) for i in within)

    query_scales = 1.0 if rotary == head_dim else \
        tuple(attention_factor ** 2 if i < rotary else 1.0 for _ in range(heads) for i in within)
    fused = {"self_attn.qkv_proj.weight": (("self_attn.q_proj.weight", 0, queries, query_scales, reordered(heads)),
                                           ("self_attn.k_proj.weight", queries, queries + keys, 1.0,
                                            reordered(kv_heads)),
                                           ("self_attn.v_proj.weight", queries + keys, queries + 2 * keys, 1.0, None)),
             "mlp.gate_up_proj.weight": (("mlp.gate_proj.weight", 0, intermediate, 1.0, None),
                                         ("mlp.up_proj.weight", intermediate, 2 * intermediate, 1.0, None))}
    return split_rows(stored, fused)


def _rotated_first(head_dim: int, rotary: int, interleaved: bool) -> list[int]:
    """The order of a head's rows that makes a rotary embedding over its first `rotary` dimensions, which
    turns pairs (i, i + rotary/2) or, interleaved, (2i, 2i + 1), into Llama's over whole heads (pairs
    (i, i + head_dim/2)) with the rotated pairs first: the pairs' first members, the first half of the
    unrotated dimensions, the pairs' second members, the rest."""
    rest = (head_dim - rotary) // 2
    firsts, seconds = (range(0, rotary, 2), range(1, rotary, 2)) if interleaved else \
        (range(rotary // 2), range(rotary // 2, rotary))
    return [*firsts, *range(rotary, rotary + rest), *seconds, *range(rotary + rest, head_dim)]


def _whole_head_factors(values: list[float], rope_theta: float, rotary: int, head_dim: int) -> list[float]:
    """LongRoPE per-frequency factors that turn whole-head pair j (frequency rope_theta^(-2j/head_dim)) at a
    partial embedding's frequency j (rope_theta^(-2j/rotary)) divided by values[j], and the pairs past
    rotary/2 not at all (UNTURNED)."""
    return [value * rope_theta ** (2 * j / rotary - 2 * j / head_dim) for j, value in enumerate(values)] + \
        [UNTURNED] * ((head_dim - rotary) // 2)


def glm_as_qwen2(config: dict[str, Any]) -> dict[str, Any]:
    """GLM-4's config (transformers' defaults for what it leaves out) as Qwen2's, or Llama's without q/k/v
    biases; a rotary embedding over part of each head as a whole-head LongRoPE one whose factors give the
    rotated pairs their frequencies and the others none, over the model's own context (factor 1, so no
    attention factor)."""
    completed = with_defaults(config, "GlmForCausalLM")
    head_dim, _ = _partial_rotation(completed, "GlmForCausalLM")
    settings = _whole_head_rope(completed, "GlmForCausalLM")
    kept = {key: completed[key] for key in KEPT
            if key in completed and key not in ("rope_parameters", "rope_scaling", "sliding_window")}
    family = ("qwen2", "Qwen2ForCausalLM") if completed.get("attention_bias") else ("llama", "LlamaForCausalLM")
    return {**kept, "architectures": [family[1]], "model_type": family[0], "head_dim": head_dim,
            "rope_theta": settings["rope_theta"], "rope_parameters": settings}


def glm4_parts(config: dict[str, Any], stored: list[str]) -> dict[str, StoredTensor]:
    """GLM-4-0414's tensors under their own names, its fused gate/up as its parts' row ranges (its rotary
    embedding is read natively, adjacent pairs over whole heads: whole_head_config)."""
    intermediate = with_defaults(config, "Glm4ForCausalLM")["intermediate_size"]
    return split_rows(stored, {"mlp.gate_up_proj.weight": (("mlp.gate_proj.weight", 0, intermediate, 1.0, None),
                                                           ("mlp.up_proj.weight", intermediate, 2 * intermediate,
                                                            1.0, None))})


def whole_head_config(config: dict[str, Any], architecture: str) -> dict[str, Any]:
    """A GLM-4-0414, StableLM or GLM-4.5 config (transformers' defaults completed) with its partial rotary
    embedding over whole heads (_whole_head_rope): what transformers' own class runs alike, GLM-4-0414's
    pairs still adjacent ones (ModelConfig.rotary_interleaved), StableLM's and GLM-4.5's rows reordered
    (rotated_first_parts). A config already so (an LCQ checkpoint's) is kept."""
    completed = with_defaults(config, architecture)
    rope = completed.get("rope_parameters") or {}
    if rope.get("partial_rotary_factor", 1.0) == 1.0 and rope.get("rope_type") == "longrope":
        return completed
    return {**completed, "partial_rotary_factor": 1.0, "rope_parameters": _whole_head_rope(completed, architecture)}


def _whole_head_rope(completed: dict[str, Any], architecture: str) -> dict[str, Any]:
    """A GLM or StableLM config's rotary settings over whole heads: LongRoPE factors giving the first
    partial_rotary_factor of each head's pairs their frequencies and the others none, over the model's own
    context (factor 1, so no attention factor); plain RoPE where it turns whole heads already."""
    rope = completed.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ViewError(f"{architecture}: rope type {rope['rope_type']!r} is not supported")
    head_dim, rotary = _partial_rotation(completed, architecture)
    rope_theta = rope.get("rope_theta", 10000.0)
    if rotary == head_dim:
        return {"rope_type": "default", "rope_theta": rope_theta}
    factors = _whole_head_factors([1.0] * (rotary // 2), rope_theta, rotary, head_dim)
    return {"rope_type": "longrope", "rope_theta": rope_theta, "partial_rotary_factor": 1.0,
            "original_max_position_embeddings": completed["max_position_embeddings"], "factor": 1.0,
            "attention_factor": 1.0, "short_factor": factors, "long_factor": list(factors)}


def rotated_first_parts(config: dict[str, Any], stored: list[str]) -> dict[str, StoredTensor]:
    """Every stored tensor under its own name, each query and key head's rows (weights and biases, and the
    per-head q/k norms' weights: GLM-4.5's) in _rotated_first's order for a partial rotary embedding over
    pairs (i, i + r/2) (StableLM's, GLM-4.5's; none for an LCQ checkpoint's whole-head one)."""
    architecture = WHOLE_HEAD[config["model_type"]]
    completed = with_defaults(config, architecture)
    head_dim, rotary = _partial_rotation(completed, architecture)
    return split_rows(stored, _head_rows(completed, head_dim, _rotated_first(head_dim, rotary, interleaved=False)))


def _head_rows(completed: dict[str, Any], head_dim: int, within: list[int]) -> dict[str, tuple]:
    """split_rows's entries that read each query and key head's rows (weights and biases) in the order
    `within`, and per-head q/k norms' weights in that order too (GLM-4.5's, one for every head; StableLM 2 12B's,
    a LayerNorm module per head: q_layernorm.norms.H)."""
    heads, kv_heads = completed["num_attention_heads"], completed.get("num_key_value_heads") or completed[
        "num_attention_heads"]
    orders = {"q_proj": heads, "k_proj": kv_heads, "q_norm": 1, "k_norm": 1,
              **{f"q_layernorm.norms.{h}": 1 for h in range(heads)},
              **{f"k_layernorm.norms.{h}": 1 for h in range(kv_heads)}}
    return {f"self_attn.{part}.{kind}": ((f"self_attn.{part}.{kind}", None, None, 1.0,
                                           tuple(h * head_dim + i for h in range(count) for i in within)),)
            for part, count in orders.items() for kind in ("weight", "bias")}


def _partial_rotation(config: dict[str, Any], architecture: str) -> tuple[int, int]:
    """A completed config's head_dim and the dimensions of each head its rotary embedding turns."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    partial = (config.get("rope_parameters") or {}).get("partial_rotary_factor",
                                                        config.get("partial_rotary_factor", 1.0))
    rotary = int(head_dim * partial)
    if rotary <= 0 or rotary % 2 or (head_dim - rotary) % 2:
        raise ViewError(f"{architecture}: partial_rotary_factor {partial} rotates {rotary} of a head's {head_dim} "
                        f"dimensions; only even numbers of rotated and unrotated dimensions are supported")
    return head_dim, rotary


def glm_parts(config: dict[str, Any], stored: list[str]) -> dict[str, StoredTensor]:
    """Every stored tensor under its own name, gate/up as its parts' row ranges, and each query and key
    head's rows (weights and biases) in _rotated_first's order."""
    completed = with_defaults(config, "GlmForCausalLM")
    head_dim, rotary = _partial_rotation(completed, "GlmForCausalLM")
    fused = _head_rows(completed, head_dim, _rotated_first(head_dim, rotary, interleaved=True))
    intermediate = completed["intermediate_size"]
    fused["mlp.gate_up_proj.weight"] = (("mlp.gate_proj.weight", 0, intermediate, 1.0, None),
                                        ("mlp.up_proj.weight", intermediate, 2 * intermediate, 1.0, None))
    return split_rows(stored, fused)


def as_llama(config: dict[str, Any]) -> dict[str, Any]:
    """ERNIE 4.5's, Helium's and InternLM3's config (transformers' defaults for what it leaves out: theirs
    are not Llama's) as Llama's; ERNIE's use_bias is every linear layer's bias, InternLM3's qkv_bias and
    bias (which transformers requires equal) the attention's."""
    completed = with_defaults(config, AS_LLAMA[config["model_type"]])
    kept = {key: completed[key] for key in KEPT if key in completed and key != "sliding_window"}
    biases = {"attention_bias": completed["use_bias"], "mlp_bias": completed["use_bias"]} \
        if "use_bias" in completed else {}
    return {**kept, **biases, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "head_dim": completed.get("head_dim") or completed["hidden_size"] // completed["num_attention_heads"]}


def half_split_parts(config: dict[str, Any], stored: list[str]) -> dict[str, StoredTensor]:
    """Every stored tensor under its own name, each query and key head's rows (and biases) reordered so
    that the pairs an interleaved rotary embedding turns, (2i, 2i + 1), are Llama's (i, i + d/2): the
    even rows, then the odd ones. Scores are sums over a head's dimensions, so reordering both sides
    leaves them as they were; values and outputs keep their order."""
    head_dim = config["head_dim"]
    within = _rotated_first(head_dim, head_dim, interleaved=True)
    heads = {"self_attn.q_proj.": config["num_attention_heads"],
             "self_attn.k_proj.": config.get("num_key_value_heads") or config["num_attention_heads"]}
    view = {}
    for name in stored:
        count = next((n for part, n in heads.items() if part in name), None)
        order = None if count is None else tuple(h * head_dim + i for h in range(count) for i in within)
        view[name] = StoredTensor(name, order=order)
    return view
