"""SourceModel: the full-precision model the quantizer reads, one transformers decoder layer at a time,
and the calibration windows it runs them on."""
from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from lcq.errors import UserError
from lcq.format import EMBED, HEAD, CheckpointReader
from lcq.format.checkpoint import tensor_files
from lcq.format.mtp import mtp_names
from lcq.format.views import FINAL_NORMS, LFM2

from .reference import as_stored, hf_config, model_as_stored

CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "ministral3": "Ministral3", "qwen2": "Qwen2", "qwen3": "Qwen3",
                "gemma2": "Gemma2", "gemma3_text": "Gemma3", "smollm3": "SmolLM3", "olmo2": "Olmo2",
                "exaone4": "Exaone4", "seed_oss": "SeedOss", "olmo3": "Olmo3", "hunyuan_v1_dense": "HunYuanDenseV1",
                "glm4": "Glm4", "qwen3_moe": "Qwen3Moe", "mixtral": "Mixtral", "olmoe": "Olmoe",
                "qwen2_moe": "Qwen2Moe", "cohere": "Cohere", "cohere2": "Cohere2", "stablelm": "StableLm",
                "gpt_oss": "GptOss", "llama4_text": "Llama4Text", "glm4_moe": "Glm4Moe", "ernie4_5_moe": "Ernie4_5_Moe",
                "hunyuan_v1_moe": "HunYuanMoEV1", "dots1": "Dots1", "deepseek_v2": "DeepseekV2",
                "deepseek_v3": "DeepseekV3", "glm4_moe_lite": "Glm4MoeLite", "qwen3_5_text": "Qwen3_5",
                "qwen3_5_moe_text": "Qwen3_5Moe", "qwen3_next": "Qwen3Next", "minimax_m2": "MiniMaxM2",
                "granitemoehybrid": "GraniteMoeHybrid", "granitemoe": "GraniteMoe",
                "granitemoeshared": "GraniteMoeShared", "lfm2": "Lfm2", "lfm2_moe": "Lfm2Moe", "bamba": "Bamba",
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
SCALED_EMBEDDINGS = ("gemma2", "gemma3_text")  # token embeddings multiplied by sqrt(hidden_size) (Granite 4.0-H's
# by its embedding_multiplier)


HASH_CHUNK = 16 << 20  # bytes of a weight file hashed at a time


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")


