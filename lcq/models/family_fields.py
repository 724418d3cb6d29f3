"""How each family's layer differs from Llama's, read from its config.json as ModelConfig fields: one
function per family (or group of families) that returns {} for the others, so ModelConfig.from_folder
reads every model by the same call."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from lcq.errors import UserError
from lcq.format.views import LFM2  # short convolutions (ShortConvDims) in most layers

from .dims import LatentDims, LinearDims, MambaDims, ShortConvDims
from .families import GEMMA, GRANITE_EXPERTS, LATENT, QWEN3_5, UNGATED_FAMILIES
from .layer_kinds import rope_layers
from .layers import ROPE_TYPES, rope_settings


def gemma_fields(c: dict, folder: str | Path) -> dict:
    """Gemma 2's and 3's differences from a Llama layer. Gemma 3's rotary settings from either config
    style: transformers 5 (layer_types, rope_parameters per layer type) or the first one on the Hub
    (sliding_window_pattern, rope_theta and rope_local_base_freq, rope_scaling for the full layers);
    Gemma 2's layers all share one, and cap their attention scores and logits."""
    if c.get("use_bidirectional_attention"):
        raise UserError(f"{folder}: bidirectional attention is not supported")
    shared = dict(embed_scale=c["hidden_size"] ** 0.5, activation="gelu_tanh", sandwich_norms=True, norm_offset=1.0,
                  query_scale=c.get("query_pre_attn_scalar", 256) ** -0.5,
                  logit_softcap=c.get("final_logit_softcapping"))
    if c["model_type"] == "gemma2":
        return dict(shared, attention_softcap=float(c.get("attn_logit_softcapping") or 0.0))
    return dict(shared, **layer_type_ropes(c, folder, c.get("rope_theta", 1_000_000.0),
                                            c.get("rope_local_base_freq", 10_000.0)))


def layer_type_ropes(c: dict, folder: str | Path, full_theta: float, local_theta: float) -> dict:
    """Rotary settings of models whose sliding-window layers have their own (Gemma 3, OLMo 3), from either
    config style: transformers 5's rope_parameters per layer type, or the Hub's first one (rope_scaling
    for the full layers; bases `full_theta` and `local_theta` where the settings give none)."""
    params = c.get("rope_parameters") or {}
    full = dict(params.get("full_attention") or c.get("rope_scaling") or {})
    full.setdefault("rope_theta", full_theta)
    local = dict(params.get("sliding_attention") or {})
    local.setdefault("rope_theta", local_theta)
    rope, rope_local = (rope_settings({"rope_parameters": r, "max_position_embeddings": c.get(
        "max_position_embeddings", 131_072)}) for r in (full, local))
    for settings in (rope, rope_local):
        if settings["rope_type"] not in ROPE_TYPES:
            raise UserError(f"{folder}: rope type {settings['rope_type']!r} is not supported")
    return dict(rope=rope, rope_local=rope_local)


def query_temperature_of(c: dict, rope: dict) -> tuple[float, int, int] | None:
    """Ministral 3's query temperature: llama_4_scaling_beta of its rotary settings over their original
    context length; Llama 4's (attn_temperature_tuning): attn_scale over floor_scale, from position p + 1."""
    if c["model_type"] == "llama4_text":
        tuning = c.get("attn_temperature_tuning", True)
        return (float(c.get("attn_scale", 0.1)), int(c.get("floor_scale", 8192)), 1) if tuning else None
    beta = rope.get("llama_4_scaling_beta") if c["model_type"] == "ministral3" else None
    return None if not beta else (float(beta), int(rope["original_max_position_embeddings"]), 0)


def llama4_fields(c: dict) -> dict:
    """Llama 4's layer beside Llama's: the MLP under feed_forward, rotary pairs adjacent (its complex
    rotation), unweighted per-head norms of the rotated queries and keys (use_qk_norm), the attention
    temperature in its NoPE layers only."""
    if c["model_type"] != "llama4_text":
        return {}
    nope = [not rope for rope in rope_layers(c)]
    return dict(mlp_name="feed_forward", rotary_interleaved=True, qk_l2_norm=bool(c.get("use_qk_norm", True)),
                temperature_layers=nope)


