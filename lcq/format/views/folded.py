"""Families with constant factors in their layers, folded into the weights (exactly) and made neutral in
the config.

- Granite 3 (GraniteForCausalLM) is Llama with four constant factors, each folded into weights, exactly:
  the attention scores' factor into q_proj (Llama's is 1/sqrt(head_dim)); the residual factor, and one
  over the embedding factor, into o_proj and down_proj (the residual stream then runs 1/embedding_factor
  as large, which the RMSNorms do not see once their epsilon is divided by its square); one over the
  logits' divisor into the final norm's weight. Scaled tensors are read in fp32. Granite 4.0's dense
  attention-only models (granite-4.0-micro: GraniteMoeHybridForCausalLM) are the same with their MLP
  stored as a shared expert (input_linear: gate and up; output_linear: down). Granite 4.0-H (Mamba-2
  layers, and experts in h-tiny and h-small) reads as itself with the residual, attention and logits
  factors folded the same way (Mamba-2's out_proj and every down_proj taking the residual one) and made
  neutral in its config, its embeddings keeping theirs; its dense MLP's input_linear as gate_proj and
  up_proj, its experts' 3-D input_linear and output_linear as each expert's matrices, its router's
  router.layer as router (_granite4_hybrid_parts: transformers' modules as lcq.quantizer.reference.as_stored
  splits them). Granite 3's mixtures (GraniteMoeForCausalLM: granite-3.1-1b-a400m, 3b-a800m;
  GraniteMoeSharedForCausalLM, with a dense MLP beside the experts) read as themselves the same way: Granite
  4.0-H's layer with attention (rotary) in every layer.
- Falcon-H1 (FalconH1ForCausalLM) reads as itself with its factors folded into weights, exactly, and made
  neutral in its config (its embeddings' and logits' kept): the attention's input and output factors (and the
  keys' own), Mamba-2's input and output factors and the per-part factors of its in_proj rows (z, x, B, C and
  dt), the MLP's gate and down factors; a quantized checkpoint stays FalconH1ForCausalLM with them neutral.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from .common import KEPT, StoredTensor, ViewError, split_rows, with_defaults

# Granite's families with experts, read as themselves with their factors folded (granite_scales): model type ->
# architecture
GRANITE_EXPERTS = {"granitemoehybrid": "GraniteMoeHybridForCausalLM", "granitemoe": "GraniteMoeForCausalLM",
                   "granitemoeshared": "GraniteMoeSharedForCausalLM"}
# Falcon-H1's factors that are folded into weights (made neutral in its config), and their neutral values
FALCON_H1_FOLDED = {"key_multiplier": 1.0, "attention_in_multiplier": 1.0, "attention_out_multiplier": 1.0,
                    "ssm_in_multiplier": 1.0, "ssm_out_multiplier": 1.0, "mlp_multipliers": [1.0, 1.0],
                    "ssm_multipliers": [1.0] * 5}


def _granite_factors(config: dict[str, Any]) -> dict[str, float]:
    """Granite's four factors (transformers' defaults: 1)."""
    return {key: float(config.get(key, 1.0)) for key in
            ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")}


def granite_as_llama(config: dict[str, Any]) -> dict[str, Any]:
    kept = {key: config[key] for key in KEPT if key in config and key != "sliding_window"}
    embedding = _granite_factors(config)["embedding_multiplier"]
    if embedding <= 0:
        raise ViewError(f"GraniteForCausalLM: embedding_multiplier must be positive (got {embedding})")
    return {**kept, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "head_dim": config["hidden_size"] // config["num_attention_heads"],
            "rms_norm_eps": config.get("rms_norm_eps", 1e-6) / embedding ** 2}


def granite_scales(config: dict[str, Any], stored: list[str]) -> dict[str, StoredTensor]:
    """Every stored tensor under its own name (Granite 4.0's MLP under Llama's: _granite4_parts; Granite 4.0-H's
    parts: _granite4_hybrid_parts), the folded factors on q_proj, the output projections (attention's,
    Mamba-2's, every MLP's down_proj; weights and biases) and the final norm."""
    factors = _granite_factors(config)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    hybrid = config.get("model_type") in GRANITE_EXPERTS and not granite4_is_dense(config)  # read as itself
    # read as Llama, the residual stream runs 1/embedding_multiplier as large; Granite 4.0-H and Granite 3's
    # mixtures keep their embeddings'
    residual = factors["residual_multiplier"] / (1.0 if hybrid else factors["embedding_multiplier"])
    scales = {"q_proj": factors["attention_multiplier"] * head_dim ** 0.5, "o_proj": residual, "out_proj": residual,
              "down_proj": residual}
    if hybrid:
        view = _granite4_hybrid_parts(config, stored)
    elif config.get("model_type") == "granitemoehybrid":
        view = _granite4_parts(config, stored)
    else:
        view = {name: StoredTensor(name) for name in stored}
    for name, where in view.items():
        module, kind = name.rsplit(".", 1)
        scale = next((s for suffix, s in scales.items() if module.endswith("." + suffix)), 1.0)
        scale = 1.0 / factors["logits_scaling"] if name == "model.norm.weight" else scale
        if kind in ("weight", "bias") and not math.isclose(scale, 1.0, rel_tol=1e-12):  # (neutral factors:
            view[name] = dataclasses.replace(where, scale=scale)  # an LCQ checkpoint's, read as stored)
    return view


def granite4_is_dense(config: dict[str, Any]) -> bool:
    """A Granite 4.0 model of attention layers alone (the Hub's name, and transformers 5's), without experts
    (granite-4.0-micro): Granite 3's layer."""
    if config.get("model_type") != "granitemoehybrid":
        return False
    kinds = set(config.get("layer_types") or config.get("layers_block_type") or ["mamba"])
    return kinds <= {"attention", "full_attention"} and not config.get("num_local_experts", 8)


