"""The few numbers our model needs, read from a Hugging Face config.json."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from lcq.errors import UserError
from lcq.format import VIEWED_ARCHITECTURES, ViewError, stored_tensor_names, view_config, view_tensors
from lcq.format.mtp import MtpNames, mtp_names
from lcq.format.views import LFM2  # short convolutions (ShortConvDims) in most layers

from .layers import ROPE_TYPES, rope_settings

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                           "Qwen3ForCausalLM": "qwen3", "Gemma3ForCausalLM": "gemma3_text",
                           "SmolLM3ForCausalLM": "smollm3", "Olmo2ForCausalLM": "olmo2", "Gemma2ForCausalLM": "gemma2",
                           "Ministral3ForCausalLM": "ministral3", "Exaone4ForCausalLM": "exaone4",
                           "SeedOssForCausalLM": "seed_oss", "Olmo3ForCausalLM": "olmo3",
                           "HunYuanDenseV1ForCausalLM": "hunyuan_v1_dense", "Glm4ForCausalLM": "glm4",
                           "Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral",
                           "OlmoeForCausalLM": "olmoe", "Qwen2MoeForCausalLM": "qwen2_moe",
                           "CohereForCausalLM": "cohere", "Cohere2ForCausalLM": "cohere2",
                           "StableLmForCausalLM": "stablelm", "GptOssForCausalLM": "gpt_oss",
                           "Llama4ForCausalLM": "llama4_text", "Glm4MoeForCausalLM": "glm4_moe",
                           "Ernie4_5_MoeForCausalLM": "ernie4_5_moe", "HunYuanMoEV1ForCausalLM": "hunyuan_v1_moe",
                           "Dots1ForCausalLM": "dots1", "DeepseekV2ForCausalLM": "deepseek_v2",
                           "DeepseekV3ForCausalLM": "deepseek_v3", "Glm4MoeLiteForCausalLM": "glm4_moe_lite",
                           "Qwen3_5ForCausalLM": "qwen3_5_text", "Qwen3_5MoeForCausalLM": "qwen3_5_moe_text",
                           "Qwen3NextForCausalLM": "qwen3_next", "MiniMaxM2ForCausalLM": "minimax_m2",
                           "GraniteMoeHybridForCausalLM": "granitemoehybrid", "Lfm2ForCausalLM": "lfm2",
                           "Lfm2MoeForCausalLM": "lfm2_moe", "BambaForCausalLM": "bamba",
                           "NemotronHForCausalLM": "nemotron_h", "FalconH1ForCausalLM": "falcon_h1",
                           "ArceeForCausalLM": "arcee", "ApertusForCausalLM": "apertus",
                           "GraniteMoeForCausalLM": "granitemoe", "GraniteMoeSharedForCausalLM": "granitemoeshared"}
GRANITE_EXPERTS = ("granitemoehybrid", "granitemoe", "granitemoeshared")  # Granite's layers read as themselves
# OLMo 3's rotary base: its full layers' where config.json gives none, its sliding layers' always unless
# rope_parameters gives theirs (transformers' Olmo3Config takes rope_theta for the full layers only).
OLMO3_THETA = 500_000.0
GEMMA = ("gemma3_text", "gemma2")  # Gemma's layer: norms around attention and MLP, weights stored as w - 1
HUNYUAN = ("hunyuan_v1_dense", "hunyuan_v1_moe")  # Hunyuan's layer: q/k norms after the rotary embedding
LATENT = ("deepseek_v2", "deepseek_v3", "glm4_moe_lite")
# Llama's layer with an MLP of up_proj, an activation and down_proj, no gate: Arcee's relu(x)^2, Apertus's xIELU
# (whose two learned factors each MLP keeps beside it)
UNGATED_FAMILIES = {"arcee": "relu2", "apertus": "xielu"}  # multi-head latent attention (LatentDims)
QWEN3_5 = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")  # linear attention (LinearDims) in most layers
# Layers whose norms (and rotary pairs) are not Llama's. OLMo 2's: norms on the attention's and the MLP's
# outputs only, q/k norms over the whole projections (OLMo 3's too, with sliding-window layers); EXAONE 4's
# the same with q/k norms per head; GLM-4-0414's: norms on inputs and outputs, adjacent rotary pairs;
# OLMoE's and MiniMax-M2's: Llama's norms, q/k norms over the whole projections; Cohere's (and Cohere 2's): one
# LayerNorm before attention and the MLP side by side, adjacent rotary pairs; StableLM's: LayerNorms with biases.
LAYER_NORMS = {"olmo2": dict(sandwich_norms=True, pre_norms=False, qk_norm_per_head=False),
               "olmo3": dict(sandwich_norms=True, pre_norms=False, qk_norm_per_head=False),
               "exaone4": dict(sandwich_norms=True, pre_norms=False),
               "glm4": dict(sandwich_norms=True, rotary_interleaved=True),
               "olmoe": dict(qk_norm_per_head=False), "minimax_m2": dict(qk_norm_per_head=False),
               "cohere": dict(layer_norm=True, parallel_block=True, rotary_interleaved=True),
               "cohere2": dict(layer_norm=True, parallel_block=True, rotary_interleaved=True),
               "stablelm": dict(layer_norm=True, norm_bias=True),
               "ernie4_5_moe": dict(rotary_interleaved=True)}  # ERNIE 4.5's mixtures: adjacent rotary pairs


@dataclass(frozen=True)
class LatentDims:
    """DeepSeek's multi-head latent attention (MLA: DeepSeek-V2 and V3, Moonlight, GLM-4.7-Flash): every head's
    key and value come from one normed latent of kv_rank values per token (kv_b_proj), beside a rotated key
    part all heads share; the queries come from q_proj, or through a latent of q_rank values first."""

    kv_rank: int  # kv_lora_rank
    q_rank: int  # q_lora_rank, 0 where the queries take one q_proj
    nope_dim: int  # qk_nope_head_dim: a query or key head's dimensions without rotary embedding
    rope_dim: int  # qk_rope_head_dim: its rotated ones
    value_dim: int  # v_head_dim


@dataclass(frozen=True)
class LinearDims:
    """Qwen3.5's linear attention (Gated DeltaNet): per token a short causal convolution over the projected
    queries, keys and values, then a recurrent state per value head (head_k_dim x head_v_dim) decayed and
    updated by the delta rule, read by the queries; key heads serve num_v_heads / num_k_heads value heads."""

    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int

    @property
    def conv_dim(self) -> int:
        """Channels of the convolution: the queries', keys' and values' widths."""
        return 2 * self.num_k_heads * self.head_k_dim + self.num_v_heads * self.head_v_dim