def latent_fields(c: dict, rope: dict) -> dict:
    """DeepSeek's latent attention: its dimensions, the scores' factor of its query and key heads (nope_dim +
    rope_dim wide; with YaRN times the square of 0.1 mscale_all_dim ln(factor) + 1, as DeepSeek's code has
    it), its rotary embedding over adjacent pairs (V2's always, V3's where rope_interleave, the default)."""
    if c["model_type"] not in LATENT:
        return {}
    latent = LatentDims(kv_rank=c["kv_lora_rank"], q_rank=c.get("q_lora_rank") or 0, nope_dim=c["qk_nope_head_dim"],
                        rope_dim=c["qk_rope_head_dim"], value_dim=c["v_head_dim"])
    scale = (latent.nope_dim + latent.rope_dim) ** -0.5
    if rope["rope_type"] != "default" and rope.get("mscale_all_dim") and rope.get("factor", 1.0) > 1:
        scale *= (0.1 * rope["mscale_all_dim"] * math.log(rope["factor"]) + 1.0) ** 2
    interleaved = c["model_type"] == "deepseek_v2" or bool(c.get("rope_interleave", True))
    return dict(latent=latent, query_scale=scale, rotary_interleaved=interleaved)


def qwen3_5_fields(c: dict) -> dict:
    """Qwen3.5's layer beside Llama's: linear attention in the layers layer_types names (three in four by
    default), norms that multiply by 1 + w, and in the others per-head q/k norms, a rotary embedding over
    the first partial_rotary_factor of each head, and an output gate from q_proj."""
    if c["model_type"] not in QWEN3_5:
        return {}
    layers, interval = c["num_hidden_layers"], c.get("full_attention_interval", 4)
    types = c.get("layer_types") or ["linear_attention" if (i + 1) % interval else "full_attention"
                                     for i in range(layers)]
    linear = LinearDims(num_k_heads=c["linear_num_key_heads"], num_v_heads=c["linear_num_value_heads"],
                        head_k_dim=c["linear_key_head_dim"], head_v_dim=c["linear_value_head_dim"],
                        conv_kernel=c.get("linear_conv_kernel_dim", 4))
    return dict(linear_layers=[kind == "linear_attention" for kind in types], linear=linear, norm_offset=1.0,
                rotated_dims=rotated_dims_of(c), attention_output_gate=True)


def _mamba_dims(c: dict) -> MambaDims:
    """Mamba-2's dimensions, as Granite 4.0-H's and Bamba's configs name them."""
    return MambaDims(num_heads=c["mamba_n_heads"], head_dim=c["mamba_d_head"], state_dim=c["mamba_d_state"],
                     groups=c["mamba_n_groups"], conv_kernel=c["mamba_d_conv"],
                     time_step_limit=tuple(float(limit) for limit in c.get("time_step_limit") or (0.0, math.inf)))


def stablelm_qk_norms(c: dict) -> bool:
    """StableLM 2 12B's LayerNorms of each query and key head (qk_layernorm), each head its own weights."""
    return c["model_type"] == "stablelm" and bool(c.get("qk_layernorm"))


def granite_hybrid_fields(c: dict) -> dict:
    """Granite 4.0-H's layer beside Llama's (its factors folded into weights by the view, but the embeddings'):
    Mamba-2 in the layers layer_types names so, attention without a rotary embedding (position_embedding_type
    nope) in the others, and a dense MLP (shared_mlp) in every layer, beside a mixture where it has experts.
    Granite 3's mixtures: attention (rotary) in every layer, a mixture (and GraniteMoeShared's dense MLP)."""
    if c["model_type"] not in GRANITE_EXPERTS:
        return {}
    types = c.get("layer_types") or c.get("layers_block_type") or ["attention"] * c["num_hidden_layers"]
    recurrent = [kind in ("linear_attention", "mamba") for kind in types]
    return dict(linear_layers=recurrent, mamba=_mamba_dims(c) if any(recurrent) else None,
                embed_scale=float(c.get("embedding_multiplier", 1.0)),
                mlp_name="block_sparse_moe" if c.get("num_local_experts") else "shared_mlp")


def falcon_h1_fields(c: dict) -> dict:
    """Falcon-H1's layer beside Llama's (its factors folded into weights by the view, but the embeddings' and the
    logits', which logit_scale carries): Mamba-2 beside the attention in every layer, its outputs normed as
    mamba_rms_norm and mamba_norm_before_gate say; the MLP under feed_forward."""
    if c["model_type"] != "falcon_h1":
        return {}
    norm = ("before_gate" if c.get("mamba_norm_before_gate", True) else "gated") if c.get("mamba_rms_norm") else "none"
    mamba = dataclasses.replace(_mamba_dims(c), norm=norm, conv_bias=bool(c.get("mamba_conv_bias", True)))
    return dict(mamba=mamba, parallel_mamba=True, mlp_name="feed_forward",
                embed_scale=float(c.get("embedding_multiplier", 1.0)))