def granite_experts_config(config: dict[str, Any]) -> dict[str, Any]:
    """Granite 4.0-H's config, or that of Granite 3's mixtures (transformers' defaults completed), with the factors
    granite_scales folds into weights made neutral: the residual one, the attention's (head_dim^-0.5, as without
    it) and the logits'. The embeddings keep theirs (ModelConfig.embed_scale), so that every norm keeps its
    epsilon."""
    completed = with_defaults(config, GRANITE_EXPERTS[config["model_type"]])
    if config["model_type"] == "granitemoehybrid" and completed.get("position_embedding_type") not in ("nope", "rope"):
        raise ViewError(f"GraniteMoeHybridForCausalLM: position_embedding_type "
                        f"{completed.get('position_embedding_type')!r} is not supported (nope or rope)")
    head_dim = completed["hidden_size"] // completed["num_attention_heads"]
    return {**completed, "residual_multiplier": 1.0, "attention_multiplier": head_dim ** -0.5, "logits_scaling": 1.0}


def _granite4_hybrid_parts(config: dict[str, Any], stored: list[str]) -> dict[str, StoredTensor]:
    """Granite 4.0-H's (and Granite 3's mixtures') tensors under their own names, but its router's (router.layer:
    as transformers' router), its experts' 3-D input_linear (experts, gate's rows then up's, hidden) and
    output_linear as each expert's gate_proj, up_proj and down_proj, and its dense MLP's fused input_linear as
    gate_proj and up_proj (output_linear: down_proj)."""
    completed = with_defaults(config, GRANITE_EXPERTS[config["model_type"]])
    experts, width, shared = (completed["num_local_experts"], completed["intermediate_size"],
                              completed.get("shared_intermediate_size", 0))
    view = {}
    for name in stored:
        prefix, _, part = name.rpartition(".block_sparse_moe.")
        if prefix and part == "router.layer.weight":
            view[f"{prefix}.block_sparse_moe.router.weight"] = StoredTensor(name)
        elif prefix and part in ("input_linear.weight", "output_linear.weight"):
            rows = {"gate_proj": (0, width), "up_proj": (width, 2 * width)} if part.startswith("input") else \
                {"down_proj": None}
            view.update({f"{prefix}.block_sparse_moe.experts.{e}.{matrix}.weight": StoredTensor(name, span, expert=e)
                         for e in range(experts) for matrix, span in rows.items()})
        elif name.endswith(".shared_mlp.input_linear.weight"):
            base = name.removesuffix("input_linear.weight")
            view[base + "gate_proj.weight"] = StoredTensor(name, (0, shared))
            view[base + "up_proj.weight"] = StoredTensor(name, (shared, 2 * shared))
        elif name.endswith(".shared_mlp.output_linear.weight"):
            view[name.replace("output_linear", "down_proj")] = StoredTensor(name)
        else:
            view[name] = StoredTensor(name)
    return view