@dataclass(frozen=True)
class MambaDims:
    """Mamba-2's state space layer (Granite 4.0-H): per token a short causal convolution over the projected
    inputs x and the shared B and C, then per head a state (state_dim x head_dim) decayed by exp(dt A) and
    added B (dt x)^T, read by C, plus D x; B and C are shared by num_heads / groups heads each. Its outputs
    are gated by silu(z) and (but Falcon-H1's, by default) RMS-normed per group."""

    num_heads: int
    head_dim: int
    state_dim: int
    groups: int
    conv_kernel: int
    time_step_limit: tuple[float, float]  # dt clamped to it
    # The outputs' norm per group: "gated" of the outputs times silu(z) (Granite 4.0-H, Nemotron-H), "before_gate"
    # of the outputs, then times silu(z), or "none": the outputs times silu(z) alone (Falcon-H1's options)
    norm: str = "gated"
    conv_bias: bool = True

    @property
    def inner(self) -> int:
        """The width of x, of the gate z, and of the output."""
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the convolution: x's, B's and C's widths."""
        return self.inner + 2 * self.groups * self.state_dim


@dataclass(frozen=True)
class ShortConvDims:
    """LFM2's short convolution: in_proj gives each token B, C and x; B x passes a causal convolution of kernel
    taps per channel (with a bias where bias), whose output times C goes to out_proj."""

    kernel: int
    bias: bool


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
                            f"(supported: {', '.join((*SUPPORTED_ARCHITECTURES, *VIEWED_ARCHITECTURES))})")
        rope = rope_settings(c)
        if rope["rope_type"] not in ROPE_TYPES:
            raise UserError(f"{folder}: rope type {rope['rope_type']!r} is not supported "
                            f"(supported: {', '.join(ROPE_TYPES)})")
        ungated = UNGATED_FAMILIES.get(c["model_type"])
        if ungated is not None and c.get("hidden_act", ungated) != ungated:
            raise UserError(f"{folder}: hidden_act {c['hidden_act']!r} is not supported for this family's MLP "
                            f"({ungated})")
        if c.get("clip_qkv") is not None:  # an option of OLMoE's (and OLMo 1's) config
            raise UserError(f"{folder}: clip_qkv (clamping queries, keys and values) is not supported")
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        for kind in ("short_factor", "long_factor") if rope["rope_type"] == "longrope" else ():
            if len(rope.get(kind) or ()) != head_dim // 2:
                raise UserError(f"{folder}: longrope needs {head_dim // 2} {kind} values (one per rotary frequency), "
                                f"config.json gives {len(rope.get(kind) or ())}")
        family = _gemma_fields(c, folder) if c["model_type"] in GEMMA else \
            _layer_type_ropes(c, folder, c.get("rope_theta", OLMO3_THETA), OLMO3_THETA) if c["model_type"] == "olmo3" \
            else {}
        return cls(layer_windows=_layer_windows(c), rope_layers=_rope_layers(c), layer_chunks=_layer_chunks(c),
            model_type=c["model_type"], vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
            # the dense MLPs' width (Llama 4's experts take intermediate_size, its dense layers intermediate_size_mlp)
            intermediate_size=_dense_mlp_width(c),
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
            (c["model_type"] in ("glm4_moe", "cohere") and bool(c.get("use_qk_norm"))) or _stablelm_qk_norms(c),
            qk_norm_weights_per_head=(c["model_type"] == "cohere" and bool(c.get("use_qk_norm"))) or
            _stablelm_qk_norms(c),
            qk_norm_after_rotary=c["model_type"] in (*HUNYUAN, "llama4_text"),
            rope=family.pop("rope", rope),
            **family, **LAYER_NORMS.get(c["model_type"], {}), **_experts(c), **_gpt_oss_fields(c), **_llama4_fields(c),
            **_latent_fields(c, rope), **_qwen3_5_fields(c), **_granite_hybrid_fields(c), **_lfm2_fields(c),
            **_bamba_fields(c), **_nemotron_h_fields(c), **_falcon_h1_fields(c),
            **({"rotated_dims": _rotated_dims(c)} if c["model_type"] == "minimax_m2" else {}),
            **({"activation": UNGATED_FAMILIES[c["model_type"]]} if c["model_type"] in UNGATED_FAMILIES else {}),
            logit_scale=float(c.get("logit_scale") or 1.0) if c["model_type"] in ("cohere", "cohere2") else
            float(c.get("lm_head_multiplier", 1.0)) if c["model_type"] == "falcon_h1" else 1.0,
            **({"parallel_block": True} if c["model_type"] == "stablelm" and c.get("use_parallel_residual") else {}),
            query_temperature=_query_temperature(c, rope), mtp=mtp_names(c, viewed),
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


def _gemma_fields(c: dict, folder: str | Path) -> dict:
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
    return dict(shared, **_layer_type_ropes(c, folder, c.get("rope_theta", 1_000_000.0),
                                            c.get("rope_local_base_freq", 10_000.0)))


def _layer_type_ropes(c: dict, folder: str | Path, full_theta: float, local_theta: float) -> dict:
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


def _query_temperature(c: dict, rope: dict) -> tuple[float, int, int] | None:
    """Ministral 3's query temperature: llama_4_scaling_beta of its rotary settings over their original
    context length; Llama 4's (attn_temperature_tuning): attn_scale over floor_scale, from position p + 1."""
    if c["model_type"] == "llama4_text":
        tuning = c.get("attn_temperature_tuning", True)
        return (float(c.get("attn_scale", 0.1)), int(c.get("floor_scale", 8192)), 1) if tuning else None
    beta = rope.get("llama_4_scaling_beta") if c["model_type"] == "ministral3" else None
    return None if not beta else (float(beta), int(rope["original_max_position_embeddings"]), 0)


def _llama4_fields(c: dict) -> dict:
    """Llama 4's layer beside Llama's: the MLP under feed_forward, rotary pairs adjacent (its complex
    rotation), unweighted per-head norms of the rotated queries and keys (use_qk_norm), the attention
    temperature in its NoPE layers only."""
    if c["model_type"] != "llama4_text":
        return {}
    nope = [not rope for rope in _rope_layers(c)]
    return dict(mlp_name="feed_forward", rotary_interleaved=True, qk_l2_norm=bool(c.get("use_qk_norm", True)),
                temperature_layers=nope)


def _latent_fields(c: dict, rope: dict) -> dict:
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


def _qwen3_5_fields(c: dict) -> dict:
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
                rotated_dims=_rotated_dims(c), attention_output_gate=True)