def bamba_fields(c: dict) -> dict:
    """Bamba's layer beside Llama's: Mamba-2 in every layer but attn_layer_indices', whose attention turns the
    first half of each head; the MLP under feed_forward."""
    if c["model_type"] != "bamba":
        return {}
    attention = set(c.get("attn_layer_indices") or ())
    return dict(linear_layers=[i not in attention for i in range(c["num_hidden_layers"])], mamba=_mamba_dims(c),
                mlp_name="feed_forward", rotated_dims=rotated_dims_of(c))


# hidden_act -> the gated MLP's activation, for the names transformers gives the two the kernels have
GATED_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                     "gelu_fast": "gelu_tanh"}


def mlp_activation(c: dict, folder: str | Path) -> dict:
    """The MLP's activation from hidden_act, where the family's own fields do not set it (Gemma's, gpt-oss's and
    Nemotron-H's do). Another activation is refused: served as SiLU, it would give wrong tokens silently."""
    if c["model_type"] in (*GEMMA, "gpt_oss", "nemotron_h"):
        return {}
    ungated = UNGATED_FAMILIES.get(c["model_type"])
    name = c.get("hidden_act") or ungated or "silu"
    if ungated is not None and name != ungated:
        raise UserError(f"{folder}: hidden_act {name!r} is not supported for this family's MLP ({ungated})")
    if ungated is None and name not in GATED_ACTIVATIONS:
        raise UserError(f"{folder}: hidden_act {name!r} is not supported (supported: "
                        f"{', '.join(GATED_ACTIVATIONS)})")
    return {"activation": ungated or GATED_ACTIVATIONS[name]}


def nemotron_h_fields(c: dict) -> dict:
    """Nemotron-H's blocks beside Llama's layers: each one part behind its norm (layers_block_type): Mamba-2
    (linear_attention), attention without a rotary embedding (full_attention), an MLP of up_proj, relu(x)^2 and
    down_proj (mlp), or a mixture of such experts beside a shared one (moe: DeepSeek-V3's routing), every part
    under the module mixer."""
    if c["model_type"] != "nemotron_h":
        return {}
    types = c["layers_block_type"]
    mamba = MambaDims(num_heads=c["mamba_num_heads"], head_dim=c["mamba_head_dim"], state_dim=c["ssm_state_size"],
                      groups=c["n_groups"], conv_kernel=c["conv_kernel"],
                      time_step_limit=tuple(float(limit) for limit in c.get("time_step_limit") or (0.0, math.inf)))
    experts = dict(num_experts=c["n_routed_experts"], experts_per_token=c["num_experts_per_tok"],
                   norm_topk_prob=bool(c.get("norm_topk_prob", True)), shared_expert=bool(c.get("n_shared_experts")),
                   shared_expert_gated=False, shared_expert_name="shared_experts", router_sigmoid=True,
                   router_correction=True, router_in_fp32=True,
                   router_groups=(c["n_group"], c["topk_group"]) if c.get("n_group", 1) > 1 else None,
                   routed_scale=float(c.get("routed_scaling_factor", 1.0))) if "moe" in types else {}
    return dict(**experts, moe_layers=[kind == "moe" for kind in types], mamba=mamba, mixer_name="mixer",
                linear_layers=[kind == "linear_attention" for kind in types], mlp_name="mixer",
                mixer_layers=[kind in ("linear_attention", "full_attention") for kind in types],
                mlp_layers=[kind in ("mlp", "moe") for kind in types],
                expert_latent=c.get("moe_latent_size") is not None,
                activation=c.get("mlp_hidden_act", "relu2"))


def lfm2_fields(c: dict) -> dict:
    """LFM2's layer beside Llama's: short convolutions in the layers layer_types names so, attention (per-head
    q/k norms, its output projection out_proj) in the others, the MLP (or mixture) under feed_forward."""
    if c["model_type"] not in LFM2:
        return {}
    return dict(linear_layers=[kind == "conv" for kind in c["layer_types"]], mlp_name="feed_forward",
                short_conv=ShortConvDims(kernel=c.get("conv_L_cache", 3), bias=bool(c.get("conv_bias", False))),
                attention_output_name="out_proj")


