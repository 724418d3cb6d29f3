"""Mixtures whose experts are stored under other names, or all of a layer's in one 3-D tensor.

- Mixtral (MixtralForCausalLM) and MiniMax-M2 (MiniMaxM2ForCausalLM) store their mixtures as
  block_sparse_moe, their experts' matrices as w1, w3 and w2; they read as mlp, gate_proj, up_proj and
  down_proj, the names of transformers 5's modules and of Qwen3-MoE's files (MiniMax-M2's choosing bias
  as mlp.e_score_correction_bias, where transformers keeps it). LFM2's MLPs (and its mixtures' experts)
  under feed_forward read so too, its config completed with transformers' defaults; its other names
  (operator_norm, ffn_norm, the attention's out_proj and q_layernorm, model.embedding_norm) are read as
  they are. MiniMax-M2's config is completed with transformers' defaults (its rotary_dim as a
  partial_rotary_factor).
- gpt-oss (GptOssForCausalLM) keeps each layer's experts as 3-D tensors: gate_up_proj (experts, hidden,
  2 x width), gate and up columns alternating, and down_proj (experts, width, hidden), each (in, out),
  with their biases; on the Hub in MXFP4 (quant_method mxfp4: the codes under _blocks, their scales under
  _scales, (out, in)), decoded to bf16 as read (lcq.format.mxfp4). They read as each expert's gate_proj,
  up_proj and down_proj (transformers' experts split as lcq.quantizer.reference.as_stored splits them).
  Llama 4 (Llama4ForCausalLM, and the text model of Llama4ForConditionalGeneration) keeps its experts
  the same way under feed_forward.experts, gate columns before up's, without biases.
- ERNIE 4.5's mixtures (Ernie4_5_MoeForCausalLM) keep their choosing bias as mlp.moe_statics.*, which
  reads as mlp.gate.moe_statics.*, where transformers' router holds it; its config is completed with
  transformers' defaults (its own, not Llama's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .common import StoredTensor, with_defaults

# 3-D experts' tensors (all experts of a layer in each: gpt-oss's, Llama 4's), as transformers saves them and
# gpt-oss's in MXFP4 as the Hub has them (the codes, their scales)
GPT_OSS_EXPERTS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias", "gate_up_proj_blocks",
                   "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales")
MXFP4 = "mxfp4"  # gpt-oss's quant_method
# Mixtral's experts' matrices by their Hub names, and the names transformers 5 gives them (as Qwen3-MoE's)
MIXTRAL_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def mixtral_name(name: str) -> str:
    """A Mixtral, MiniMax-M2 or LFM2 tensor's name as lcq reads it: block_sparse_moe.gate (and MiniMax-M2's
    choosing bias) under mlp, experts.E.w1/w3/w2 (and LFM2's feed_forward.w1/w3/w2) as
    experts.E.gate_proj/up_proj/down_proj (transformers 5's modules and Qwen3-MoE's names)."""
    parts = name.replace(".block_sparse_moe.", ".mlp.").split(".")
    expert = len(parts) > 3 and parts[-3].isdigit() and parts[-4] == "experts"
    if expert or parts[-3:-2] == ["feed_forward"]:
        parts[-2] = MIXTRAL_EXPERT_NAMES.get(parts[-2], parts[-2])
    return ".".join(parts)


def ernie_moe_names(stored: list[str]) -> dict[str, StoredTensor]:
    """ERNIE 4.5's mixtures' tensors, their choosing bias under the router, where transformers' holds it."""
    return {name.replace(".mlp.moe_statics.", ".mlp.gate.moe_statics."): StoredTensor(name) for name in stored}


@dataclass(frozen=True)
class ExpertTensors:
    """How a family stores its experts as 3-D tensors (all experts of a layer in each)."""

    architecture: str  # its CausalLM
    owner: str  # where the experts sit in a layer
    alternating: bool  # gate and up columns alternate in gate_up_proj (gpt-oss), else gate's then up's
    width: str = "intermediate_size"  # the config's width of the experts (their number: num_local_experts)
    # stored (in, out) or (out, in), told apart by shape as transformers does: (out, in) where it has that shape,
    # even square (Qwen3-VL-MoE)
    either_orientation: bool = False
SPLIT_EXPERTS = {"gpt_oss": ExpertTensors("GptOssForCausalLM", ".mlp.experts.", True),
                 "llama4_text": ExpertTensors("Llama4ForCausalLM", ".feed_forward.experts.", False),
                 "qwen3_moe": ExpertTensors("Qwen3MoeForCausalLM", ".mlp.experts.", False, "moe_intermediate_size",
                                            either_orientation=True)}


def expert_parts(config: dict[str, Any], stored: list[str]) -> dict[str, StoredTensor]:
    """Every stored tensor under its own name, but a layer's experts stored as 3-D tensors (gate_up_proj
    (experts, hidden, 2 x width): gpt-oss's gate and up columns alternating, Llama 4's gate columns then
    up's; down_proj (experts, width, hidden); each (in, out); gpt-oss's with biases, or as MXFP4 codes and
    scales (out, in)) as each expert's experts.{e}.gate_proj, up_proj and down_proj weights and biases
    (transformers' modules as lcq.quantizer.reference.as_stored splits them, and how the family's LCQ
    checkpoints store them)."""
    kind = SPLIT_EXPERTS[config["model_type"]]
    owner = kind.owner
    completed = with_defaults(config, kind.architecture)
    count, width = completed["num_local_experts"], completed[kind.width]
    gate_up = {"gate_proj": (0, 2 * width, 2), "up_proj": (1, 2 * width, 2)} if kind.alternating else \
        {"gate_proj": (0, width, 1), "up_proj": (width, 2 * width, 1)}
    view = {}
    for name in stored:
        prefix, _, stored_kind = name.rpartition(owner)
        if not prefix or not stored_kind.endswith(GPT_OSS_EXPERTS):
            view[name] = StoredTensor(name)
            continue
        if stored_kind.endswith("_scales"):  # read with their codes
            continue
        matrix, bias = stored_kind.removesuffix("_blocks").removesuffix("_bias"), stored_kind.endswith("_bias")
        parts = gate_up if matrix == "gate_up_proj" else {"down_proj": None}
        # (out, in): the model's own shape, which transformers keeps as stored (Qwen3-VL-MoE)
        model_shape = (2 * width, completed["hidden_size"]) if matrix == "gate_up_proj" else \
            (completed["hidden_size"], width)
        for e in range(count):
            for part, rows in parts.items():
                view[f"{prefix}{owner}{e}.{part}.{'bias' if bias else 'weight'}"] = StoredTensor(
                    name, None if rows is None else rows[:2], expert=e,
                    transposed=not bias and stored_kind == matrix and not kind.either_orientation,
                    mxfp4=stored_kind.endswith("_blocks"), row_step=1 if rows is None else rows[2],
                    unless_shaped=model_shape if kind.either_orientation and not bias else None)
    return view
