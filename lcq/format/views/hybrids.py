"""Recurrent hybrids stored under names or layouts of their own.

- Qwen3-Next (Qwen3NextForCausalLM) is Qwen3.5's layer with its linear attention's projections stored
  fused per key head (in_proj_qkvz: each key head's q, k, then its value heads' v and z rows; in_proj_ba:
  their b then a rows). They read as Qwen3.5's in_proj_qkv, in_proj_z, in_proj_b and in_proj_a, each the
  stored rows it picks (interleaved_parts), so that both families quantize and run alike.
- Nemotron-H (NemotronHForCausalLM: Nemotron-H, Nemotron Nano 2, Nemotron 3) reads as itself with its config
  completed with transformers' defaults (its blocks' kinds from hybrid_override_pattern) and its tensors under
  the names the other families have (backbone. as model., as transformers reads them; its embeddings as
  model.embed_tokens); its multi-token-prediction layers (mtp.*) are not read.

"""
from __future__ import annotations

from typing import Any

from .common import StoredTensor, ViewError, with_defaults

# LFM2's families (their short convolutions and attention, dense or with experts) and their CausalLMs
LFM2 = {"lfm2": "Lfm2ForCausalLM", "lfm2_moe": "Lfm2MoeForCausalLM"}
# Where a family keeps its final norm, where not under model.norm
FINAL_NORMS = {**dict.fromkeys(LFM2, "model.embedding_norm"), "bamba": "model.final_layernorm",
               "nemotron_h": "model.norm_f", "falcon_h1": "model.final_layernorm"}


def interleaved_parts(num_k_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int
                      ) -> dict[str, dict[str, list[int]]]:
    """Qwen3-Next's fused linear-attention projections and their parts as Qwen3.5 stores them: for each,
    every part's rows of the fused matrix, in the part's order. in_proj_qkvz holds per key head its q
    (head_k_dim rows), k, and its num_v_heads / num_k_heads value heads' v and z; in_proj_ba per key head
    its value heads' b, then a."""
    group = num_v_heads // num_k_heads
    values = group * head_v_dim
    width = 2 * head_k_dim + 2 * values

    def rows(offset: int, count: int, stride: int) -> list[int]:
        return [g * stride + offset + i for g in range(num_k_heads) for i in range(count)]

    qkv = rows(0, head_k_dim, width) + rows(head_k_dim, head_k_dim, width) + rows(2 * head_k_dim, values, width)
    return {"in_proj_qkvz": {"in_proj_qkv": qkv, "in_proj_z": rows(2 * head_k_dim + values, values, width)},
            "in_proj_ba": {"in_proj_b": rows(0, group, 2 * group), "in_proj_a": rows(group, group, 2 * group)}}


def qwen3_next_parts(config: dict[str, Any], stored: list[str]) -> dict[str, StoredTensor]:
    """Qwen3-Next's tensors under their own names, its fused linear-attention projections as their parts."""
    c = with_defaults(config, "Qwen3NextForCausalLM")
    fused = interleaved_parts(c["linear_num_key_heads"], c["linear_num_value_heads"], c["linear_key_head_dim"],
                              c["linear_value_head_dim"])
    view = {}
    for name in stored:
        prefix, _, rest = name.rpartition(".linear_attn.")
        parts = fused.get(rest.removesuffix(".weight")) if prefix and rest.endswith(".weight") else None
        if parts is None:
            view[name] = StoredTensor(name)
            continue
        total = sum(len(rows) for rows in parts.values())
        view.update({f"{prefix}.linear_attn.{part}.weight": StoredTensor(name, order=tuple(rows), picked_from=total)
                     for part, rows in parts.items()})
    return view


def nemotron_h_config(config: dict[str, Any]) -> dict[str, Any]:
    """Nemotron-H's config completed with transformers' defaults (its blocks' kinds from hybrid_override_pattern:
    layers_block_type), with their number (transformers derives num_hidden_layers from them, and writes none)."""
    width = config.get("intermediate_size")
    if isinstance(width, list):  # one per MLP block, where they differ (as vLLM reads it)
        if len(set(width)) > 1:
            raise ViewError(f"NemotronHForCausalLM: MLP widths that differ by block ({sorted(set(width))}) are not "
                            "supported")
        config = {**config, "intermediate_size": width[0]}
    completed = with_defaults(config, "NemotronHForCausalLM")
    return {**completed, "num_hidden_layers": len(completed["layers_block_type"])}


def nemotron_h_names(stored: list[str]) -> dict[str, StoredTensor]:
    """Nemotron-H's tensors under the CausalLM names of the others (transformers reads backbone. as model.), its
    embedding table as model.embed_tokens; its multi-token-prediction layers (mtp.*) are not read."""
    view = {}
    for name in stored:
        if name.startswith("mtp."):
            continue
        viewed = "model." + name.removeprefix("backbone.") if name.startswith("backbone.") else name
        view[viewed.replace("model.embeddings.", "model.embed_tokens.")] = StoredTensor(name)
    return view