def dense_mlp_width(c: dict) -> int:
    """The dense MLPs' width: Llama 4's intermediate_size_mlp (its experts take intermediate_size), Granite
    4.0-H's shared_intermediate_size, LFM2's two thirds of intermediate_size rounded as its config says."""
    if c["model_type"] == "llama4_text":
        return c.get("intermediate_size_mlp", 16384)
    if c["model_type"] == "granitemoehybrid":
        return c["shared_intermediate_size"]
    width = c["intermediate_size"]
    if c["model_type"] == "lfm2" and c.get("block_auto_adjust_ff_dim", True):
        width = int(2 * width / 3)
        if c.get("block_ffn_dim_multiplier") is not None:
            multiple = c.get("block_multiple_of", 256)
            width = -(-int(c["block_ffn_dim_multiplier"] * width) // multiple) * multiple
    return width


def rotated_dims_of(c: dict) -> int | None:
    """The dimensions of each head a partial rotary embedding turns, its first ones (Qwen3.5's, MiniMax-M2's:
    pairs (i, i + r/2) within them); None where it turns whole heads."""
    rope = c.get("rope_parameters") or {}
    factor = rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return None if factor == 1.0 else int(head_dim * factor)


def gpt_oss_fields(c: dict) -> dict:
    """gpt-oss's layer beside Llama's: attention sinks, biases on every projection (q/k/v/o: attention_bias),
    the router and the experts, and its clamped SwiGLU."""
    if c["model_type"] != "gpt_oss":
        return {}
    return dict(attention_sinks=True, activation="swiglu_oai", swiglu_limit=float(c.get("swiglu_limit", 7.0)),
                swiglu_alpha=float(c.get("swiglu_alpha", 1.702)))


def expert_fields(c: dict) -> dict:
    """The experts of a mixture: Mixtral's in every layer, their weights always renormalized; OLMoE's in
    every layer; Qwen3-MoE's and Qwen2-MoE's (num_experts in the Hub's files, num_local_experts in
    transformers 5's) in every decoder_sparse_step-th layer but mlp_only_layers', Qwen2-MoE's with a
    shared expert."""
    layers, kind = c["num_hidden_layers"], c["model_type"]
    if kind == "gpt_oss":  # its top-k router scores softmaxed over the chosen: Mixtral's renormalized weights
        return dict(num_experts=c.get("num_local_experts", 128), experts_per_token=c.get("num_experts_per_tok", 4),
                    norm_topk_prob=True, router_bias=True, moe_layers=[True] * layers)
    if kind in ("mixtral", "olmoe"):
        return dict(num_experts=c.get("num_local_experts") or c.get("num_experts"),
                    experts_per_token=c["num_experts_per_tok"],
                    norm_topk_prob=kind == "mixtral" or bool(c.get("norm_topk_prob", False)),
                    moe_layers=[True] * layers)
    if kind == "llama4_text":  # a shared expert beside the routed ones, every interleave_moe_layer_step-th layer
        step = c.get("interleave_moe_layer_step") or 1
        moe = c.get("moe_layers")
        moe = set(range(step - 1, layers, step) if moe is None else moe)
        return dict(num_experts=c.get("num_local_experts", 16), experts_per_token=c.get("num_experts_per_tok", 1),
                    shared_expert=True, shared_expert_gated=False, router_sigmoid=True, expert_input_weights=True,
                    moe_layers=[i in moe for i in range(layers)])
    if kind == "deepseek_v2":  # softmax weights, scaled, not renormalized (as transformers), chosen greedily or
        # within the best groups by their best expert ("group_limited_greedy"); dense first layers
        grouped = c.get("topk_method") == "group_limited_greedy"
        return dict(num_experts=c["n_routed_experts"], experts_per_token=c["num_experts_per_tok"],
                    shared_expert=bool(c.get("n_shared_experts")), shared_expert_gated=False,
                    shared_expert_name="shared_experts", router_groups=(c["n_group"], c["topk_group"]) if grouped
                    else None, group_score_experts=1, routed_scale=float(c.get("routed_scaling_factor", 1.0)),
                    router_in_fp32=True, moe_layers=[i >= c.get("first_k_dense_replace", 0) for i in range(layers)])
    if kind in ("glm4_moe", "dots1", "deepseek_v3", "glm4_moe_lite"):  # DeepSeek-V3's routing: sigmoid scores, a
        # choosing bias, groups; dense first layers (transformers' defaults), GLM-4.7-Flash's by mlp_layer_types
        dense = c.get("first_k_dense_replace", {"glm4_moe": 1, "deepseek_v3": 3}.get(kind, 0))
        types = c.get("mlp_layer_types") or ["dense" if kind == "glm4_moe_lite" and i == 0 or i < dense else "sparse"
                                             for i in range(layers)]
        return dict(num_experts=c.get("n_routed_experts") or c.get("num_local_experts"),
                    experts_per_token=c["num_experts_per_tok"],
                    norm_topk_prob=bool(c.get("norm_topk_prob", kind != "dots1")),
                    shared_expert=bool(c.get("n_shared_experts", 1)), shared_expert_gated=False,
                    shared_expert_name="shared_experts", router_sigmoid=True, router_correction=True,
                    router_groups=(c.get("n_group", 1), c.get("topk_group", 1)) if c.get("n_group", 1) > 1 else None,
                    routed_scale=float(c.get("routed_scaling_factor", 1.0)), router_in_fp32=True,
                    moe_layers=[mlp == "sparse" for mlp in types])
    if kind == "ernie4_5_moe":  # softmax weights, a choosing bias; experts in every interval-th layer of a range
        first, last, step = (c.get(f"moe_layer_{key}") for key in ("start_index", "end_index", "interval"))
        last = layers - 1 if last is None or last < 0 else last
        return dict(num_experts=c.get("moe_num_experts") or c.get("num_experts"),
                    experts_per_token=c.get("moe_k") or c.get("num_experts_per_tok"), norm_topk_prob=True,
                    shared_expert=bool(c.get("moe_num_shared_experts")), shared_expert_gated=False,
                    shared_expert_name="shared_experts", router_correction=True, router_in_fp32=True,
                    moe_layers=[(i + 1) % (step or 1) == 0 and (first or 0) <= i <= last for i in range(layers)])
    if kind in GRANITE_EXPERTS and c.get("num_local_experts"):  # every layer: the softmax of the chosen experts'
        # scores, beside the layer's dense MLP (shared_mlp; Granite 3's GraniteMoe has none)
        shared = kind == "granitemoehybrid" or bool(c.get("shared_intermediate_size"))
        return dict(num_experts=c["num_local_experts"], experts_per_token=c["num_experts_per_tok"],
                    norm_topk_prob=True, shared_expert=shared, shared_expert_gated=False,
                    shared_expert_name="shared_mlp", shared_expert_in_layer=True, moe_layers=[True] * layers)
    if kind == "lfm2_moe":  # past its first num_dense_layers: sigmoid scores (with a choosing bias), scaled
        dense = c.get("num_dense_layers", 2)
        return dict(num_experts=c["num_experts"], experts_per_token=c["num_experts_per_tok"],
                    norm_topk_prob=bool(c.get("norm_topk_prob", True)), router_sigmoid=True,
                    router_correction=bool(c.get("use_expert_bias", True)),
                    routed_scale=float(c.get("routed_scaling_factor", 1.0)),
                    moe_layers=[i >= dense for i in range(layers)])
    if kind == "minimax_m2":  # every layer: sigmoid scores, a choosing bias, the chosen weights renormalized
        return dict(num_experts=c["num_local_experts"], experts_per_token=c["num_experts_per_tok"],
                    norm_topk_prob=True, router_sigmoid=True, router_correction=True, router_in_fp32=True,
                    moe_layers=[True] * layers)
    if kind == "hunyuan_v1_moe":  # Hunyuan-A13B: every layer, softmax weights renormalized, beside a shared MLP
        counts, chosen = (_one_value(c, key) for key in ("num_experts", "moe_topk"))
        return dict(num_experts=counts, experts_per_token=chosen, norm_topk_prob=True, shared_expert=True,
                    shared_expert_gated=False, shared_expert_name="shared_mlp", router_in_fp32=True,
                    moe_layers=[True] * layers)
    if kind == "qwen3_5_moe_text":  # every layer: the chosen weights renormalized, beside a gated shared expert
        return dict(num_experts=c.get("num_experts") or c.get("num_local_experts"),
                    experts_per_token=c["num_experts_per_tok"], norm_topk_prob=True, shared_expert=True,
                    moe_layers=[True] * layers)
    counted = ("qwen3_moe", "qwen2_moe", "qwen3_next")  # (Qwen3-Next's: Qwen2-MoE's gated shared expert, renormalized)
    count = (c.get("num_experts") or c.get("num_local_experts") or 0) if kind in counted else 0
    if not count:
        return {}
    step, dense = c.get("decoder_sparse_step") or 1, set(c.get("mlp_only_layers") or [])
    return dict(num_experts=count, experts_per_token=c["num_experts_per_tok"],
                norm_topk_prob=bool(c.get("norm_topk_prob", kind == "qwen3_next")),
                shared_expert=kind in ("qwen2_moe", "qwen3_next"),
                moe_layers=[i not in dense and (i + 1) % step == 0 for i in range(layers)])


def _one_value(c: dict, key: str) -> int:
    """A setting Hunyuan's config may give per layer (a list): one value, as lcq runs every layer's alike."""
    value = c[key]
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise UserError(f"{key} differs between layers ({sorted(set(value))}), which lcq does not support")
        value = value[0]
    return int(value)
