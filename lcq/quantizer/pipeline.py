"""quantize_model: a Hugging Face folder in, an LCQ folder out, one decoder block at a time.

Peak memory is about one block plus the calibration activations: block tensors are read from the
source safetensors when the block's turn comes and freed after its packed shard is written (the
optional end-to-end stage then holds every block's indices and codebooks, finetune.py). The
output grows in OUT_DIR.partial (with a progress file) and is renamed when complete, so a
half-written folder never looks valid and --resume continues after the last finished block.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import inspect
import json
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from lcq.errors import UserError
from lcq.format import (EMBED, HEAD, CheckpointReader, PackedLinear, copy_model_assets, dequantize, linear_tensors,
                        quantization_config, write_index, write_json, write_shard)
from lcq.format.mtp import mtp_names
from lcq.format.views import FINAL_NORMS, LFM2

from .allocation import (UNITS, WEIGHING_WINDOWS, WIDEST, BlockGradient, Unit, check_target, choose_widths,
                         linear_shapes, unit_bytes, unit_of, weigh_blocks)
from .blockwise import LayerFit, block_call, optimize_block, run_block
from .finetune import StageScore, finetune, tune_head
from .fit import (Codebook, assign, dense_weight, grouped, grouped_importance, lcq_init, pack, rtn_codebook,
                  stored_codebook)
from .gptq import fit_codebooks_to_indices, gptq_indices
from .layer_bits import LayerWidths, block_linears
from .reference import as_stored, hf_config, model_as_stored, read_config

METHODS = ("lcq", "rtn", "gptq")
# How LCQ picks each weight's index: its nearest codebook entry; GPTQ's sweep over the codebooks;
# or that sweep, S and B refit to the chosen indices through the Hessian, and a second sweep.
ASSIGNMENTS = ("nearest", "gptq", "gptq-refit")
PROGRESS_FILE = "lcq-progress.json"
WIDTHS_FILE = "lcq-target-widths.json"  # --target-bits: the --layer-bits rules chosen, kept for --resume
HEAD_SHARD = "lm_head.safetensors"  # a packed head's own shard, written once the blocks are done
MTP_SHARD = "mtp.safetensors"  # the multi-token-prediction layer's, written once the blocks are done
# The block-wise stage's default Adam step per bit width, relative to each of S, V, B's mean
# magnitude. A step of that size moves codebook entries by a fixed share of the group's range, so it
# must shrink as the entries get closer: on SmolLM2-135M (blocks 0-2, held-out text) 1e-2 lowered the
# block error most at 2 bits but never lowered it at 4 bits, where 1e-3 cut it by 7-14%.
DEFAULT_LR = {2: 1e-2, 3: 3e-3, 4: 1e-3}
# The end-to-end stage's step (finetune.py), relative like the block-wise one; it refines codebooks
# the block-wise stage already fitted, so it is smaller.
DEFAULT_FINETUNE_LR = {2: 1e-3, 3: 3e-4, 4: 1e-4}
CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "ministral3": "Ministral3", "qwen2": "Qwen2", "qwen3": "Qwen3",
                "gemma2": "Gemma2", "gemma3_text": "Gemma3", "smollm3": "SmolLM3", "olmo2": "Olmo2",
                "exaone4": "Exaone4", "seed_oss": "SeedOss", "olmo3": "Olmo3", "hunyuan_v1_dense": "HunYuanDenseV1",
                "glm4": "Glm4", "qwen3_moe": "Qwen3Moe", "mixtral": "Mixtral", "olmoe": "Olmoe",
                "qwen2_moe": "Qwen2Moe", "cohere": "Cohere", "cohere2": "Cohere2", "stablelm": "StableLm",
                "gpt_oss": "GptOss", "llama4_text": "Llama4Text", "glm4_moe": "Glm4Moe", "ernie4_5_moe": "Ernie4_5_Moe",
                "hunyuan_v1_moe": "HunYuanMoEV1", "dots1": "Dots1", "deepseek_v2": "DeepseekV2",
                "deepseek_v3": "DeepseekV3", "glm4_moe_lite": "Glm4MoeLite", "qwen3_5_text": "Qwen3_5",
                "qwen3_5_moe_text": "Qwen3_5Moe", "qwen3_next": "Qwen3Next", "minimax_m2": "MiniMaxM2",
                "granitemoehybrid": "GraniteMoeHybrid", "granitemoe": "GraniteMoe", "granitemoeshared": "GraniteMoeShared",
                "lfm2": "Lfm2", "lfm2_moe": "Lfm2Moe", "bamba": "Bamba",
                "nemotron_h": "NemotronH", "falcon_h1": "FalconH1", "arcee": "Arcee", "apertus": "Apertus"}
LAYER_CLASS = {"nemotron_h": "NemotronHBlock"}  # transformers' decoder layer, where not the prefix's DecoderLayer
# transformers' module, where not the type's
MODELING_MODULE = {"gemma3_text": "gemma3", "llama4_text": "llama4", "qwen3_5_text": "qwen3_5",
                   "qwen3_5_moe_text": "qwen3_5_moe"}
ROTARY_CLASS = {"qwen3_5_text": "Qwen3_5TextRotaryEmbedding",  # the rotary embedding's class, where not the prefix's
                "qwen3_5_moe_text": "Qwen3_5MoeTextRotaryEmbedding"}
OFFSET_NORMS = ("gemma2", "gemma3_text", "qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")  # norms: (1 + w) x
CENTRED_NORMS = ("cohere", "cohere2", "stablelm")  # LayerNorms (StableLM's with biases), not RMSNorms
# Each block's norms that read the residual stream (Gemma's post-attention norm scales the attention's
# output before it is added, so it reads nothing of the stream).
RESIDUAL_READERS = {"gemma2": ("input_layernorm", "pre_feedforward_layernorm"),
                    "gemma3_text": ("input_layernorm", "pre_feedforward_layernorm"),
                    # OLMo 2's and EXAONE 4's projections read the stream itself: only the final norm weighs it
                    "olmo2": (), "olmo3": (), "exaone4": (),
                    "cohere": ("input_layernorm",), "cohere2": ("input_layernorm",),  # (one norm a layer)
                    **dict.fromkeys(LFM2, ("operator_norm", "ffn_norm")),
                    **dict.fromkeys(("bamba", "falcon_h1"), ("input_layernorm", "pre_ff_layernorm")),
                    "nemotron_h": ("norm",), "apertus": ("attention_layernorm", "feedforward_layernorm")}
DEFAULT_RESIDUAL_READERS = ("input_layernorm", "post_attention_layernorm")
BLOCK_ERRORS = ("relative", "norm-weighted")
SCALED_EMBEDDINGS = ("gemma2", "gemma3_text")  # token embeddings multiplied by sqrt(hidden_size) (Granite 4.0-H's
# by its embedding_multiplier)


@dataclass
class QuantizeOptions:
    bits: int = 2
    rank: int = 2
    group_size: int = 64
    method: str = "lcq"
    calib_text: str | None = None
    nsamples: int = 128
    seqlen: int = 512
    epochs: int = 10
    lr: float | None = None  # None: DEFAULT_LR for the bit width
    init: str = "kmeans"
    assign: str = "nearest"
    device: str = "cpu"
    act_order: bool = False
    seed: int = 0
    batch_size: int = 4
    finetune_epochs: int = 0
    finetune_lr: float | None = None  # None: DEFAULT_FINETUNE_LR for the bit width
    finetune_samples: int | None = None  # the end-to-end stage's training windows; None: nsamples
    finetune_index_updates: float = 0.0  # fraction of each layer's weights moved between end-to-end epochs
    head_bits: int = 0  # lm_head and the embedding table (tied or not) packed at this width; 0: kept fp16
    layer_bits: list[str] = field(default_factory=list)  # rules for layers at another width (layer_bits.py)
    target_bits: float | None = None  # stored bits per weight to spend, each layer's width chosen (allocation.py)
    val_samples: int | None = None  # held-out windows of the tuning stages; None: a quarter of nsamples
    block_error: str = "norm-weighted"  # that stage's error: with the readers' unit weights, or per token relative

    def validate(self) -> None:
        """Every setting, and calibration text present when the method needs data."""
        self.validate_settings()
        if self.needs_data and not (self.calib_text and self.calib_text.strip()):
            raise UserError(f"--method {self.method} needs calibration text (--calib FILE), and it is empty")

    def validate_settings(self) -> None:
        """Every setting but the calibration text (checked before any default text is fetched)."""
        checks = [
            (self.bits in (2, 3, 4), f"--bits must be 2, 3 or 4 (got {self.bits})"),
            (self.head_bits in (0, 2, 3, 4), f"--head-bits must be 0 (fp16), 2, 3 or 4 (got {self.head_bits})"),
            (1 <= self.rank <= 4, f"--rank must be 1 to 4 (got {self.rank})"),
            (self.group_size in (32, 64, 128), f"--group-size must be 32, 64 or 128 (got {self.group_size})"),
            (self.method in METHODS, f"--method must be one of {', '.join(METHODS)} (got {self.method})"),
            # RTN at rank > 1 is the same grid with unused extra ranks (a cheap way to make rank-r files).
            (self.method != "gptq" or self.rank == 1, "--method gptq uses the uniform grid: --rank must be 1"),
            (self.init in ("kmeans", "rtn"), f"--init must be kmeans or rtn (got {self.init})"),
            (self.assign in ASSIGNMENTS, f"--assign must be one of {', '.join(ASSIGNMENTS)} (got {self.assign})"),
            (self.method == "lcq" or self.assign == "nearest", "--assign applies to --method lcq only"),
            (self.nsamples >= 1 and self.seqlen >= 8, "--nsamples must be >= 1 and --seqlen >= 8"),
            (self.epochs >= 0, "--epochs must be >= 0"),
            (self.val_samples is None or self.val_samples >= 0, f"--val-samples must be >= 0 (got {self.val_samples})"),
            (self.block_error in BLOCK_ERRORS,
             f"--block-error must be one of {', '.join(BLOCK_ERRORS)} (got {self.block_error})"),
            (self.finetune_epochs >= 0, "--finetune-epochs must be >= 0"),
            (self.method == "lcq" or self.finetune_epochs == 0, "--finetune-epochs applies to --method lcq only"),
            (self.finetune_lr is None or self.finetune_lr > 0,
             f"--finetune-lr must be positive (got {self.finetune_lr})"),
            (self.finetune_samples is None or self.finetune_samples >= 1,
             f"--finetune-samples must be >= 1 (got {self.finetune_samples})"),
            (self.finetune_samples is None or self.finetune_epochs > 0, "--finetune-samples needs --finetune-epochs"),
            (0 <= self.finetune_index_updates < 1,
             f"--finetune-index-updates must be a fraction in [0, 1) (got {self.finetune_index_updates})"),
            (self.finetune_index_updates == 0 or self.finetune_epochs >= 2,
             "--finetune-index-updates moves indices between end-to-end epochs: it needs --finetune-epochs 2 or more"),
            (self.lr is None or self.lr > 0, f"--lr must be positive (got {self.lr})"),
            (self.batch_size >= 1, f"--batch-size must be >= 1 (got {self.batch_size})"),
            (self.device == "cpu" or self.device.startswith("cuda"), "--device must be cpu or cuda"),
            (self.target_bits is None or not self.layer_bits,
             "--target-bits chooses every layer's width itself: drop --layer-bits, or the target"),
            (self.target_bits is None or self.needs_data,
             "--target-bits weighs layers on calibration text: --method lcq or gptq, not rtn"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        LayerWidths(self.bits, self.layer_bits)  # parses the --layer-bits rules: a bad one raises
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("--device cuda asked for, but no CUDA device is available")

    @property
    def widths(self) -> LayerWidths:
        """Each decoder linear layer's width: --bits, or what a --layer-bits rule gives it."""
        return LayerWidths(self.bits, self.layer_bits)

    @property
    def block_lr(self) -> float:
        """The block-wise stage's Adam step: --lr, or the default for the bit width."""
        return self.block_lr_of(self.bits)

    def block_lr_of(self, bits: int) -> float:
        """The block-wise stage's step for a layer of width `bits`: --lr, or that width's default, since a
        step that moves 2-bit codebooks well overshoots 3- and 4-bit ones (DEFAULT_LR)."""
        return DEFAULT_LR[bits] if self.lr is None else self.lr

    @property
    def end_to_end_lr(self) -> float:
        """The end-to-end stage's Adam step: --finetune-lr, or the default for the bit width."""
        return self.end_to_end_lr_of(self.bits)

    def end_to_end_lr_of(self, bits: int) -> float:
        """The end-to-end stage's step for a layer of width `bits`: --finetune-lr, or that width's default."""
        return DEFAULT_FINETUNE_LR[bits] if self.finetune_lr is None else self.finetune_lr

    @property
    def end_to_end_windows(self) -> int:
        """The end-to-end stage's training windows: --finetune-samples, by default --nsamples. The first
        of them are the block-wise stage's; more are drawn after the held-out ones (calibration_batch)."""
        return self.nsamples if self.finetune_samples is None else self.finetune_samples

    @property
    def held_out_windows(self) -> int:
        """Calibration windows the block-wise, head and end-to-end stages score their epochs on and never
        train on (optimize_block, finetune._tune): --val-samples, by default a quarter of --nsamples (at
        least 1); none where no stage trains."""
        if self.method != "lcq" or self.epochs == self.finetune_epochs == 0:
            return 0
        return max(1, self.nsamples // 4) if self.val_samples is None else self.val_samples

    @property
    def extra_windows(self) -> int:
        """Windows the end-to-end stage trains on beyond the block-wise stage's."""
        return max(0, self.end_to_end_windows - self.nsamples)

    def window_rows(self) -> tuple[slice, slice, torch.Tensor]:
        """Which of calibration_batch's rows each stage uses: the block-wise and head stages' training
        windows, the held-out ones, and the end-to-end stage's training windows (the first of the
        block-wise ones, then the extra ones drawn after the held-out)."""
        n, held = self.nsamples, self.held_out_windows
        extra = torch.arange(n + held, n + held + self.extra_windows)
        return slice(0, n), slice(n, n + held), torch.cat([torch.arange(min(n, self.end_to_end_windows)), extra])

    @property
    def needs_data(self) -> bool:
        return self.method != "rtn"

    @property
    def gptq_indices(self) -> bool:
        """Whether the final indices come from GPTQ's error-compensating sweep (needs full X^T X)."""
        return self.method == "gptq" or self.assign != "nearest"

    def recorded(self) -> dict:
        """The options as stored with the output (calibration text by size, not content)."""
        d = asdict(self)
        text = d.pop("calib_text")
        d["calib_chars"] = len(text) if text else 0
        d["lr"] = self.block_lr
        d["val_samples"] = self.held_out_windows
        d["finetune_lr"] = self.end_to_end_lr if self.finetune_epochs else None
        d["finetune_samples"] = self.end_to_end_windows if self.finetune_epochs else None
        return d


@dataclass
class QuantizeSummary:
    seconds: float
    bits_per_weight: float  # of the decoder's packed layers (a packed head shows in size_bytes)
    size_bytes: int
    peak_memory_bytes: int
    block_losses: list[tuple[float, float]] = field(default_factory=list)
    head_kl: StageScore | None = None  # the head stage's (a packed head only)
    finetune_kl: StageScore | None = None  # the end-to-end stage's
    finetune_peak_memory_bytes: int | None = None  # that stage's own peak (it holds the whole model)
    layer_bits: list[str] = field(default_factory=list)  # the --layer-bits rules used (--target-bits: chosen)


def calibration_batch(tokenizer, text: str, nsamples: int, seqlen: int, seed: int, held_out: int = 0,
                      extra: int = 0) -> torch.Tensor:
    """nsamples windows of seqlen tokens at random offsets of the tokenized text (seeded), then `held_out`
    more drawn with the next seed, then `extra` more (the end-to-end stage's beyond nsamples) with the
    one after: no count changes the windows drawn before it."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() < 2:
        raise UserError("calibration text is empty after tokenization")
    seqlen = min(seqlen, ids.numel())
    starts = [torch.randint(0, ids.numel() - seqlen + 1, (count,), generator=torch.Generator().manual_seed(seed + i))
              for i, count in enumerate((nsamples, held_out, extra))]
    return torch.stack([ids[s:s + seqlen] for s in torch.cat(starts).tolist()])


class _Source:
    """The source model read block by block."""

    def __init__(self, model_dir: Path, device: torch.device):
        import importlib

        self.config = hf_config(model_dir)
        self.reader = CheckpointReader(model_dir)
        self.final_norm_name = FINAL_NORMS.get(self.config.model_type, "model.norm")  # (LFM2's embedding_norm)
        if self.reader.quant is not None:
            raise UserError(f"{model_dir} is already quantized; quantize a full-precision folder")
        module = MODELING_MODULE.get(self.config.model_type, self.config.model_type)
        modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        prefix = CLASS_PREFIX[self.config.model_type]
        self.layer_class = getattr(modeling, LAYER_CLASS.get(self.config.model_type, f"{prefix}DecoderLayer"))
        rotary = getattr(modeling, ROTARY_CLASS.get(self.config.model_type, f"{prefix}RotaryEmbedding"), None)
        # (none: Granite 4.0-H's NoPE attention, Nemotron-H's)
        nope = getattr(self.config, "position_embedding_type", "rope") == "nope" or rotary is None
        self.rotary_module = None if nope else rotary(config=self.config).to(device)
        self.device = device
        self.mtp = mtp_names(self.config.to_dict(), self.reader.names())  # its multi-token-prediction layer

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def block(self, index: int) -> torch.nn.Module:
        return self._layer(self.config, index, f"model.layers.{index}.")

    def mtp_block(self) -> torch.nn.Module:
        """The multi-token-prediction layer's decoder layer: one more layer of the model's kind, of full attention."""
        config = copy.deepcopy(self.config)
        config.num_hidden_layers += 1
        if getattr(config, "layer_types", None):
            config.layer_types = [*config.layer_types, "full_attention"]
        return self._layer(config, self.num_layers, f"{self.mtp.layer}.", self.mtp.own_modules)

    def _layer(self, config, index: int, prefix: str, others: tuple[str, ...] = ()) -> torch.nn.Module:
        """transformers' decoder layer `index` of `config` holding the tensors under `prefix` (but the modules
        `others` beside it)."""
        # (Bamba's layers are told their kind, as its model builds them)
        kind = {"layer_type": config.layers_block_type[index]} \
            if "layer_type" in inspect.signature(self.layer_class.__init__).parameters else {}
        with torch.device("meta"):  # no random init of weights that are overwritten right away
            layer = as_stored(self.layer_class(config, index, **kind))
        state = {name[len(prefix):]: self.reader.tensor(name).float() for name in self.reader.names()
                 if name.startswith(prefix) and not name[len(prefix):].startswith(tuple(f"{o}." for o in others))}
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.to(self.device).eval()

    def mtp_inputs(self, stream: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The multi-token-prediction layer's decoder-layer inputs (S, T - 1, H) over windows whose last block's
        outputs are `stream`: at each position the normed embedding of the next token beside the normed final
        hidden state there, through the layer's projection (DeepSeek's first embedding zeroed)."""
        names = self.mtp
        embeddings = self.embed(tokens[:, 1:])
        if names.zero_first_embedding:
            embeddings[:, 0] = 0.0
        hidden = self.norm(stream[:, :-1], self.final_norm_name)
        joined = torch.cat([self.norm(embeddings, f"{names.prefix}.{names.embed_norm}"),
                            self.norm(hidden, f"{names.prefix}.{names.hidden_norm}")], dim=-1)
        return joined @ self.reader.tensor(f"{names.prefix}.{names.projection}.weight").float().to(joined.device).T

    def block_inputs(self, index: int) -> Callable[[torch.Tensor], dict]:
        """inputs(hidden) of block_call for block `index`: the positions (Ministral 3 scales its queries by
        them), its rotary cos and sin (Gemma's sliding-window layers have their own), and for a
        sliding-window (or chunked: Llama 4) layer whose windows (chunks) are shorter than the calibration
        text, its mask (transformers' blocks read none: SDPA's full causal attention otherwise). Eager
        attention (hf_config) infers nothing, so there every block gets its mask, added to the scores (0
        or -inf)."""
        kinds = getattr(self.config, "layer_types", None) or []
        kind = kinds[index] if index < len(kinds) else None  # (the multi-token-prediction layer: full attention)
        per_kind = self.rotary_module is not None and \
            "layer_type" in inspect.signature(self.rotary_module.forward).parameters
        window = self.config.sliding_window if kind == "sliding_attention" else None
        chunk = self.config.attention_chunk_size if kind == "chunked_attention" else None  # Llama 4's
        eager = self.config._attn_implementation == "eager"

        def inputs(hidden: torch.Tensor) -> dict:
            length = hidden.shape[1]
            positions = torch.arange(length, device=hidden.device).unsqueeze(0)
            rope = None if self.rotary_module is None else self.rotary_module(hidden, positions, kind) if per_kind \
                else self.rotary_module(hidden, positions)
            if not eager and (not window or length <= window) and (not chunk or length <= chunk):
                return {"position_embeddings": rope, "position_ids": positions}
            offsets = positions[0].unsqueeze(1) - positions[0].unsqueeze(0)  # query position - key position
            seen = (offsets >= 0) & (offsets < (window or length))
            if chunk:
                seen &= (positions[0] // chunk).unsqueeze(1) == (positions[0] // chunk).unsqueeze(0)
            seen = seen[None, None]
            mask = seen if not eager else torch.zeros(seen.shape, device=hidden.device).masked_fill(~seen, -torch.inf)
            return {"position_embeddings": rope, "position_ids": positions, "attention_mask": mask}

        return inputs

    def residual_units(self, index: int) -> torch.Tensor:
        """How much each hidden unit of block `index`'s output weighs downstream (H,): over every norm
        that reads the residual stream after it (the later blocks' and the final one), the mean of its
        squared weights, each norm's normalized to mean 1 so that every reader counts alike."""
        readers = RESIDUAL_READERS.get(self.config.model_type, DEFAULT_RESIDUAL_READERS)
        if getattr(self.config, "use_parallel_residual", False):  # StableLM's parallel blocks: one norm a layer
            readers = ("input_layernorm",)
        names = [f"model.layers.{later}.{norm}.weight" for later in range(index + 1, self.num_layers)
                 for norm in readers] + [f"{self.final_norm_name}.weight"]
        offset = 1.0 if self.config.model_type in OFFSET_NORMS else 0.0
        squares = torch.stack([(self.reader.tensor(name).float() + offset).pow(2) for name in names])
        return (squares / squares.mean(-1, keepdim=True).clamp_min(1e-12)).mean(0).to(self.device)

    def non_block_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors outside the decoder layers and the multi-token-prediction layer."""
        outside = ("model.layers.",) if self.mtp is None else ("model.layers.", f"{self.mtp.prefix}.")
        return {name: self.reader.tensor(name) for name in self.reader.names() if not name.startswith(outside)}

    def mtp_tensors(self) -> dict[str, torch.Tensor]:
        """The multi-token-prediction layer's own tensors, kept as they are: its norms and projection."""
        names = self.mtp
        own = [f"{names.prefix}.{module}." for module in (names.embed_norm, names.hidden_norm, names.projection,
                                                          names.final_norm)]
        return {name: self.reader.tensor(name) for name in self.reader.names() if name.startswith(tuple(own))}

    def causal_lm(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The transformers CausalLM holding `state` (fp32) and our rotary tables; tensors not in it stay
        on the meta device (the packed layers' weights: finetune.py puts its own layers there)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = model_as_stored(AutoModelForCausalLM.from_config(self.config))
        model.load_state_dict({k: v.float().to(self.device) for k, v in state.items()}, strict=False, assign=True)
        rotary = next((name for name, child in model.model.named_children()  # rotary_emb (LFM2-MoE's: pos_emb)
                       if type(child).__name__.endswith("RotaryEmbedding")), None)
        if rotary is not None:  # (none without a rotary embedding: Granite 4.0-H's)
            setattr(model.model, rotary, self.rotary_module)
        embed = model.model.embed_tokens
        if hasattr(embed, "scalar_embed_scale"):  # Gemma's scale, a buffer left on the meta device
            embed.embed_scale = torch.tensor(embed.scalar_embed_scale, device=self.device)
        if self.config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()

    def embed(self, tokens: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """The first block's input (S, T, H), fp32: the tokens' embeddings (from `table`, else the
        model's), with Gemma's (or Granite 4.0-H's) scale."""
        table = self.reader.tensor(f"{EMBED}.weight").float().to(self.device) if table is None else table
        scale = self.config.hidden_size ** 0.5 if self.config.model_type in SCALED_EMBEDDINGS else \
            getattr(self.config, "embedding_multiplier", 1.0)
        return torch.nn.functional.embedding(tokens.to(self.device), table) * scale

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's last norm applied to hidden states (S, T, H), fp32."""
        return self.norm(hidden, self.final_norm_name)

    def norm(self, hidden: torch.Tensor, name: str) -> torch.Tensor:
        """The model's norm `name` (an RMSNorm, or Cohere's and StableLM's LayerNorm) applied to hidden states
        (S, T, H), fp32."""
        weight = self.reader.tensor(f"{name}.weight").float().to(hidden.device)
        weight = weight + 1 if self.config.model_type in OFFSET_NORMS else weight
        x = hidden.float()
        if self.config.model_type in CENTRED_NORMS:
            bias = self.reader.tensor(f"{name}.bias").float().to(x.device) if self.reader.has(f"{name}.bias") \
                else None  # (StableLM's)
            return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps=self.config.layer_norm_eps)
        eps = getattr(self.config, "rms_norm_eps", None) or getattr(self.config, "norm_eps", None) or \
            self.config.layer_norm_epsilon  # (LFM2's name, Nemotron-H's)
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _input_stats(call, block: torch.nn.Module, inputs: torch.Tensor, batch: int, full: bool) -> dict[str, torch.Tensor]:
    """Per linear layer: mean x x^T (full) or mean x_k^2 (diagonal) of its inputs over all tokens."""
    stats: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name in block_linears(block):
        def hook(module, args, output, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            moment = x.t() @ x if full else (x * x).sum(0)
            stats[name] = stats.get(name, 0) + moment
            counts[name] = counts.get(name, 0) + x.shape[0]
        hooks.append(block.get_submodule(name).register_forward_hook(hook))
    try:
        run_block(call, {}, inputs, batch)
    finally:
        for h in hooks:
            h.remove()
    return {name: stats[name] / counts[name] for name in stats}  # (an expert no token chose has none)


def _quantize_block(source: _Source, index: int, block: torch.nn.Module, options: QuantizeOptions, q_inputs,
                    targets, progress_bar) -> tuple[dict[str, PackedLinear], tuple[float, float]]:
    """Quantize the linear layers of decoder block `index` (block_linears) with the chosen method; q_inputs
    and targets hold the training windows, then the held-out ones."""
    call = block_call(block, source.block_inputs(index))
    weights = {name: block.get_submodule(name).weight.detach().float() for name in block_linears(block)}
    biases = {name: block.get_submodule(name).bias for name in weights}
    n = options.nsamples
    stats = _input_stats(call, block, q_inputs[:n], options.batch_size, full=options.gptq_indices) \
        if options.needs_data else {}
    widths = options.widths
    fits = [_initial_fit(name, w, _importance(stats.get(name), options), options, widths.of(index, name))
            for name, w in weights.items()]
    losses = (0.0, 0.0)
    if options.method == "lcq":
        def on_step(loss: float) -> None:
            progress_bar.set_postfix(loss=f"{loss:.3g}")
        held_out = (q_inputs[n:], targets[n:]) if options.held_out_windows else None
        units = source.residual_units(index) if options.block_error == "norm-weighted" else None
        steps = [options.block_lr_of(widths.of(index, f.name)) for f in fits]
        losses = optimize_block(call, fits, q_inputs[:n], targets[:n], options.epochs, steps,
                                options.batch_size, options.seed, on_step, held_out, units)
    packed = {}
    for f in fits:
        bias = None if biases[f.name] is None else biases[f.name].detach()
        packed[f.name] = _packed_fit(f, weights[f.name], stats.get(f.name), bias, options, widths.of(index, f.name))
    return packed, losses


def _importance(stat: torch.Tensor | None, options: QuantizeOptions) -> torch.Tensor | None:
    """Each input's mean x_k^2 from a layer's input statistic: mean x x^T (GPTQ sweeps) or that already."""
    return None if stat is None else stat.diagonal() if options.gptq_indices else stat


def _initial_fit(name: str, w: torch.Tensor, importance: torch.Tensor | None, options: QuantizeOptions,
                 bits: int) -> LayerFit:
    """A layer's starting codebooks: LCQ's weighted k-means (or RTN grid) fit, else the RTN grid;
    `importance`: its inputs' mean x_k^2, or None (RTN: every input alike)."""
    wg = grouped(w, options.group_size)
    h = grouped_importance(importance, w.shape[1], options.group_size, w.device)
    book = lcq_init(wg, h, bits, options.rank, options.init) if options.method == "lcq" else \
        rtn_codebook(wg, h > 0, bits, options.rank)
    return LayerFit(name=name, wg=wg, in_features=w.shape[1], book=book)


def _packed_fit(f: LayerFit, weight: torch.Tensor, stat: torch.Tensor | None, bias: torch.Tensor | None,
                options: QuantizeOptions, bits: int) -> PackedLinear:
    """The fitted layer packed: each weight's nearest entry, or GPTQ's sweep over the codebooks (with
    gptq-refit, S and B refit to the sweep's indices, then swept again); nearest entries for an expert
    that no calibration token chose (no input statistic to sweep with)."""
    indices = None
    if options.gptq_indices and stat is not None:
        hessian = 2 * stat

        def sweep() -> torch.Tensor:
            return gptq_indices(weight, hessian, stored_codebook(f.book).values(), options.group_size,
                                options.act_order)
        indices = sweep()
        if options.assign == "gptq-refit":
            s, b = fit_codebooks_to_indices(weight, hessian, indices, f.book.s, f.book.v, f.book.b,
                                            options.group_size)
            f.book = Codebook(s, f.book.v, b)
            indices = sweep()  # the refit codebook, dual-quantized, is what the indices must serve
    return pack(f.book, f.wg, f.in_features, bits, options.group_size, bias, indices)


def _head_stat(source: _Source, hidden: torch.Tensor, options: QuantizeOptions, batch: int) -> torch.Tensor:
    """The head's input statistic (_initial_fit) over the quantized model's last hidden states."""
    total, count = 0, 0
    for start in range(0, hidden.shape[0], batch):
        x = source.final_norm(hidden[start:start + batch]).reshape(-1, hidden.shape[-1])
        total = total + (x.t() @ x if options.gptq_indices else (x * x).sum(0))
        count += x.shape[0]
    return total / count


def _packed_head(source: _Source, stat: torch.Tensor | None, options: QuantizeOptions,
                 device: torch.device) -> PackedLinear:
    """lm_head (or the embedding table it is tied to) packed at head_bits, from the RTN or weighted
    k-means fit (no block-wise stage: the head's output is the logits)."""
    weight = _head_weight(source, device)
    fit = _initial_fit(HEAD, weight, _importance(stat, options), options, options.head_bits)
    return _packed_fit(fit, weight, stat, None, options, options.head_bits)


def _head_weight(source: _Source, device: torch.device) -> torch.Tensor:
    """The full-precision head (fp32): lm_head, or the embedding table it is tied to."""
    name = f"{EMBED}.weight" if source.config.tie_word_embeddings else f"{HEAD}.weight"
    return source.reader.tensor(name).float().to(device)


def _packed_embedding(source: _Source, options: QuantizeOptions, device: torch.device) -> PackedLinear:
    """An untied embedding table packed at the head's width: the weighted k-means or RTN fit with every
    hidden unit alike (a table has no input statistic). Lookups cost no product, so this saves memory
    only, but an fp16 table is a quarter of Llama-3-8B's bytes at W2."""
    weight = source.reader.tensor(f"{EMBED}.weight").float().to(device)
    fit = _initial_fit(EMBED, weight, None, options, options.head_bits)
    return pack(fit.book, fit.wg, fit.in_features, options.head_bits, options.group_size)


def _head_stage(source: _Source, head: PackedLinear, train: tuple[torch.Tensor, torch.Tensor],
                held_out: tuple[torch.Tensor, torch.Tensor], options: QuantizeOptions, progress: bool,
                ) -> tuple[PackedLinear, StageScore]:
    """The packed head tuned on the logits' KL (finetune.tune_head) for the block-wise stage's epochs and
    step at the head's width; train and held_out: the last hidden states of the quantized and
    full-precision models over those windows (no held-out windows: empty)."""
    from tqdm import tqdm

    weight = _head_weight(source, head.qweight.device)
    bar = tqdm(total=options.epochs * -(-len(train[0]) // options.batch_size), desc="head", disable=not progress,
               unit="step")

    def on_step(loss: float) -> None:
        bar.update()
        bar.set_postfix(kl=f"{loss:.3g}")
    lr = options.block_lr_of(options.head_bits)
    train, held_out = ((source.final_norm(quantized), source.final_norm(full)) for quantized, full in (train, held_out))
    tuned = tune_head(head, *train, weight, options.epochs, lr, options.batch_size, options.seed, on_step,
                      held_out if len(held_out[0]) else None)
    bar.close()
    return tuned


def _dense_weights(packed: dict[str, PackedLinear], device: torch.device) -> dict[str, torch.Tensor]:
    weights = {}
    for name, layer in packed.items():
        weights[f"{name}.weight"] = dequantize(layer.to(device))
    return weights


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: torch's counter on CUDA; on Linux the process's peak RSS (clear_refs 5), after
    glibc hands its freed heap back so that the new peak starts from what is live; elsewhere nothing,
    so the peak read later also covers what came before."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")


def check_model(model_dir: Path, config: dict, options: QuantizeOptions) -> None:
    """The settings that depend on the model: the layers --layer-bits names exist, --target-bits is in reach."""
    options.widths.check_layers(config["num_hidden_layers"])
    if options.target_bits is not None:
        shapes = linear_shapes(CheckpointReader(model_dir), config["num_hidden_layers"])
        check_target(shapes, options.target_bits, options.bits, options.rank, options.group_size)


def check_paths(model_dir: Path, out_dir: Path) -> dict:
    """The source's config (a supported architecture), and an output folder that does not exist yet."""
    config = read_config(model_dir)
    if out_dir.exists():
        raise UserError(f"{out_dir} already exists; choose a new output folder")
    return config


def quantize_model(model_dir: str | Path, out_dir: str | Path, options: QuantizeOptions, resume: bool = False,
                   progress: bool = True) -> QuantizeSummary:
    """Quantize every decoder block's linear layers of a Llama-family folder into an LCQ folder."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    started = time.time()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    options.validate()
    config_dict = check_paths(model_dir, out_dir)
    check_model(model_dir, config_dict, options)
    source_config = json.loads((model_dir / "config.json").read_text())  # read as another architecture: kept
    partial = out_dir.with_name(out_dir.name + ".partial")
    recorded = options.recorded()
    done = _prepare_partial(partial, recorded, resume)
    device = torch.device(options.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    source = _Source(model_dir, device)
    torch.manual_seed(options.seed)
    # With a packed head, an untied table is packed too; the quantized stream starts from its lookups.
    embedding = _packed_embedding(source, options, device) \
        if options.head_bits and not source.config.tie_word_embeddings else None

    fp_stream = q_stream = None
    train, held, end_to_end = options.window_rows()
    # The quantized stream carries the block-wise stage's windows (training, then held-out); the
    # full-precision one the end-to-end stage's extra windows after them too, for their teacher.
    quantized_rows = slice(0, held.stop)
    if options.needs_data:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        tokens = calibration_batch(tokenizer, options.calib_text, options.nsamples, options.seqlen, options.seed,
                                   options.held_out_windows, options.extra_windows)
        fp_stream = source.embed(tokens)
        q_stream = fp_stream[quantized_rows].clone() if embedding is None else \
            source.embed(tokens[quantized_rows], dequantize(embedding))
        if options.target_bits is not None:
            options = replace(options, layer_bits=_target_widths(source, tokens[train], options, partial, progress))

    losses: list[tuple[float, float]] = []
    bar = tqdm(range(source.num_layers), desc="quantizing blocks", disable=not progress, unit="block")
    for index in bar:
        block = source.block(index)
        shard = _block_shard(partial, index)
        targets = None
        if options.needs_data:
            call = block_call(block, source.block_inputs(index))
            targets = run_block(call, {}, fp_stream, options.batch_size)
        if index < done:
            packed = _read_block(shard, index, options)
            block_losses = (float("nan"), float("nan"))
        else:
            packed, block_losses = _quantize_block(source, index, block, options, q_stream,
                                                   None if targets is None else targets[quantized_rows], bar)
            tensors = {}
            for name, layer in packed.items():
                tensors.update(linear_tensors(f"model.layers.{index}.{name}", layer))
            for name, tensor in block.state_dict().items():
                if not any(name.startswith(linear + ".") for linear in packed):
                    tensors[f"model.layers.{index}.{name}"] = tensor.to(torch.float16)
            write_shard(shard, tensors)
            write_json(partial / PROGRESS_FILE, {"options": recorded, "done": index + 1})
        losses.append(block_losses)
        if options.needs_data:
            bar.set_postfix(loss=f"{block_losses[1]:.3g}")
            q_stream = run_block(block_call(block, source.block_inputs(index)), _dense_weights(packed, device),
                                 q_stream, options.batch_size)
            fp_stream = targets
        del block

    if source.mtp is not None and not json.loads((partial / PROGRESS_FILE).read_text()).get("mtp"):
        _mtp_stage(source, partial, options, (fp_stream, q_stream, tokens) if options.needs_data else None, bar)
    head_kl = None
    if options.head_bits and not json.loads((partial / PROGRESS_FILE).read_text()).get("head"):
        head_stat = _head_stat(source, q_stream[train], options, options.batch_size) if options.needs_data else None
        head = _packed_head(source, head_stat, options, device)
        if options.needs_data and options.epochs:
            head, head_kl = _head_stage(source, head, (q_stream[train], fp_stream[train]),
                                        (q_stream[held], fp_stream[held]), options, progress)
        write_shard(partial / HEAD_SHARD, linear_tensors(HEAD, head.to("cpu")))
        _mark_done(partial, "head")
        del head
    finetune_kl = finetune_peak = None
    peak = _peak_memory(device)
    if options.finetune_epochs:
        teacher = source.final_norm(fp_stream)
        fp_stream = q_stream = targets = None  # the block pass's activations, on the device, not needed now
        _reset_peak_memory(device)
        tokens = tokens.to(device)
        finetune_kl = _finetune_stage(source, partial, (tokens[end_to_end], teacher[end_to_end]),
                                      (tokens[held], teacher[held]), embedding, options, progress)
        finetune_peak = _peak_memory(device)
    extra = {name: t.to(torch.float16) if t.is_floating_point() else t for name, t in source.non_block_tensors().items()}
    kept = [EMBED, source.final_norm_name, HEAD]
    if options.head_bits:  # a tied table is not stored: the packed head serves its lookups
        del extra[f"{EMBED}.weight"]
        extra.pop(f"{HEAD}.weight", None)
        kept = [source.final_norm_name]
        if embedding is not None:
            extra.update(linear_tensors(EMBED, embedding.to("cpu")))
    write_shard(partial / "model-extra.safetensors", extra)
    layer_bits = options.widths.overrides(source.num_layers, lambda index: _packed_names(partial, index))
    config_dict["quantization_config"] = quantization_config(
        options.bits, options.rank, options.group_size, options.method, modules_not_quantized=kept,
        **{k: recorded[k] for k in ("nsamples", "seqlen", "epochs", "lr", "init", "assign", "act_order", "calib_chars",
                                   "finetune_epochs", "finetune_lr", "finetune_samples", "finetune_index_updates",
                                   "head_bits", "val_samples", "block_error")},
        **({"embed_bits": options.head_bits} if embedding is not None else {}),
        **({"layer_bits": layer_bits} if layer_bits else {}),
        **({"layer_lr": {str(b): options.block_lr_of(b) for b in sorted(set(layer_bits.values()))}}
           if layer_bits and options.method == "lcq" and options.epochs else {}),
        **({"layer_finetune_lr": {str(b): options.end_to_end_lr_of(b) for b in sorted(set(layer_bits.values()))}}
           if layer_bits and options.finetune_epochs else {}),
        **({"target_bits": options.target_bits} if options.target_bits is not None else {}),
        **({"source_config": source_config} if source_config != config_dict else {}))
    config_dict["torch_dtype"] = config_dict["dtype"] = "float16"  # its full-precision tensors (both names' readers)
    write_json(partial / "config.json", config_dict)
    copy_model_assets(model_dir, partial)
    write_index(partial)
    (partial / PROGRESS_FILE).unlink()
    (partial / WIDTHS_FILE).unlink(missing_ok=True)
    partial.rename(out_dir)

    reader = CheckpointReader(out_dir)
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    return QuantizeSummary(seconds=time.time() - started, bits_per_weight=reader.decoder_bits_per_weight(),
                           size_bytes=size, peak_memory_bytes=max(peak, _peak_memory(device)), block_losses=losses,
                           head_kl=head_kl, finetune_kl=finetune_kl, finetune_peak_memory_bytes=finetune_peak,
                           layer_bits=options.layer_bits)


def _mtp_stage(source: _Source, partial: Path, options: QuantizeOptions,
               streams: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, progress_bar) -> None:
    """Pack the multi-token-prediction layer's decoder layer as one more block: its inputs over the calibration
    windows made from the last block's outputs and the next tokens (mtp_inputs), the full-precision model's
    for its targets and the quantized model's for its own. Its projection and norms stay in full precision."""
    index, block = source.num_layers, source.mtp_block()
    q_inputs = targets = None
    if streams is not None:
        fp_stream, q_stream, tokens = streams
        rows = q_stream.shape[0]
        q_inputs = source.mtp_inputs(q_stream, tokens[:rows])
        targets = run_block(block_call(block, source.block_inputs(index)), {}, source.mtp_inputs(fp_stream[:rows],
                            tokens[:rows]), options.batch_size)
    packed, _ = _quantize_block(source, index, block, options, q_inputs, targets, progress_bar)
    prefix = source.mtp.layer
    tensors = {name: t.to(torch.float16) for name, t in source.mtp_tensors().items()}
    for name, layer in packed.items():
        tensors.update(linear_tensors(f"{prefix}.{name}", layer))
    for name, tensor in block.state_dict().items():
        if not any(name.startswith(linear + ".") for linear in packed):
            tensors[f"{prefix}.{name}"] = tensor.to(torch.float16)
    write_shard(partial / MTP_SHARD, tensors)
    _mark_done(partial, "mtp")


def _mark_done(partial: Path, stage: str) -> None:
    """Record in the progress file that a stage after the blocks is written (--resume skips it)."""
    state = json.loads((partial / PROGRESS_FILE).read_text())
    write_json(partial / PROGRESS_FILE, {**state, stage: True})


def _finetune_stage(source: _Source, partial: Path, train: tuple[torch.Tensor, torch.Tensor],
                    held_out: tuple[torch.Tensor, torch.Tensor], embedding: PackedLinear | None,
                    options: QuantizeOptions, progress: bool) -> StageScore | None:
    """The end-to-end stage (finetune.py) over the packed blocks in `partial`, and a packed head with
    them; train and held_out: windows' tokens and the full-precision model's final hidden states
    (after its last norm), the teacher (no held-out windows: empty). The
    tuned shards are written beside them (*.tuned) and the progress file marked before any replaces
    its shard, so an interrupted run resumes by finishing the renames, or, if it stopped earlier, by
    tuning again from the untouched shards. `embedding`: a packed untied table, looked up as served."""
    from safetensors.torch import load_file
    from tqdm import tqdm

    from lcq.format.checkpoint import linear_from_tensors

    shards = [_block_shard(partial, index) for index in range(source.num_layers)]
    shards += [partial / HEAD_SHARD] if options.head_bits else []
    tuned_files = [shard.with_suffix(".tuned") for shard in shards]
    state = json.loads((partial / PROGRESS_FILE).read_text())
    kl = None
    if not state.get("tuned"):
        for stale in tuned_files:
            stale.unlink(missing_ok=True)
        contents = [load_file(str(shard)) for shard in shards]
        packed = {f"model.layers.{index}.{name}": layer for index, (shard, tensors) in enumerate(zip(shards, contents))
                  if index < source.num_layers for name, layer in _read_block(shard, index, options, tensors).items()}
        if options.head_bits:
            packed[HEAD] = linear_from_tensors(contents[-1], HEAD, options.head_bits, options.rank, options.group_size,
                                               lambda _: str(shards[-1]))
        # the blocks' tensors outside the packed layers: norms (Qwen3's q/k norms too), tuned; a mixture's router,
        # gpt-oss's sinks, held as they are
        unpacked = {name: tensor for tensors in contents for name, tensor in tensors.items()
                    if name.rpartition(".")[0] not in packed}
        norms = [name for name in unpacked if name.endswith("norm.weight")]
        looked_up = {} if embedding is None else {f"{EMBED}.weight": dequantize(embedding)}  # as it is served
        model = source.causal_lm({**source.non_block_tensors(), **unpacked, **looked_up})
        head = model.lm_head.weight.detach()
        steps = options.finetune_epochs * -(-len(train[0]) // options.batch_size)
        bar = tqdm(total=steps, desc="end-to-end", disable=not progress, unit="step")

        def on_step(loss: float) -> None:
            bar.update()
            bar.set_postfix(kl=f"{loss:.3g}")
        tuned, tuned_norms, kl = finetune(model, packed, norms, *train, head, options.finetune_epochs,
                                          options.end_to_end_lr, options.batch_size, options.seed, on_step,
                                          held_out if len(held_out[0]) else None, options.end_to_end_lr_of,
                                          options.finetune_index_updates)
        bar.close()
        for tensors, target in zip(contents, tuned_files):
            for name, layer in tuned.items():
                if f"{name}.qweight" in tensors:
                    tensors.update(linear_tensors(name, layer))
            tensors.update({name: w.to(torch.float16) for name, w in tuned_norms.items() if name in tensors})
            write_shard(target, tensors)
        write_json(partial / PROGRESS_FILE, {**state, "tuned": True})
    for tuned_file, shard in zip(tuned_files, shards):
        if tuned_file.is_file():
            tuned_file.replace(shard)
    return kl


def _target_widths(source: _Source, tokens: torch.Tensor, options: QuantizeOptions, partial: Path,
                   progress: bool) -> list[str]:
    """The --layer-bits rules that --target-bits buys (allocation.py), chosen once: a resumed run reads
    them back. Each unit's loss at each width is estimated with its starting fit at that width."""
    from tqdm import tqdm

    saved = partial / WIDTHS_FILE
    if saved.is_file():
        return json.loads(saved.read_text())
    shapes = linear_shapes(source.reader, source.num_layers)
    widths = range(options.bits, WIDEST + 1)
    units = {}
    for layer in range(source.num_layers):
        for name in UNITS:
            stored = {b: unit_bytes(shapes, layer, name, b, options.rank, options.group_size) for b in widths}
            if stored[options.bits]:  # (a Nemotron-H block holds some units only)
                units[layer, name] = Unit(layer, name, stored, {})
    bar = tqdm(total=source.num_layers, desc="weighing layers", disable=not progress, unit="block")

    def on_block(block: BlockGradient) -> None:
        for name in (name for index, name in units if index == block.index):
            linears = [linear for linear in block_linears(block.block) if unit_of(linear) == name]
            for b in widths:
                fitted = {}
                for linear in linears:  # (an expert no weighing token chose has no importance: unweighted)
                    w = block.block.get_submodule(linear).weight.detach().float()
                    fit = _initial_fit(linear, w, block.importance.get(linear), options, b)
                    book = stored_codebook(fit.book).values()
                    fitted[f"{linear}.weight"] = dense_weight(book, assign(grouped(w, options.group_size), book),
                                                              w.shape[1])
                units[block.index, name].loss[b] = block.loss_increase(fitted)
        bar.update()
    weigh_blocks(source, tokens[:WEIGHING_WINDOWS], _head_weight(source, source.device), options.batch_size, on_block)
    bar.close()
    weights = sum(n * k for n, k in shapes.values())
    base = sum(u.stored[options.bits] for u in units.values())
    chosen = choose_widths(list(units.values()), options.bits, options.target_bits * weights / 8 - base)
    rules = [units[key].rule(b) for key, b in chosen.items() if b != options.bits]
    write_json(saved, rules)
    return rules


def _prepare_partial(partial: Path, recorded: dict, resume: bool) -> int:
    """Create or reuse OUT_DIR.partial; returns how many blocks are already done."""
    progress_file = partial / PROGRESS_FILE
    if resume and progress_file.is_file():
        state = json.loads(progress_file.read_text())
        if state["options"] != recorded:
            raise UserError(f"{partial} was started with different options; run without --resume to start over")
        return int(state["done"])
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write_json(progress_file, {"options": recorded, "done": 0})
    return 0


def _block_shard(partial: Path, index: int) -> Path:
    return partial / f"block-{index:05d}.safetensors"


def _packed_names(partial: Path, index: int) -> list[str]:
    """The packed linears of block `index` as written, by name within the block (a mixture's: each expert's)."""
    from safetensors import safe_open

    prefix = f"model.layers.{index}."
    with safe_open(str(_block_shard(partial, index)), "pt") as shard:
        return [key[len(prefix):-len(".qweight")] for key in shard.keys() if key.endswith(".qweight")]


def _read_block(shard: Path, index: int, options: QuantizeOptions,
                tensors: dict[str, torch.Tensor] | None = None) -> dict[str, PackedLinear]:
    """The packed layers of a finished block, from its shard's tensors (read here unless given)."""
    from safetensors.torch import load_file

    from lcq.format.checkpoint import linear_from_tensors

    tensors = load_file(str(shard)) if tensors is None else tensors
    widths = options.widths
    prefix = f"model.layers.{index}."
    return {name: linear_from_tensors(tensors, f"model.layers.{index}.{name}", widths.of(index, name), options.rank,
                                      options.group_size, lambda _: str(shard))
            for name in (key[len(prefix):-len(".qweight")] for key in tensors
                         if key.startswith(prefix) and key.endswith(".qweight"))}