def _mamba_dims(c: dict) -> MambaDims:
    """Mamba-2's dimensions, as Granite 4.0-H's and Bamba's configs name them."""
    return MambaDims(num_heads=c["mamba_n_heads"], head_dim=c["mamba_d_head"], state_dim=c["mamba_d_state"],
                     groups=c["mamba_n_groups"], conv_kernel=c["mamba_d_conv"],
                     time_step_limit=tuple(float(limit) for limit in c.get("time_step_limit") or (0.0, math.inf)))


def _stablelm_qk_norms(c: dict) -> bool:
    """StableLM 2 12B's LayerNorms of each query and key head (qk_layernorm), each head its own weights."""
    return c["model_type"] == "stablelm" and bool(c.get("qk_layernorm"))


def _granite_hybrid_fields(c: dict) -> dict:
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


def _falcon_h1_fields(c: dict) -> dict:
    """Falcon-H1's layer beside Llama's (its factors folded into weights by the view, but the embeddings' and the
    logits', which logit_scale carries): Mamba-2 beside the attention in every layer, its outputs normed as
    mamba_rms_norm and mamba_norm_before_gate say; the MLP under feed_forward."""
    if c["model_type"] != "falcon_h1":
        return {}
    norm = ("before_gate" if c.get("mamba_norm_before_gate", True) else "gated") if c.get("mamba_rms_norm") else "none"
    mamba = dataclasses.replace(_mamba_dims(c), norm=norm, conv_bias=bool(c.get("mamba_conv_bias", True)))
    return dict(mamba=mamba, parallel_mamba=True, mlp_name="feed_forward",
                embed_scale=float(c.get("embedding_multiplier", 1.0)))