def source_fingerprint(model_dir: Path, calib_text: str | None) -> str:
    """A digest of what a resumed quantization must find again: config.json, each weight file's name and
    whole contents (files hashed in parallel, at about 1 GB/s each: seconds for a 7B model, against hours
    of quantizing; the first and last MiB alone, before 2026-12-06, let a weight edited in between resume
    into a model of old and new blocks), the tokenizer's files (they turn the calibration text into the
    token ids the blocks are fitted on), and the calibration text."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            digest.update(name.encode() + hashlib.sha256((model_dir / name).read_bytes()).digest())
    files = sorted(set(tensor_files(model_dir).values()))
    with ThreadPoolExecutor(max(1, min(len(files), os.cpu_count() or 1))) as pool:  # (hashlib lets go of the GIL)
        for path, contents in zip(files, pool.map(_file_digest, files)):
            digest.update(path.name.encode() + contents)
    digest.update((calib_text or "").encode())
    return digest.hexdigest()


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.digest()


def calibration_batch(tokenizer, text: str, nsamples: int, seqlen: int, seed: int, held_out: int = 0,
                      extra: int = 0) -> torch.Tensor:
    """nsamples windows of seqlen tokens at random offsets of the tokenized text (seeded), then `held_out`
    more drawn with the next seed, then `extra` more (the end-to-end stage's beyond nsamples) with the
    one after: no count changes the windows drawn before it."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() < 2:
        raise UserError("calibration text is empty after tokenization")
    if ids.numel() < seqlen:
        raise UserError(f"the calibration text holds {ids.numel()} tokens, fewer than one window of --seqlen "
                        f"{seqlen}: give a longer --calib text or a smaller --seqlen")
    starts = [torch.randint(0, ids.numel() - seqlen + 1, (count,), generator=torch.Generator().manual_seed(seed + i))
              for i, count in enumerate((nsamples, held_out, extra))]
    return torch.stack([ids[s:s + seqlen] for s in torch.cat(starts).tolist()])


def _rope_sections(rotary: torch.nn.Module, device: torch.device, kind: str | None) -> int:
    """0 where the rotary embedding takes positions (batch, length); else the number of sections of the
    multimodal positions (sections, batch, length) it takes, as Qwen3.5's text rotary does in transformers
    5.17 (a text-only model gives every section the same positions). kind: a layer type, for rotaries
    that take one (Gemma 3's)."""
    probe, positions = torch.zeros(1, 1, 1, device=device), torch.zeros(1, 1, dtype=torch.long, device=device)
    try:
        rotary(probe, positions, kind) if "layer_type" in inspect.signature(rotary.forward).parameters \
            else rotary(probe, positions)
    except IndexError:
        return 3
    return 0


class SourceModel:
    """The source model read block by block."""

    def __init__(self, model_dir: Path, device: torch.device):
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
        self.rope_sections = 0 if nope else _rope_sections(self.rotary_module, device,
                                                           (getattr(self.config, "layer_types", None) or [None])[0])
        self.device = device
        self.mtp = mtp_names(self.config.to_dict(), self.reader.names())  # its multi-token-prediction layer
        # (checked before anything is quantized or written: a checkpoint written without them cannot load)
        last = f"model.layers.{self.num_layers - 1}."
        if not any(name.startswith(last) for name in self.reader.names()):
            raise UserError(f"{model_dir}: config.json has {self.num_layers} decoder layers, the weights hold no "
                            f"{last[:-1]}")
        needed = {f"{EMBED}.weight": "the embedding table", f"{self.final_norm_name}.weight": "the final norm",
                  **({} if self.config.tie_word_embeddings else
                     {f"{HEAD}.weight": "the head (config.json does not tie it to the embedding table)"})}
        for name, what in needed.items():
            if not self.reader.has(name):
                raise UserError(f"{model_dir}: the weights hold no {name}, {what}")

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
        state = {name[len(prefix):]: self.tensor(name).float() for name in self.reader.names()
                 if name.startswith(prefix) and not name[len(prefix):].startswith(tuple(f"{o}." for o in others))}
        try:
            layer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:  # missing, unexpected or misshapen weights: the config does not describe them
            reason = str(e).strip().splitlines()[-1].strip()
            raise UserError(f"{self.reader.folder}: decoder layer {index}'s weights do not match config.json ({reason})") \
                from None
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
            rope_positions = positions.expand(self.rope_sections, *positions.shape) if self.rope_sections else positions
            rope = None if self.rotary_module is None else self.rotary_module(hidden, rope_positions, kind) \
                if per_kind else self.rotary_module(hidden, rope_positions)
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

    def tensor(self, name: str) -> torch.Tensor:
        """A source tensor as stored, refused where it holds NaN or an infinity: quantized, such a row's scales
        became NaN (every weight of it NaN in the packed file) or the solvers failed with a traceback."""
        tensor = self.reader.tensor(name)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{self.reader.folder}: {name} holds NaN or infinite values; a model to quantize needs "
                            "finite weights")
        return tensor

    def non_block_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors outside the decoder layers and the multi-token-prediction layer."""
        outside = ("model.layers.",) if self.mtp is None else ("model.layers.", f"{self.mtp.prefix}.")
        return {name: self.tensor(name) for name in self.reader.names() if not name.startswith(outside)}

    def mtp_tensors(self) -> dict[str, torch.Tensor]:
        """The multi-token-prediction layer's own tensors, kept as they are: its norms and projection."""
        names = self.mtp
        own = [f"{names.prefix}.{module}." for module in (names.embed_norm, names.hidden_norm, names.projection,
                                                          names.final_norm)]
        return {name: self.tensor(name) for name in self.reader.names() if name.startswith(tuple(own))}

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
        table = self.tensor(f"{EMBED}.weight").float().to(self.device) if table is None else table
        scale = self.config.hidden_size ** 0.5 if self.config.model_type in SCALED_EMBEDDINGS else \
            getattr(self.config, "embedding_multiplier", 1.0)
        return torch.nn.functional.embedding(tokens.to(self.device), table) * scale

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's last norm applied to hidden states (S, T, H), fp32."""
        return self.norm(hidden, self.final_norm_name)

    def norm(self, hidden: torch.Tensor, name: str) -> torch.Tensor:
        """The model's norm `name` (an RMSNorm, or Cohere's and StableLM's LayerNorm) applied to hidden states
        (S, T, H), fp32."""
        weight = self.tensor(f"{name}.weight").float().to(hidden.device)
        weight = weight + 1 if self.config.model_type in OFFSET_NORMS else weight
        x = hidden.float()
        if self.config.model_type in CENTRED_NORMS:
            bias = self.reader.tensor(f"{name}.bias").float().to(x.device) if self.reader.has(f"{name}.bias") \
                else None  # (StableLM's)
            return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps=self.config.layer_norm_eps)
        eps = getattr(self.config, "rms_norm_eps", None) or getattr(self.config, "norm_eps", None) or \
            self.config.layer_norm_epsilon  # (LFM2's name, Nemotron-H's)
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
