"""Folders lcq reads as an architecture it runs: the config and tensor names a reader sees.

- Multimodal wrappers (Gemma 3 from 4B up: Gemma3ForConditionalGeneration; Mistral Small 3.1:
  Mistral3ForConditionalGeneration; LlavaForConditionalGeneration; SmolVLM: Idefics3 and
  SmolVLMForConditionalGeneration; InternVL3: InternVLForConditionalGeneration) keep a Llama-family
  language model beside a vision tower: its config under `text_config`, its tensors under a prefix. They read as that
  language model alone (its config completed with transformers' defaults, since the Hub's files leave
  out every default); the vision tower and projector are never read.
- Qwen's vision-language models (Qwen2-VL, Qwen2.5-VL: Qwen2's decoder; Qwen3-VL: Qwen3's) read the
  same way, as Qwen2ForCausalLM or Qwen3ForCausalLM. Their multimodal rotary embedding gives each token
  three position components (time, height, width), which for text are all the token's position: the
  rotation is then ordinary RoPE at the same base. Qwen2.5-VL's files keep the text settings at the top
  level (no text_config) and the text model's tensors under their CausalLM names, the vision tower's
  under visual.*; Qwen3-VL's visual embeddings added to early layers (deepstack) come only with images.
  Qwen3-VL-MoE reads as Qwen3-MoE, its router renormalizing as it always does; its experts are 3-D tensors
  (gate's columns, then up's), (in, out) in the Hub's files and (out, in) as transformers 5 saves them,
  told apart by shape, read as each expert's gate_proj, up_proj and down_proj.
- Phi-3 and Phi-4 (Phi3ForCausalLM) are Mistral's decoder (sliding window included) with q/k/v and
  gate/up each stored as one matrix. They read as Mistral, each part a range of the fused matrix's rows
  (read alone from the file), so every part is quantized and fused again as in the other families.
  Phi-4-mini's partial rotary embedding reads as a whole-head one, exactly: its query and key rows
  reordered within each head, LongRoPE factors that give the rotated dimensions their frequencies and
  the others none (_phi3_rotation).
- InternLM3 is Llama's decoder with its own config defaults (head_dim 128); ERNIE 4.5 (dense) and Helium
  are Llama's decoder with a rotary embedding that turns adjacent pairs of dimensions (2i, 2i + 1), where
  Llama's turns (i, i + d/2). They read as Llama, ERNIE's and Helium's with each query and key head's rows
  reordered, even ones first (_half_split_parts).
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
- Qwen3-Next (Qwen3NextForCausalLM) is Qwen3.5's layer with its linear attention's projections stored
  fused per key head (in_proj_qkvz: each key head's q, k, then its value heads' v and z rows; in_proj_ba:
  their b then a rows). They read as Qwen3.5's in_proj_qkv, in_proj_z, in_proj_b and in_proj_a, each the
  stored rows it picks (interleaved_parts), so that both families quantize and run alike.
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
- Folders saved from the base model (Qwen3-Embedding 4B and 8B: tensors named layers.*, embed_tokens.*,
  norm.*, no head) read with the model. prefix, their head tied to the embedding table (an embedding
  model is served for /v1/embeddings, which reads no head).
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
- Nemotron-H (NemotronHForCausalLM: Nemotron-H, Nemotron Nano 2, Nemotron 3) reads as itself with its config
  completed with transformers' defaults (its blocks' kinds from hybrid_override_pattern) and its tensors under
  the names the other families have (backbone. as model., as transformers reads them; its embeddings as
  model.embed_tokens); its multi-token-prediction layers (mtp.*) are not read.

A quantized result is a plain checkpoint of the architecture read (Gemma3ForCausalLM, MistralForCausalLM,
LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from .fp8 import is_fp8

# Qwen's vision-language wrappers and the family each one's text model reads as.
QWEN_VL = {"Qwen2VLForConditionalGeneration": "qwen2", "Qwen2_5_VLForConditionalGeneration": "qwen2",
           "Qwen3VLForConditionalGeneration": "qwen3", "Qwen3VLMoeForConditionalGeneration": "qwen3_moe"}
QWEN_CAUSAL_LM = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
WRAPPERS = ("Gemma3ForConditionalGeneration", "Mistral3ForConditionalGeneration", "LlavaForConditionalGeneration",
            "Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration", "InternVLForConditionalGeneration",
            "Llama4ForConditionalGeneration", "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration",
            *QWEN_VL)
# Where a wrapper keeps the language model's tensors, and their text-model names: the Hub's files (and
# what transformers writes) first, then transformers 4.52-4.57's own saves; Qwen3.5's multi-token-prediction
# layer beside them (lcq/format/mtp.py).
TEXT_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                 ("model.language_model.", "model."), ("model.text_model.", "model."), ("lm_head.", "lm_head."),
                 ("mtp.", "mtp."),
                 *((f"model.{part}.", f"model.{part}.") for part in ("layers", "embed_tokens", "norm")))  # Qwen2.5-VL
BASE_MODEL_PREFIX = "model."  # what a CausalLM's tensor names have that its base model's lack
# Top-level settings a wrapper's text model inherits where its text_config has none.
INHERITED = ("torch_dtype", "dtype")
# Top-level settings that win over text_config's: transformers ties a wrapper's head to its embedding
# table by the wrapper's own setting (a Mistral3 whose text_config says untied is saved without a head).
OVERRIDING = ("tie_word_embeddings",)
# Llama's layer under other names (model types, and their architectures); INTERLEAVED: with the rotary
# embedding turning adjacent pairs of dimensions.
AS_LLAMA = {"ernie4_5": "Ernie4_5ForCausalLM", "helium": "HeliumForCausalLM", "internlm3": "InternLM3ForCausalLM"}
INTERLEAVED = ("ernie4_5", "helium")
# Architectures read as another one (named in the errors that list what lcq reads).
# Granite's families with experts, read as themselves with their factors folded (_granite_scales): model type ->
# architecture
GRANITE_EXPERTS = {"granitemoehybrid": "GraniteMoeHybridForCausalLM", "granitemoe": "GraniteMoeForCausalLM",
                   "granitemoeshared": "GraniteMoeSharedForCausalLM"}
VIEWED_ARCHITECTURES = ("Phi3ForCausalLM", "GraniteForCausalLM", *GRANITE_EXPERTS.values(), "GlmForCausalLM",
                        "Glm4ForCausalLM", "StableLmForCausalLM", "Qwen3NextForCausalLM", *AS_LLAMA.values(),
                        *WRAPPERS)
# Families read as themselves with their partial rotary embeddings over whole heads (_whole_head_config).
WHOLE_HEAD = {"glm4": "Glm4ForCausalLM", "stablelm": "StableLmForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}
# LongRoPE's factor for the frequencies that must not turn (a partial rotary embedding's other dimensions).
UNTURNED = 1e30
SPECIAL_FLOAT = "__float__"  # transformers 5's JSON for infinities and NaN
SPECIAL_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}
# Settings that Mistral's and Llama's configs have under the same name and meaning as Phi-3's and Granite's.
KEPT = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
        "rope_parameters", "rope_scaling", "sliding_window", "attention_bias", "mlp_bias", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "initializer_range", "use_cache")


class ViewError(ValueError):
    """A folder whose model cannot be read as one lcq runs."""


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor of the view lives: a stored tensor, or the rows [start, stop) of one."""

    name: str
    rows: tuple[int, int] | None = None
    # The view's tensor is the stored one times this, or each row times its own (read in fp32 where not 1).
    scale: float | tuple[float, ...] = 1.0
    order: tuple[int, ...] | None = None  # the view's row i is row order[i] of the rows above (then scaled)
    # how many rows `order` reorders (or picks from: Qwen3-Next's fused projections), where not len(order)
    picked_from: int | None = None
    # A mixture's experts stored as one 3-D tensor (gpt-oss): the view's tensor is the slice [expert] of its
    # first dimension, stored (in, out) where transposed, in MXFP4 where mxfp4 (the codes under `name`, the
    # scales under its name with _scales for _blocks), and `rows` taken every row_step-th row (gate and up
    # rows alternate)
    expert: int | None = None
    transposed: bool = False
    mxfp4: bool = False
    row_step: int = 1
    # Stored (in, out) where the stored matrix's last dimension has this many entries, the view's output rows
    # (Qwen3-VL-MoE: the Hub's files are (in, out), transformers' saves (out, in))
    transposed_if_last: int | None = None

    @property
    def rows_read(self) -> int:
        """The rows `order` applies to: as many as it names, or those it picks from."""
        return self.picked_from or len(self.order)

    def is_transposed(self, stored_shape: tuple[int, ...]) -> bool:
        """Whether the stored matrix (an expert's slice: its last two dimensions) is (in, out)."""
        return self.transposed or (self.transposed_if_last is not None and
                                   stored_shape[-1] == self.transposed_if_last)

    def rearranged(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` (this tensor's rows of the stored one, already cut to `rows`) reordered (or picked) and scaled
        as the view reads them: for the stored tensor itself, and for an adapter's B matrix, whose rows are
        its matrix's output rows."""
        if self.order is not None:
            if rows.shape[0] != self.rows_read:
                raise ValueError(f"{self.name}: {rows.shape[0]} rows where the view reads {self.rows_read}")
            rows = rows[list(self.order)]
        if isinstance(self.scale, tuple):  # one per row
            return rows.float() * torch.tensor(self.scale).reshape(-1, *[1] * (rows.dim() - 1))
        return rows if self.scale == 1.0 else rows.float() * self.scale


def source_parts(config: dict[str, Any], stored_name: str) -> dict[str, StoredTensor]:
    """The view's tensors read from the stored tensor `stored_name` of a folder whose config.json is
    `config`, with where each lies in it (none for a tensor the view does not read): how a matrix of
    the source model, such as a LoRA adapter's, maps onto the view's."""
    return view_tensors(config, [stored_name]) or {stored_name: StoredTensor(stored_name)}


def view_config(config: dict[str, Any], stored: list[str] | None = None) -> dict[str, Any]:
    """config.json of the model lcq runs for a folder whose config.json is `config` and whose tensors are
    `stored` (None: not known; only a base-model save's head depends on them)."""
    if is_fp8(config.get("quantization_config")):  # decoded as read (CheckpointReader)
        return view_config({key: value for key, value in config.items() if key != "quantization_config"}, stored)
    architecture = (config.get("architectures") or [None])[0]
    if architecture in WRAPPERS:
        return _text_model_config(config, architecture)
    if architecture == "Phi3ForCausalLM" or config.get("model_type") == "phi3":
        return _phi3_as_mistral(config)
    if architecture == "GraniteForCausalLM" or config.get("model_type") == "granite":
        return _granite_as_llama(config)
    if config.get("model_type") == "granitemoehybrid" and _granite4_is_dense(config):
        return _granite4_as_llama(config)
    if config.get("model_type") in GRANITE_EXPERTS:
        return _granite_experts(config)
    if config.get("model_type") == "glm":
        return _glm_as_qwen2(config)
    if config.get("model_type") in WHOLE_HEAD:
        return _whole_head_config(config, WHOLE_HEAD[config["model_type"]])
    if config.get("model_type") in AS_LLAMA:
        return _as_llama(config)
    if config.get("model_type") == "ernie4_5_moe":  # its own defaults (head_dim, tied head, MoE layers)
        return _with_defaults(config, "Ernie4_5_MoeForCausalLM")
    if config.get("model_type") == "qwen3_next":  # its own defaults (linear attention's dimensions)
        return _with_defaults(config, "Qwen3NextForCausalLM")
    if config.get("model_type") == "minimax_m2":  # its own defaults (rotary base, partial rotary from rotary_dim)
        return _with_defaults(config, "MiniMaxM2ForCausalLM")
    if config.get("model_type") in LFM2:  # their own defaults (tied head, layer types)
        return _with_defaults(config, LFM2[config["model_type"]])
    if config.get("model_type") == "bamba":  # its own defaults (Mamba-2's head width, half of each head turning)
        return _with_defaults(config, "BambaForCausalLM")
    if config.get("model_type") == "nemotron_h":
        return _nemotron_h(config)
    if config.get("model_type") == "falcon_h1":
        return _falcon_h1(config)
    if config.get("model_type") == "apertus":  # its own defaults (rotary base 12,000,000, llama3 scaling)
        return _with_defaults(config, "ApertusForCausalLM")
    if config.get("model_type") == "gpt_oss" and (config.get("quantization_config") or {}).get("quant_method") == MXFP4:
        return {key: value for key, value in config.items() if key != "quantization_config"}  # decoded as read
    if stored is not None and _base_model_save(stored):
        return {**config, "tie_word_embeddings": True}
    return config


def view_tensors(config: dict[str, Any], stored: list[str]) -> dict[str, StoredTensor] | None:
    """The view's tensor names and where each is stored, for a folder with config.json `config` and
    tensors `stored`; None where the names are the stored ones."""
    architecture = (config.get("architectures") or [None])[0]
    if architecture in WRAPPERS:
        texts = {text: name for name in stored if (text := _text_model_name(name)) is not None}
        text_config = _text_model_config(config, architecture)
        if text_config["model_type"] not in SPLIT_EXPERTS:
            return {text: StoredTensor(name) for text, name in texts.items()}
        return {view: dataclasses.replace(part, name=texts[part.name])  # Llama 4's experts
                for view, part in _expert_parts(text_config, list(texts)).items()}
    if architecture == "Phi3ForCausalLM" or config.get("model_type") == "phi3":
        return _phi3_parts(config, stored)
    if architecture == "GraniteForCausalLM" or config.get("model_type") in ("granite", *GRANITE_EXPERTS):
        return _granite_scales(config, stored)
    if config.get("model_type") in INTERLEAVED:
        return _half_split_parts(_as_llama(config), stored)
    if config.get("model_type") == "glm":
        return _glm_parts(config, stored)
    if config.get("model_type") in ("mixtral", "minimax_m2", *LFM2):
        return {_mixtral_name(name): StoredTensor(name) for name in stored}
    if config.get("model_type") == "qwen3_next":
        return _qwen3_next_parts(config, stored)
    if config.get("model_type") == "nemotron_h":
        return _nemotron_h_names(stored)
    if config.get("model_type") == "falcon_h1":
        return _falcon_h1_scales(config, stored)
    if config.get("model_type") == "ernie4_5_moe":  # its choosing bias as transformers' router holds it
        return {name.replace(".mlp.moe_statics.", ".mlp.gate.moe_statics."): StoredTensor(name) for name in stored}
    if config.get("model_type") in SPLIT_EXPERTS and any(name.endswith(GPT_OSS_EXPERTS) for name in stored):
        return _expert_parts(config, stored)
    if config.get("model_type") in ("stablelm", "glm4_moe"):
        return _rotated_first_parts(config, stored)
    if config.get("model_type") == "glm4":
        intermediate = _with_defaults(config, "Glm4ForCausalLM")["intermediate_size"]
        return _split(stored, {"mlp.gate_up_proj.weight": (("mlp.gate_proj.weight", 0, intermediate, 1.0, None),
                                                           ("mlp.up_proj.weight", intermediate, 2 * intermediate,
                                                            1.0, None))})
    if _base_model_save(stored):
        return {BASE_MODEL_PREFIX + name: StoredTensor(name) for name in stored}
    return None


# 3-D experts' tensors (all experts of a layer in each: gpt-oss's, Llama 4's), as transformers saves them and
# gpt-oss's in MXFP4 as the Hub has them (the codes, their scales)
GPT_OSS_EXPERTS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias", "gate_up_proj_blocks",
                   "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales")
MXFP4 = "mxfp4"  # gpt-oss's quant_method
# LFM2's families (their short convolutions and attention, dense or with experts) and their CausalLMs
LFM2 = {"lfm2": "Lfm2ForCausalLM", "lfm2_moe": "Lfm2MoeForCausalLM"}
# Where a family keeps its final norm, where not under model.norm
FINAL_NORMS = {**dict.fromkeys(LFM2, "model.embedding_norm"), "bamba": "model.final_layernorm",
               "nemotron_h": "model.norm_f", "falcon_h1": "model.final_layernorm"}
# Mixtral's experts' matrices by their Hub names, and the names transformers 5 gives them (as Qwen3-MoE's)
MIXTRAL_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _mixtral_name(name: str) -> str:
    """A Mixtral, MiniMax-M2 or LFM2 tensor's name as lcq reads it: block_sparse_moe.gate (and MiniMax-M2's
    choosing bias) under mlp, experts.E.w1/w3/w2 (and LFM2's feed_forward.w1/w3/w2) as
    experts.E.gate_proj/up_proj/down_proj (transformers 5's modules and Qwen3-MoE's names)."""
    parts = name.replace(".block_sparse_moe.", ".mlp.").split(".")
    expert = len(parts) > 3 and parts[-3].isdigit() and parts[-4] == "experts"
    if expert or parts[-3:-2] == ["feed_forward"]:
        parts[-2] = MIXTRAL_EXPERT_NAMES.get(parts[-2], parts[-2])
    return ".".join(parts)


@dataclass(frozen=True)
class ExpertTensors:
    """How a family stores its experts as 3-D tensors (all experts of a layer in each)."""

    architecture: str  # its CausalLM
    owner: str  # where the experts sit in a layer
    alternating: bool  # gate and up columns alternate in gate_up_proj (gpt-oss), else gate's then up's
    width: str = "intermediate_size"  # the config's width of the experts (their number: num_local_experts)
    either_orientation: bool = False  # stored (in, out) or (out, in), told apart by shape (Qwen3-VL-MoE)


SPLIT_EXPERTS = {"gpt_oss": ExpertTensors("GptOssForCausalLM", ".mlp.experts.", True),
                 "llama4_text": ExpertTensors("Llama4ForCausalLM", ".feed_forward.experts.", False),
                 "qwen3_moe": ExpertTensors("Qwen3MoeForCausalLM", ".mlp.experts.", False, "moe_intermediate_size",
                                            either_orientation=True)}


def _expert_parts(config: dict[str, Any], stored: list[str]) -> dict[str, StoredTensor]:
    """Every stored tensor under its own name, but a layer's experts stored as 3-D tensors (gate_up_proj
    (experts, hidden, 2 x width): gpt-oss's gate and up columns alternating, Llama 4's gate columns then
    up's; down_proj (experts, width, hidden); each (in, out); gpt-oss's with biases, or as MXFP4 codes and
    scales (out, in)) as each expert's experts.{e}.gate_proj, up_proj and down_proj weights and biases
    (transformers' modules as lcq.quantizer.reference.as_stored splits them, and how the family's LCQ
    checkpoints store them)."""
    kind = SPLIT_EXPERTS[config["model_type"]]
    owner = kind.owner
    completed = _with_defaults(config, kind.architecture)
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
        out_rows = 2 * width if matrix == "gate_up_proj" else completed["hidden_size"]
        for e in range(count):
            for part, rows in parts.items():
                view[f"{prefix}{owner}{e}.{part}.{'bias' if bias else 'weight'}"] = StoredTensor(
                    name, None if rows is None else rows[:2], expert=e,
                    transposed=not bias and stored_kind == matrix and not kind.either_orientation,
                    mxfp4=stored_kind.endswith("_blocks"), row_step=1 if rows is None else rows[2],
                    transposed_if_last=out_rows if kind.either_orientation else None)
    return view


def _base_model_save(stored: list[str]) -> bool:
    """Saved from the base model: decoder layers without the CausalLM's model. prefix, and no head."""
    return any(name.startswith("layers.") for name in stored) and \
        not any(name.startswith((BASE_MODEL_PREFIX, "lm_head.")) for name in stored)


def _text_model_config(config: dict[str, Any], architecture: str) -> dict[str, Any]:
    text = dict(config.get("text_config") or {})
    if not text and architecture in QWEN_VL and "model_type" in config:  # Qwen2(.5)-VL: the settings at the top
        text = {key: value for key, value in config.items() if key not in ("vision_config", "architectures")}
        text["model_type"] = f"{text['model_type']}_text"
    if "model_type" not in text:
        raise ViewError(f"{architecture}: text_config has no model_type")
    model_type = text.pop("model_type")
    completed = _completed(model_type, text, architecture)
    for key in INHERITED:
        if completed.get(key) is None and key in config:
            completed[key] = config[key]
    completed.update({key: config[key] for key in OVERRIDING if key in config})
    return _qwen_vl_text(completed, architecture) if architecture in QWEN_VL else completed


def _qwen_vl_text(config: dict[str, Any], architecture: str) -> dict[str, Any]:
    """A Qwen VL text model's completed config as its family's: the multimodal rotary settings as ordinary
    RoPE at their base (what they are for text alone)."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    kind = rope.get("rope_type", "default") if rope.get("type") != "mrope" else "mrope"
    if kind not in ("default", "mrope"):
        raise ViewError(f"{architecture}: rope type {kind!r} is not supported")
    family = QWEN_VL[architecture]
    config = {key: value for key, value in config.items() if key not in ("rope_parameters", "rope_scaling")}
    if family == "qwen3_moe":  # Qwen3-VL-MoE's router always renormalizes the chosen experts' weights
        config["norm_topk_prob"] = True
    return {**config, "model_type": family, "architectures": [QWEN_CAUSAL_LM[family]],
            "rope_parameters": {"rope_type": "default", "rope_theta": rope.get("rope_theta", config.get("rope_theta"))}}


def _completed(model_type: str, settings: dict[str, Any], what: str) -> dict[str, Any]:
    """`settings` of a `model_type` config with transformers' defaults for the rest, named as its CausalLM."""
    try:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        completed = AutoConfig.for_model(model_type, **_special_floats(settings)).to_dict()
    except (ImportError, ValueError, KeyError) as e:
        raise ViewError(f"{what}: this transformers cannot read its text model "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    for key in ("transformers_version", "_name_or_path", "id2label", "label2id"):
        completed.pop(key, None)
    completed["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, model_type)]
    return completed


def _special_floats(value: Any) -> Any:
    """A config's values with the floats JSON has no literal for, as transformers 5 writes them ({"__float__":
    "Infinity"}: Granite 4.0-H's time_step_limit), as floats."""
    if isinstance(value, dict):
        if set(value) == {SPECIAL_FLOAT} and value[SPECIAL_FLOAT] in SPECIAL_FLOATS:
            return SPECIAL_FLOATS[value[SPECIAL_FLOAT]]
        return {key: _special_floats(item) for key, item in value.items()}
    return [_special_floats(item) for item in value] if isinstance(value, list) else value


def _with_defaults(config: dict[str, Any], architecture: str) -> dict[str, Any]:
    """A config.json completed with transformers' defaults for its model_type (the Hub's files leave out
    what equals them, and a family's defaults need not be Llama's)."""
    return _completed(config["model_type"], {key: value for key, value in config.items()
                                             if key not in ("model_type", "architectures", "auto_map")}, architecture)


def _text_model_name(name: str) -> str | None:
    """A wrapper's stored tensor name as the text model's, or None for the other parts' tensors."""
    for stored, text in TEXT_PREFIXES:
        if name.startswith(stored):
            return text + name[len(stored):]
    return None


def _phi3_as_mistral(config: dict[str, Any]) -> dict[str, Any]:
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
        settings["attention_factor"] = 1.0  # folded into the queries' rotated rows (_phi3_parts)
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


def _phi3_parts(config: dict[str, Any], stored: list[str]) -> dict[str, StoredTensor]:
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
    return _split(stored, fused)


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


def _glm_as_qwen2(config: dict[str, Any]) -> dict[str, Any]:
    """GLM-4's config (transformers' defaults for what it leaves out) as Qwen2's, or Llama's without q/k/v
    biases; a rotary embedding over part of each head as a whole-head LongRoPE one whose factors give the
    rotated pairs their frequencies and the others none, over the model's own context (factor 1, so no
    attention factor)."""
    completed = _with_defaults(config, "GlmForCausalLM")
    head_dim, _ = _partial_rotation(completed, "GlmForCausalLM")
    settings = _whole_head_rope(completed, "GlmForCausalLM")
    kept = {key: completed[key] for key in KEPT
            if key in completed and key not in ("rope_parameters", "rope_scaling", "sliding_window")}
    family = ("qwen2", "Qwen2ForCausalLM") if completed.get("attention_bias") else ("llama", "LlamaForCausalLM")
    return {**kept, "architectures": [family[1]], "model_type": family[0], "head_dim": head_dim,
            "rope_theta": settings["rope_theta"], "rope_parameters": settings}


def _whole_head_config(config: dict[str, Any], architecture: str) -> dict[str, Any]:
    """A GLM-4-0414, StableLM or GLM-4.5 config (transformers' defaults completed) with its partial rotary
    embedding over whole heads (_whole_head_rope): what transformers' own class runs alike, GLM-4-0414's
    pairs still adjacent ones (ModelConfig.rotary_interleaved), StableLM's and GLM-4.5's rows reordered
    (_rotated_first_parts). A config already so (an LCQ checkpoint's) is kept."""
    completed = _with_defaults(config, architecture)
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


def _rotated_first_parts(config: dict[str, Any], stored: list[str]) -> dict[str, StoredTensor]:
    """Every stored tensor under its own name, each query and key head's rows (weights and biases, and the
    per-head q/k norms' weights: GLM-4.5's) in _rotated_first's order for a partial rotary embedding over
    pairs (i, i + r/2) (StableLM's, GLM-4.5's; none for an LCQ checkpoint's whole-head one)."""
    architecture = WHOLE_HEAD[config["model_type"]]
    completed = _with_defaults(config, architecture)
    head_dim, rotary = _partial_rotation(completed, architecture)
    return _split(stored, _head_rows(completed, head_dim, _rotated_first(head_dim, rotary, interleaved=False)))


def _head_rows(completed: dict[str, Any], head_dim: int, within: list[int]) -> dict[str, tuple]:
    """_split's entries that read each query and key head's rows (weights and biases) in the order
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


def _glm_parts(config: dict[str, Any], stored: list[str]) -> dict[str, StoredTensor]:
    """Every stored tensor under its own name, gate/up as its parts' row ranges, and each query and key
    head's rows (weights and biases) in _rotated_first's order."""
    completed = _with_defaults(config, "GlmForCausalLM")
    head_dim, rotary = _partial_rotation(completed, "GlmForCausalLM")
    fused = _head_rows(completed, head_dim, _rotated_first(head_dim, rotary, interleaved=True))
    intermediate = completed["intermediate_size"]
    fused["mlp.gate_up_proj.weight"] = (("mlp.gate_proj.weight", 0, intermediate, 1.0, None),
                                        ("mlp.up_proj.weight", intermediate, 2 * intermediate, 1.0, None))
    return _split(stored, fused)


def _split(stored: list[str], fused: dict[str, tuple]) -> dict[str, StoredTensor]:
    """Every stored tensor under its own name, but each one whose name ends in a key of `fused` as its
    parts: (the part's name suffix, first row, row past the last, scale, row order) each."""
    view = {}
    for name in stored:
        suffix = next((s for s in fused if name.endswith("." + s)), None)
        if suffix is None:
            view[name] = StoredTensor(name)
            continue
        prefix = name[: -len(suffix)]
        view.update({prefix + part: StoredTensor(name, None if start is None else (start, stop), scale, order)
                     for part, start, stop, scale, order in fused[suffix]})
    return view


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


def _qwen3_next_parts(config: dict[str, Any], stored: list[str]) -> dict[str, StoredTensor]:
    """Qwen3-Next's tensors under their own names, its fused linear-attention projections as their parts."""
    c = _with_defaults(config, "Qwen3NextForCausalLM")
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


def _as_llama(config: dict[str, Any]) -> dict[str, Any]:
    """ERNIE 4.5's, Helium's and InternLM3's config (transformers' defaults for what it leaves out: theirs
    are not Llama's) as Llama's; ERNIE's use_bias is every linear layer's bias, InternLM3's qkv_bias and
    bias (which transformers requires equal) the attention's."""
    completed = _with_defaults(config, AS_LLAMA[config["model_type"]])
    kept = {key: completed[key] for key in KEPT if key in completed and key != "sliding_window"}
    biases = {"attention_bias": completed["use_bias"], "mlp_bias": completed["use_bias"]} \
        if "use_bias" in completed else {}
    return {**kept, **biases, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "head_dim": completed.get("head_dim") or completed["hidden_size"] // completed["num_attention_heads"]}


def _half_split_parts(config: dict[str, Any], stored: list[str]) -> dict[str, StoredTensor]:
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


def _granite_factors(config: dict[str, Any]) -> dict[str, float]:
    """Granite's four factors (transformers' defaults: 1)."""
    return {key: float(config.get(key, 1.0)) for key in
            ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")}


def _granite_as_llama(config: dict[str, Any]) -> dict[str, Any]:
    kept = {key: config[key] for key in KEPT if key in config and key != "sliding_window"}
    embedding = _granite_factors(config)["embedding_multiplier"]
    if embedding <= 0:
        raise ViewError(f"GraniteForCausalLM: embedding_multiplier must be positive (got {embedding})")
    return {**kept, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "head_dim": config["hidden_size"] // config["num_attention_heads"],
            "rms_norm_eps": config.get("rms_norm_eps", 1e-6) / embedding ** 2}


def _granite_scales(config: dict[str, Any], stored: list[str]) -> dict[str, StoredTensor]:
    """Every stored tensor under its own name (Granite 4.0's MLP under Llama's: _granite4_parts; Granite 4.0-H's
    parts: _granite4_hybrid_parts), the folded factors on q_proj, the output projections (attention's,
    Mamba-2's, every MLP's down_proj; weights and biases) and the final norm."""
    factors = _granite_factors(config)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    hybrid = config.get("model_type") in GRANITE_EXPERTS and not _granite4_is_dense(config)  # read as itself
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


def _nemotron_h(config: dict[str, Any]) -> dict[str, Any]:
    """Nemotron-H's config completed with transformers' defaults (its blocks' kinds from hybrid_override_pattern:
    layers_block_type), with their number (transformers derives num_hidden_layers from them, and writes none)."""
    width = config.get("intermediate_size")
    if isinstance(width, list):  # one per MLP block, where they differ (as vLLM reads it)
        if len(set(width)) > 1:
            raise ViewError(f"NemotronHForCausalLM: MLP widths that differ by block ({sorted(set(width))}) are not "
                            "supported")
        config = {**config, "intermediate_size": width[0]}
    completed = _with_defaults(config, "NemotronHForCausalLM")
    return {**completed, "num_hidden_layers": len(completed["layers_block_type"])}


def _nemotron_h_names(stored: list[str]) -> dict[str, StoredTensor]:
    """Nemotron-H's tensors under the CausalLM names of the others (transformers reads backbone. as model.), its
    embedding table as model.embed_tokens; its multi-token-prediction layers (mtp.*) are not read."""
    view = {}
    for name in stored:
        if name.startswith("mtp."):
            continue
        viewed = "model." + name.removeprefix("backbone.") if name.startswith("backbone.") else name
        view[viewed.replace("model.embeddings.", "model.embed_tokens.")] = StoredTensor(name)
    return view


# Falcon-H1's factors that are folded into weights (made neutral in its config), and their neutral values
FALCON_H1_FOLDED = {"key_multiplier": 1.0, "attention_in_multiplier": 1.0, "attention_out_multiplier": 1.0,
                    "ssm_in_multiplier": 1.0, "ssm_out_multiplier": 1.0, "mlp_multipliers": [1.0, 1.0],
                    "ssm_multipliers": [1.0] * 5}


def _falcon_h1(config: dict[str, Any]) -> dict[str, Any]:
    """Falcon-H1's config completed with transformers' defaults, the factors _falcon_h1_scales folds into weights
    made neutral; its embeddings' and logits' factors stay (ModelConfig.embed_scale, logit_scale)."""
    return {**_with_defaults(config, "FalconH1ForCausalLM"), **FALCON_H1_FOLDED}


def _falcon_h1_scales(config: dict[str, Any], stored: list[str]) -> dict[str, StoredTensor]:
    """Every stored tensor under its own name, Falcon-H1's factors folded in: the attention's input factor into
    q_proj, k_proj (with the keys' own factor) and v_proj, its output factor into o_proj; Mamba-2's input factor
    and each in_proj row's part factor (z, x, B, C, dt: ssm_multipliers) into in_proj, its output factor into
    out_proj; the MLP's gate and down factors into gate_proj and down_proj. A bias takes the factors applied
    after its matrix only (an input factor scales the input, before the bias is added)."""
    c = _with_defaults(config, "FalconH1ForCausalLM")
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


def _granite4_is_dense(config: dict[str, Any]) -> bool:
    """A Granite 4.0 model of attention layers alone (the Hub's name, and transformers 5's), without experts
    (granite-4.0-micro): Granite 3's layer."""
    if config.get("model_type") != "granitemoehybrid":
        return False
    kinds = set(config.get("layer_types") or config.get("layers_block_type") or ["mamba"])
    return kinds <= {"attention", "full_attention"} and not config.get("num_local_experts", 8)


def _granite_experts(config: dict[str, Any]) -> dict[str, Any]:
    """Granite 4.0-H's config, or that of Granite 3's mixtures (transformers' defaults completed), with the factors
    _granite_scales folds into weights made neutral: the residual one, the attention's (head_dim^-0.5, as without
    it) and the logits'. The embeddings keep theirs (ModelConfig.embed_scale), so that every norm keeps its
    epsilon."""
    completed = _with_defaults(config, GRANITE_EXPERTS[config["model_type"]])
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
    completed = _with_defaults(config, GRANITE_EXPERTS[config["model_type"]])
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


def _granite4_as_llama(config: dict[str, Any]) -> dict[str, Any]:
    """Granite 4.0's dense attention-only models (granite-4.0-micro: GraniteMoeHybridForCausalLM with no
    Mamba layers and no experts) as Granite 3, its MLP's width the shared MLP's."""
    if config.get("position_embedding_type") != "rope":
        raise ViewError("GraniteMoeHybridForCausalLM: position_embedding_type "
                        f"{config.get('position_embedding_type')!r} is not supported without Mamba layers (only rope)")
    return _granite_as_llama({**config, "intermediate_size": config.get("shared_intermediate_size", 1024)})


def _granite4_parts(config: dict[str, Any], stored: list[str]) -> dict[str, StoredTensor]:
    """Granite 4.0's shared MLP under Llama's names: its input_linear's rows the gate's then the up
    projection's, its output_linear the down projection."""
    width = config.get("shared_intermediate_size", 1024)
    return _split(stored, {"shared_mlp.input_linear.weight": (("mlp.gate_proj.weight", 0, width, 1.0, None),
                                                              ("mlp.up_proj.weight", width, 2 * width, 1.0, None)),
                           "shared_mlp.output_linear.weight": (("mlp.down_proj.weight", None, None, 1.0, None),)})
