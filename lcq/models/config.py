"""The few numbers our model needs, read from a Hugging Face config.json."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from lcq.errors import UserError
from lcq.format import VIEWED_ARCHITECTURES, ViewError, stored_tensor_names, view_config, view_tensors
from lcq.format.mtp import MtpNames, mtp_names
from lcq.format.views import LFM2  # short convolutions (ShortConvDims) in most layers

from .dims import LatentDims, LinearDims, MambaDims, ShortConvDims
from .families import GEMMA, HUNYUAN, LATENT, LAYER_NORMS, OLMO3_THETA, QWEN3_5, SUPPORTED_ARCHITECTURES
from .family_fields import (bamba_fields, dense_mlp_width, expert_fields, falcon_h1_fields, gemma_fields,
                            gpt_oss_fields, granite_hybrid_fields, latent_fields, layer_type_ropes, lfm2_fields,
                            llama4_fields, mlp_activation, nemotron_h_fields, query_temperature_of, qwen3_5_fields,
                            rotated_dims_of, stablelm_qk_norms)
from .layer_kinds import layer_chunks, layer_windows, rope_layers
from .layers import ROPE_TYPES, rope_settings


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool  # Qwen3, Gemma 3: RMSNorm on each query and key head before the rotary embedding
    rope: dict
    # Gemma 2 and 3 (the defaults are every other family's):
    layer_windows: list[int] = field(default_factory=list)  # per layer: sliding window in tokens, 0: full
    layer_chunks: list[int] = field(default_factory=list)  # per layer: attention within chunks of so many tokens
    rope_layers: list[bool] = field(default_factory=list)  # per layer: applies the rotary embedding (SmolLM3: not every 4th)
    rope_local: dict | None = None  # rotary settings of the sliding-window layers, where they differ
    embed_scale: float = 1.0  # the embeddings are multiplied by it (Gemma: sqrt(hidden_size))
    # of the gate: silu, gelu_tanh (Gemma), or swiglu_oai (gpt-oss: layers.gated); of an MLP without a gate,
    # whose only input projection is up_proj: relu2 (Nemotron-H: layers.UNGATED)
    activation: str = "silu"
    swiglu_limit: float = 7.0  # swiglu_oai: gate capped at it, up clamped to +-it
    swiglu_alpha: float = 1.702  # swiglu_oai: gate * sigmoid(alpha * gate)
    attention_sinks: bool = False  # gpt-oss: each head's softmax over one more, learned score (PagedAttention.attend)
    sandwich_norms: bool = False  # Gemma, OLMo 2: attention and MLP outputs normalised, before the residual add
    pre_norms: bool = True  # norms on the attention's and the MLP's inputs (OLMo 2 has none)
    qk_norm_per_head: bool = True  # q/k norms per head (Qwen3, Gemma 3), else over the whole projection (OLMo 2)
    qk_norm_after_rotary: bool = False  # q/k norms after the rotary embedding (Hunyuan), else before it
    qk_norm_weights_per_head: bool = False  # each head's q/k norm its own weights (Command R+, StableLM 2 12B), else
    # one for all
    rotary_interleaved: bool = False  # it turns pairs (2i, 2i + 1) of a head (GLM-4-0414), else (i, i + d/2)
    layer_norm: bool = False  # norms centre their input too (LayerNorm: Cohere, StableLM), else RMSNorm
    norm_bias: bool = False  # the LayerNorms add a bias (StableLM)
    parallel_block: bool = False  # attention and the MLP read one norm's output, both added to the stream (Cohere)
    # Mixture-of-experts MLPs (Qwen3-MoE): each token's output is the sum of experts_per_token of
    # num_experts gated MLPs, weighted by a router; layers where moe_layers is False keep a dense MLP.
    num_experts: int = 0
    experts_per_token: int = 0
    norm_topk_prob: bool = False  # the chosen experts' weights renormalized to sum to 1
    shared_expert: bool = False  # Qwen2-MoE: a gated MLP every token runs too, scaled by sigmoid(gate . x)
    router_bias: bool = False  # gpt-oss: the router's scores have a bias, its experts' matrices too
    moe_layers: list[bool] = field(default_factory=list)
    shared_expert_gated: bool = True  # the shared expert's output scaled by sigmoid(gate . x) (Qwen2-MoE), else as is
    shared_expert_name: str = "shared_expert"  # its module (GLM-4.5: shared_experts)
    shared_expert_in_layer: bool = False  # that module is the layer's, beside the mixture (Granite 4.0), not its own
    router_sigmoid: bool = False  # experts weighted by the sigmoid of their scores (Llama 4, GLM-4.5), else softmax
    router_correction: bool = False  # GLM-4.5: a learned bias on the sigmoid scores, for choosing only
    # GLM-4.5's (n_group, topk_group): each token's experts chosen within its topk_group best groups of experts
    router_groups: tuple[int, int] | None = None
    group_score_experts: int = 2  # a group's score: the sum of its best so many experts' (DeepSeek-V2's: the best)
    routed_scale: float = 1.0  # the chosen experts' weights times it (GLM-4.5's routed_scaling_factor)
    router_in_fp32: bool = False  # the router kept and run in fp32 (GLM-4.5), else in the model's dtype
    # Llama 4: the router's weights scale each chosen expert's input, and the experts' outputs are summed as
    # they are; else the weights scale the outputs
    expert_input_weights: bool = False
    mlp_name: str = "mlp"  # the MLP's (or mixture's) module in a layer (Llama 4: feed_forward)
    qk_l2_norm: bool = False  # Llama 4: query and key heads scaled to unit RMS after rotation, in rotary layers
    norm_offset: float = 0.0  # norms multiply by offset + w (Gemma stores w - 1)
    query_scale: float | None = None  # scores' factor (Gemma: query_pre_attn_scalar^-0.5); None: head_dim^-0.5
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap)
    logit_scale: float = 1.0  # logits times it (Cohere), folded into the final norm's weight by the loader
    attention_softcap: float = 0.0  # Gemma 2: scores = cap * tanh(scores / cap) before the softmax; 0: none
    # Ministral 3's and Llama 4's attention temperature: (beta, span, shift), queries at position p multiplied
    # by 1 + beta * log(1 + floor((p + shift) / span)) (layers.query_temperatures); None: none
    query_temperature: tuple[float, int, int] | None = None
    temperature_layers: list[bool] = field(default_factory=list)  # where it applies (Llama 4: its NoPE layers)
    # DeepSeek's latent attention, whose KV cache holds one row of head_dim (kv_rank + rope_dim) values per token,
    # num_kv_heads 1, keys and values alike; None: the attention of every other family
    latent: LatentDims | None = None
    # The layers whose token mixer keeps a recurrent state per sequence instead of a KV cache: Qwen3.5's linear
    # attention (linear), Granite 4.0-H's and Bamba's Mamba-2 (mamba), LFM2's short convolutions (short_conv)
    linear_layers: list[bool] = field(default_factory=list)
    linear: LinearDims | None = None
    mamba: MambaDims | None = None
    short_conv: ShortConvDims | None = None  # LFM2's convolution layers, which keep their last inputs only
    attention_output_name: str = "o_proj"  # the attention's output projection (LFM2: out_proj)
    # Nemotron-H's blocks hold one part each, a token mixer or an MLP, behind one norm: per layer, whether it has
    # a token mixer (attention or recurrent) and whether it has an MLP (or mixture); both, for the others
    mixer_layers: list[bool] = field(default_factory=list)
    mlp_layers: list[bool] = field(default_factory=list)
    mixer_name: str | None = None  # the module of every kind of token mixer (Nemotron-H: mixer), else their own
    # Falcon-H1: every layer's Mamba-2 (mamba) beside its attention, on the same normed input, their outputs added
    parallel_mamba: bool = False
    # Nemotron-H's latent mixtures: the routed experts run on fc1_latent_proj(x), their sum through fc2_latent_proj
    expert_latent: bool = False
    rotated_dims: int | None = None  # each head's first so many dimensions turn (Qwen3.5: a quarter); None: all
    attention_output_gate: bool = False  # Qwen3.5: q_proj gives each head a gate too, sigmoid(gate) * its output
    mtp: MtpNames | None = None  # the checkpoint's multi-token-prediction layer (mtp.py), where it has one
    # config.json of the model LoRA adapters for this one were trained on, where lcq reads it as another
    # architecture (lcq.format.views; an LCQ checkpoint quantized from such a folder records it), else None
    source_config: dict | None = field(default=None, repr=False)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise UserError(f"{folder}: no config.json (not a Hugging Face model folder)")
        try:
            stored = json.loads(path.read_text())
            names = stored_tensor_names(folder)
            c, viewed = view_config(stored, names), _viewed_names(stored, names)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON ({e.msg})") from None
        except ViewError as e:
            raise UserError(f"{path}: {e}") from None
        architecture = (c.get("architectures") or [c.get("model_type", "?")])[0]
        if architecture not in SUPPORTED_ARCHITECTURES and c.get("model_type") not in SUPPORTED_ARCHITECTURES.values():
            raise UserError(f"{folder}: architecture {architecture} is not supported "
                            f"(supported: {', '.join(dict.fromkeys((*SUPPORTED_ARCHITECTURES, *VIEWED_ARCHITECTURES)))})")
        rope = rope_settings(c)
        if rope["rope_type"] not in ROPE_TYPES:
            raise UserError(f"{folder}: rope type {rope['rope_type']!r} is not supported "
                            f"(supported: {', '.join(ROPE_TYPES)})")
        if c.get("clip_qkv") is not None:  # an option of OLMoE's (and OLMo 1's) config
            raise UserError(f"{folder}: clip_qkv (clamping queries, keys and values) is not supported")
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        for kind in ("short_factor", "long_factor") if rope["rope_type"] == "longrope" else ():
            if len(rope.get(kind) or ()) != head_dim // 2:
                raise UserError(f"{folder}: longrope needs {head_dim // 2} {kind} values (one per rotary frequency), "
                                f"config.json gives {len(rope.get(kind) or ())}")
        family = gemma_fields(c, folder) if c["model_type"] in GEMMA else \
            layer_type_ropes(c, folder, c.get("rope_theta", OLMO3_THETA), OLMO3_THETA) if c["model_type"] == "olmo3" \
            else {}
        return cls(layer_windows=layer_windows(c), rope_layers=rope_layers(c), layer_chunks=layer_chunks(c),
            model_type=c["model_type"], vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
            # the dense MLPs' width (Llama 4's experts take intermediate_size, its dense layers intermediate_size_mlp)
            intermediate_size=dense_mlp_width(c),
            num_layers=c["num_hidden_layers"], num_heads=heads,
            num_kv_heads=1 if c["model_type"] in LATENT else c.get("num_key_value_heads") or heads,
            head_dim=c["kv_lora_rank"] + c["qk_rope_head_dim"] if c["model_type"] in LATENT else head_dim,
            rms_norm_eps=c.get("rms_norm_eps", c.get("layer_norm_eps", c.get("norm_eps", c.get("layer_norm_epsilon",
                                                                                                 1e-6)))),
            max_position_embeddings=_context_length(c, family.get("rope", rope)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", c["model_type"] in GEMMA)),
            qkv_bias=c["model_type"] == "qwen2" or bool(c.get("attention_bias", False)) or
            (c["model_type"] == "qwen2_moe" and bool(c.get("qkv_bias", True))) or bool(c.get("use_qkv_bias")),
            qk_norm=c["model_type"] in ("qwen3", "qwen3_moe", "olmo2", "olmo3", "olmoe", "exaone4", "gemma3_text",
                                        "dots1", "minimax_m2", "apertus", *HUNYUAN, *QWEN3_5, *LFM2) or
            (c["model_type"] in ("glm4_moe", "cohere") and bool(c.get("use_qk_norm"))) or stablelm_qk_norms(c),
            qk_norm_weights_per_head=(c["model_type"] == "cohere" and bool(c.get("use_qk_norm"))) or
            stablelm_qk_norms(c),
            qk_norm_after_rotary=c["model_type"] in (*HUNYUAN, "llama4_text"),
            rope=family.pop("rope", rope),
            **family, **LAYER_NORMS.get(c["model_type"], {}), **expert_fields(c), **gpt_oss_fields(c),
            **llama4_fields(c),
            **latent_fields(c, rope), **qwen3_5_fields(c), **granite_hybrid_fields(c), **lfm2_fields(c),
            **bamba_fields(c), **nemotron_h_fields(c), **falcon_h1_fields(c),
            **({"rotated_dims": rotated_dims_of(c)} if c["model_type"] == "minimax_m2" else {}),
            **mlp_activation(c, folder),
            logit_scale=float(c.get("logit_scale") or 1.0) if c["model_type"] in ("cohere", "cohere2") else
            float(c.get("lm_head_multiplier", 1.0)) if c["model_type"] == "falcon_h1" else 1.0,
            **({"parallel_block": True} if c["model_type"] == "stablelm" and c.get("use_parallel_residual") else {}),
            query_temperature=query_temperature_of(c, rope), mtp=mtp_names(c, viewed),
            source_config=(c.get("quantization_config") or {}).get("source_config") or
            (stored if c != stored else None),
        )

    @property
    def attention_windows(self) -> list[int]:
        """Each layer's span as PagedAttention.attend takes it: a sliding window (> 0), attention chunks
        (< 0: -size, Llama 4), or 0 for full attention."""
        return [window or -chunk for window, chunk in zip(self.layer_windows, self.layer_chunks)]

    @property
    def rotary_dim(self) -> int:
        """The dimensions of a head the rotary embedding turns: all (a partial one is mostly read as a
        whole-head one: lcq.format.views), the first rotated_dims, or the latent attention's rotated part."""
        return self.latent.rope_dim if self.latent is not None else self.rotated_dims or self.head_dim

    @property
    def recurrent(self) -> bool:
        """Whether layers keep a recurrent state per sequence (a recurrent mixer, or Falcon-H1's beside attention)."""
        return any(self.linear_layers) or self.parallel_mamba

    @property
    def cache_layers(self) -> list[int]:
        """The layers with a KV cache: those with attention (not a recurrent mixer, nor Nemotron-H's MLP blocks)."""
        return [i for i, (linear, mixer) in enumerate(zip(self.linear_layers, self.mixer_layers))
                if mixer and not linear]

    def mtp_layer_config(self) -> "ModelConfig":
        """The settings of the multi-token-prediction layer, as one layer of this model: full attention that
        turns (at every position), a mixture where the model's last layer has one."""
        return dataclasses.replace(self, num_layers=1, layer_windows=[0], layer_chunks=[0], rope_layers=[True],
                                   moe_layers=self.moe_layers[-1:], temperature_layers=[False], linear_layers=[False],
                                   mixer_layers=[True], mlp_layers=[True])

    @property
    def values_in_keys(self) -> bool:
        """Whether a layer's values are its cached keys' rows (latent attention), so that it needs no V cache."""
        return self.latent is not None

    def __post_init__(self) -> None:
        if not self.layer_windows:
            self.layer_windows = [0] * self.num_layers
        if not self.rope_layers:
            self.rope_layers = [True] * self.num_layers
        if not self.layer_chunks:
            self.layer_chunks = [0] * self.num_layers
        if not self.moe_layers:
            self.moe_layers = [False] * self.num_layers
        if not self.temperature_layers:
            self.temperature_layers = [self.query_temperature is not None] * self.num_layers
        if not self.linear_layers:
            self.linear_layers = [False] * self.num_layers
        if not self.mixer_layers:
            self.mixer_layers = [True] * self.num_layers
        if not self.mlp_layers:
            self.mlp_layers = [True] * self.num_layers


def _viewed_names(stored: dict, names: list[str] | None) -> list[str] | None:
    """The tensor names lcq reads a folder by (lcq.format.views: Nemotron-H's multi-token-prediction layers not
    among them)."""
    viewed = None if names is None else view_tensors(stored, names)
    return names if viewed is None else list(viewed)


def _context_length(c: dict, rope: dict) -> int:
    """Longest context we serve. YaRN extends it to factor x the original length (the model card's
    recipe for long context: add the scaling to the config; vLLM does the same)."""
    span = c.get("max_position_embeddings", 4096)
    if rope["rope_type"] == "yarn":
        span = max(span, int(rope["original_max_position_embeddings"] * rope["factor"]))
    return span