def granite4_as_llama(config: dict[str, Any]) -> dict[str, Any]:
    """Granite 4.0's dense attention-only models (granite-4.0-micro: GraniteMoeHybridForCausalLM with no
    Mamba layers and no experts) as Granite 3, its MLP's width the shared MLP's."""
    if config.get("position_embedding_type") != "rope":
        raise ViewError("GraniteMoeHybridForCausalLM: position_embedding_type "
                        f"{config.get('position_embedding_type')!r} is not supported without Mamba layers (only rope)")
    return granite_as_llama({**config, "intermediate_size": config.get("shared_intermediate_size", 1024)})


def _granite4_parts(config: dict[str, Any], stored: list[str]) -> dict[str, StoredTensor]:
    """Granite 4.0's shared MLP under Llama's names: its input_linear's rows the gate's then the up
    projection's, its output_linear the down projection."""
    width = config.get("shared_intermediate_size", 1024)
    return split_rows(stored, {"shared_mlp.input_linear.weight": (("mlp.gate_proj.weight", 0, width, 1.0, None),
                                                              ("mlp.up_proj.weight", width, 2 * width, 1.0, None)),
                           "shared_mlp.output_linear.weight": (("mlp.down_proj.weight", None, None, 1.0, None),)})


def falcon_h1_config(config: dict[str, Any]) -> dict[str, Any]:
    """Falcon-H1's config completed with transformers' defaults, the factors falcon_h1_scales folds into weights
    made neutral; its embeddings' and logits' factors stay (ModelConfig.embed_scale, logit_scale)."""
    return {**with_defaults(config, "FalconH1ForCausalLM"), **FALCON_H1_FOLDED}


def falcon_h1_scales(config: dict[str, Any], stored: list[str]) -> dict[str, StoredTensor]:
    """Every stored tensor under its own name, Falcon-H1's factors folded in: the attention's input factor into
    q_proj, k_proj (with the keys' own factor) and v_proj, its output factor into o_proj; Mamba-2's input factor
    and each in_proj row's part factor (z, x, B, C, dt: ssm_multipliers) into in_proj, its output factor into
    out_proj; the MLP's gate and down factors into gate_proj and down_proj. A bias takes the factors applied
    after its matrix only (an input factor scales the input, before the bias is added)."""
    c = with_defaults(config, "FalconH1ForCausalLM")
    inner = c["mamba_n_heads"] * c["mamba_d_head"]
    groups_state = c["mamba_n_groups"] * c["mamba_d_state"]
    parts = c["ssm_multipliers"]
    rows = [parts[0]] * inner + [parts[1]] * inner + [parts[2]] * groups_state + [parts[3]] * groups_state + \
        [parts[4]] * c["mamba_n_heads"]
    attention_in, gate, down = c["attention_in_multiplier"], *c["mlp_multipliers"]
    # module suffix: (the weight's factor, the bias's factor)
    factors = {"self_attn.q_proj": (attention_in, 1.0),
               "self_attn.k_proj": (attention_in * c["key_multiplier"], c["key_multiplier"]),
               "self_attn.v_proj": (attention_in, 1.0),
               "self_attn.o_proj": (c["attention_out_multiplier"],) * 2,
               "mamba.in_proj": (tuple(c["ssm_in_multiplier"] * row for row in rows), tuple(rows)),
               "mamba.out_proj": (c["ssm_out_multiplier"],) * 2,
               "feed_forward.gate_proj": (gate, gate), "feed_forward.down_proj": (down, down)}
    view = {}
    for name in stored:
        module, kind = name.rsplit(".", 1)
        scale = next((pair[kind == "bias"] for suffix, pair in factors.items() if module.endswith("." + suffix)), 1.0)
        neutral = all(math.isclose(x, 1.0, rel_tol=1e-12) for x in (scale if isinstance(scale, tuple) else (scale,)))
        view[name] = StoredTensor(name) if neutral or kind not in ("weight", "bias") else StoredTensor(name,
                                                                                                      scale=scale)
    return view