def _bamba_fields(c: dict) -> dict:
    """Bamba's layer beside Llama's: Mamba-2 in every layer but attn_layer_indices', whose attention turns the
    first half of each head; the MLP under feed_forward."""
    if c["model_type"] != "bamba":
        return {}
    attention = set(c.get("attn_layer_indices") or ())
    return dict(linear_layers=[i not in attention for i in range(c["num_hidden_layers"])], mamba=_mamba_dims(c),
                mlp_name="feed_forward", rotated_dims=_rotated_dims(c))


def _nemotron_h_fields(c: dict) -> dict:
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


def _lfm2_fields(c: dict) -> dict:
    """LFM2's layer beside Llama's: short convolutions in the layers layer_types names so, attention (per-head
    q/k norms, its output projection out_proj) in the others, the MLP (or mixture) under feed_forward."""
    if c["model_type"] not in LFM2:
        return {}
    return dict(linear_layers=[kind == "conv" for kind in c["layer_types"]], mlp_name="feed_forward",
                short_conv=ShortConvDims(kernel=c.get("conv_L_cache", 3), bias=bool(c.get("conv_bias", False))),
                attention_output_name="out_proj")


def _viewed_names(stored: dict, names: list[str] | None) -> list[str] | None:
    """The tensor names lcq reads a folder by (lcq.format.views: Nemotron-H's multi-token-prediction layers not among them)."""
    viewed = None if names is None else view_tensors(stored, names)
    return names if viewed is None else list(viewed)


def _dense_mlp_width(c: dict) -> int:
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


def _rotated_dims(c: dict) -> int | None:
    """The dimensions of each head a partial rotary embedding turns, its first ones (Qwen3.5's, MiniMax-M2's:
    pairs (i, i + r/2) within them); None where it turns whole heads."""
    rope = c.get("rope_parameters") or {}
    factor = rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return None if factor == 1.0 else int(head_dim * factor)


def _gpt_oss_fields(c: dict) -> dict:
    """gpt-oss's layer beside Llama's: attention sinks, biases on every projection (q/k/v/o: attention_bias),
    the router and the experts, and its clamped SwiGLU."""
    if c["model_type"] != "gpt_oss":
        return {}
    return dict(attention_sinks=True, activation="swiglu_oai", swiglu_limit=float(c.get("swiglu_limit", 7.0)),
                swiglu_alpha=float(c.get("swiglu_alpha", 1.702)))


def _experts(c: dict) -> dict:
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


def _layer_windows(c: dict) -> list[int]:
    """Each layer's sliding window (0: full attention), as transformers reads the config: Gemma's
    layer_types (or every sliding_window_pattern-th layer full: Gemma 3's every 6th, Gemma 2's every
    2nd), all of Mistral's layers, and Qwen2/3's layers from max_window_layers on where use_sliding_window
    is set."""
    count, kind = c["num_hidden_layers"], c["model_type"]
    if kind in GEMMA:
        window = c.get("sliding_window") or 4096
        pattern = c.get("sliding_window_pattern", 2 if kind == "gemma2" else 6)
        default = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(count)]
    elif kind in ("mistral", "ministral3", "mixtral"):
        return [c.get("sliding_window") or 0] * count
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


def _rope_layers(c: dict) -> list[bool]:
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


def _context_length(c: dict, rope: dict) -> int:
    """Longest context we serve. YaRN extends it to factor x the original length (the model card's
    recipe for long context: add the scaling to the config; vLLM does the same)."""
    span = c.get("max_position_embeddings", 4096)
    if rope["rope_type"] == "yarn":
        span = max(span, int(rope["original_max_position_embeddings"] * rope["factor"]))
    return span


def _layer_chunks(c: dict) -> list[int]:
    """Llama 4's chunked attention: its layer_types' chunked_attention layers (by default its rotary ones,
    as transformers reads the config) attend within chunks of attention_chunk_size tokens; [] for the
    others."""
    chunk = c.get("attention_chunk_size") if c["model_type"] == "llama4_text" else None
    if not chunk:
        return []
    types = c.get("layer_types") or ["chunked_attention" if rope else "full_attention" for rope in _rope_layers(c)]
    return [chunk if kind == "chunked_attention" else 0 for kind in types]
