"""Build our model from a folder: LCQ (packed linears, fused per layer) or plain fp16/bf16/fp32
safetensors. Tensors are read one at a time from the shards, so the model exists once in memory."""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lcq.errors import UserError
from lcq.format import EMBED, HEAD, CheckpointReader, FormatError, PackedLinear
from lcq.format.views import FINAL_NORMS, LFM2
from lcq.kernels import LCQLinear, cpu_half, cpu_ops
from lcq.kernels.cpu_matmul import can_pack, dense_linear, exact_half, half_swiglu, pack_weight

from .config import ModelConfig
from .layers import PackedEmbedding
from .llama import LlamaModel, MixtureOfExperts
from .mamba import Mamba2


class DenseLinear(torch.nn.Module):
    """A full-precision linear layer (no random init, unlike torch.nn.Linear). On CPU it keeps an
    fp16 copy instead of its fp32 weight when that is exact (read from an fp16 checkpoint), else
    the weight packed for oneDNN (see lcq.kernels.cpu_matmul). weight and half: as _kept_weight
    makes them (one of the two)."""

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, half: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = (weight if half is None else half).shape
        self.half = half
        self.weight = None if half is not None else torch.nn.Parameter(pack_weight(weight), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def decode_weights(self) -> tuple[int, int, torch.Tensor | None] | None:
        """(cpu_ops.HALF_WEIGHT, the fp16 copy's address, fp32 bias or None) for the one-call CPU
        decode step, where the copy exists."""
        if self.half is None or (self.bias is not None and self.bias.dtype != torch.float32):
            return None
        return cpu_ops.HALF_WEIGHT, self.half.data_ptr(), self.bias

    def fused_swiglu(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up of this [gate; up] layer where the CPU kernel finishes it inside the product
        (the fp16 copy, fp32 activations, no bias), else None."""
        if self.half is None or self.bias is not None or x.dtype != torch.float32:
            return None
        return half_swiglu(x, self.half)

    def gated_product(self, gate_up: torch.Tensor, activation: str) -> None:
        """None: cuBLAS takes its inputs as they are, so the MLP's activation runs as a kernel of its own first
        (LCQLinear.gated_product's counterpart)."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_linear(x, self.weight, self.bias, self.half)


ROUTER_NAMES = {"gpt_oss": "router", "llama4_text": "router", "hunyuan_v1_moe": "gate.wg",  # where not gate
                "granitemoehybrid": "router", "granitemoe": "router", "granitemoeshared": "router"}
# The choosing bias under the mixture's module, where not under its router: ERNIE 4.5's under the router's
# moe_statics, MiniMax-M2's and LFM2's beside the router
CORRECTION_NAMES = {"ernie4_5_moe": "gate.moe_statics.e_score_correction_bias",
                    "minimax_m2": "e_score_correction_bias", "lfm2_moe": "expert_bias"}
QK_NORM_NAMES = {**dict.fromkeys(("hunyuan_v1_dense", "hunyuan_v1_moe"), ("query_layernorm", "key_layernorm")),
                 **dict.fromkeys((*LFM2, "stablelm"), ("q_layernorm", "k_layernorm"))}
# A layer's norms before its attention (or mixer) and before its MLP, where not input_layernorm and
# post_attention_layernorm
NORM_NAMES = {**dict.fromkeys(LFM2, ("operator_norm", "ffn_norm")),
              **dict.fromkeys(("bamba", "falcon_h1"), ("input_layernorm", "pre_ff_layernorm")),
              "nemotron_h": ("norm", "norm"),  # (a block's one norm, before its mixer or its MLP)
              "apertus": ("attention_layernorm", "feedforward_layernorm")}
# The four norms of a layer with norms on its outputs: the attention's input and output, the MLP's input and
# output (Gemma's names, which OLMo 2 and EXAONE 4 share for the two they have)
SANDWICH_NORM_NAMES = {"gemma": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                                 "post_feedforward_layernorm"),
                       "glm4": ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm",
                                "post_mlp_layernorm")}


def _layer_norms(layer: torch.nn.Module, config: ModelConfig) -> list[tuple[torch.nn.Module, str]]:
    """A decoder layer's norms and their checkpoint names, which mean different roles in Gemma's and OLMo 2's
    layers (OLMo 2's has no input norms)."""
    attention = layer.self_attn
    q_name, k_name = QK_NORM_NAMES.get(config.model_type, ("q_norm", "k_norm"))
    head_norms = [(attention.q_norm, f"self_attn.{q_name}"), (attention.k_norm, f"self_attn.{k_name}")] \
        if config.qk_norm and getattr(attention, "q_norm", None) is not None else []
    if config.latent is not None:  # the latent attention's norms of its query and key/value latents
        head_norms = [(attention.kv_norm, "self_attn.kv_a_layernorm")] + \
            ([(attention.q_down_norm, "self_attn.q_a_layernorm")] if config.latent.q_rank else [])
    if config.sandwich_norms:
        names = SANDWICH_NORM_NAMES.get(config.model_type, SANDWICH_NORM_NAMES["gemma"])
        norms = list(zip((layer.attention_norm, layer.attention_output_norm, layer.mlp_norm, layer.mlp_output_norm),
                         names))
        return [(module, name) for module, name in norms if module is not None] + head_norms
    before_attention, before_mlp = NORM_NAMES.get(config.model_type, ("input_layernorm", "post_attention_layernorm"))
    if layer.mlp_norm is None:  # Cohere: one norm before attention and the MLP
        return [(layer.attention_norm, before_attention), *head_norms]
    return [(layer.attention_norm, before_attention), (layer.mlp_norm, before_mlp), *head_norms]


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               cache_dense: bool | None = None, keep_packed: bool = True, mtp: bool = False
               ) -> tuple[LlamaModel, ModelConfig]:
    """Our model for a folder, on `device` in `dtype`. cache_dense (default: on CPU) keeps each LCQ
    layer's dequantized weight, trading memory for CPU speed; GPUs run the fused kernels instead.
    keep_packed=False drops cached layers' packed tensors (LCQLinear.release_packed): for callers
    that run the model only in this dtype on this device, as an engine does. mtp: build and load the
    checkpoint's multi-token-prediction layer too (model.mtp; a UserError where it has none)."""
    device = torch.device(device)
    config = ModelConfig.from_folder(path)
    if mtp and config.mtp is None:
        raise UserError(f"{path}: no multi-token-prediction layer to draft with (DeepSeek-V3's, GLM-4.5's, "
                        "Qwen3-Next's or Qwen3.5's)")
    reader = CheckpointReader(path)
    if cache_dense is None:
        cache_dense = device.type == "cpu"
    # Whether fp32 CPU products take exact fp16 copies of full-precision weights (cpu_matmul.half_copy's condition)
    halves = device.type == "cpu" and dtype == torch.float32 and cpu_half.enabled()

    def read(name: str) -> torch.Tensor:
        return reader.tensor(name).to(device=device, dtype=dtype)

    def fusable(names: list[str], what: str, values: list[int]) -> None:
        """FormatError unless the parts lcq fuses into one product agree on `what`."""
        if len(set(values)) > 1:
            raise FormatError(f"{reader.folder}: {', '.join(names)} have different {what} "
                              f"({', '.join(map(str, values))}); lcq runs them as one fused product, which "
                              f"needs one")

    def make_linear(names: list[str]) -> torch.nn.Module:
        if reader.quant is not None and reader.has(f"{names[0]}.qweight"):
            parts = [reader.linear(n) for n in names]
            fusable(names, "widths in bits", [part.bits for part in parts])
            fusable(names, "input features", [part.in_features for part in parts])
            return LCQLinear(PackedLinear.concat(parts).to(device), cache_dense)
        biases = [f"{n}.bias" for n in names]
        bias = torch.cat([read(b) for b in biases]) if all(reader.has(b) for b in biases) else None
        parts = [reader.tensor(f"{n}.weight") for n in names]
        fusable(names, "input features", [part.shape[-1] for part in parts])
        half, weight = _kept_weight(torch.cat(parts) if len(parts) > 1 else parts[0], device, dtype, halves,
                                    fresh=len(parts) > 1, packed=True)
        return DenseLinear(weight, bias, half)

    with torch.device(device):
        model = LlamaModel(config, make_linear, dtype)
        if mtp:
            model.add_mtp(make_linear)

    def norm_weight(name: str) -> torch.Tensor:
        """A norm's scale: Gemma stores it as w - 1 (its norm multiplies by 1 + w, in fp32)."""
        weight = reader.tensor(name).float()
        return (weight + config.norm_offset).to(device=device, dtype=dtype)

    _check_no_layers_beyond(reader, model, config)
    with torch.no_grad():
        # Cohere's logits are scaled by logit_scale: the final norm's weight carries it (the head is the tied table)
        final = FINAL_NORMS.get(config.model_type, "model.norm")
        with _fitting(reader, final):
            model.norm.weight.copy_(norm_weight(f"{final}.weight") * config.logit_scale)
            if config.norm_bias:  # StableLM's LayerNorms
                model.norm.bias.copy_(read(f"{final}.bias"))
        for i, layer in enumerate(model.layers):
            with _fitting(reader, layer.prefix):
                _load_layer(layer, config, i, reader, read, norm_weight)
        if mtp:
            names = config.mtp
            with _fitting(reader, names.prefix):
                _load_layer(model.mtp.layer, config.mtp_layer_config(), 0, reader, read, norm_weight)
                for module, name in ((model.mtp.embed_norm, names.embed_norm),
                                     (model.mtp.hidden_norm, names.hidden_norm), (model.mtp.norm, names.final_norm)):
                    module.weight.copy_(norm_weight(f"{names.prefix}.{name}.weight"))
        with _fitting(reader, "the embeddings and the head"):
            if reader.quant is not None and reader.has(f"{HEAD}.qweight"):
                _use_packed_head(model, config, reader, device, dtype, halves, cache_dense)
            else:
                _use_dense_head(model, config, reader, device, dtype, halves)
    if cache_dense:
        for module in model.modules():
            if isinstance(module, LCQLinear):
                module.warm(dtype)
                if not keep_packed:
                    module.release_packed()
    mixtures = [module for module in model.modules() if isinstance(module, MixtureOfExperts)]
    if any([mixture.stack_experts() for mixture in mixtures]) and device.type == "cuda":
        torch.cuda.empty_cache()  # the experts' separate tensors, freed: their small blocks would stay reserved
    return model.eval(), config


def _kept_weight(stored: torch.Tensor, device: torch.device, dtype: torch.dtype, halves: bool, fresh: bool = False,
                 packed: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A full-precision weight as read (`stored`, in its checkpoint's dtype) as the model keeps it: (its exact
    fp16 copy, None) where fp32 CPU products take one (`halves`) and fp16 holds its values, else (None, the
    weight in `dtype` on `device`). The same as half_copy(stored.to(device, dtype), exact_only=True), without
    its full-size fp32 tensors: an fp16 weight is copied as read, another is checked a few rows at a time.
    What is kept is in memory of its own (fresh: `stored` is, a concatenation; packed: the caller keeps the
    weight packed, a copy, where can_pack): a tensor read may be a view of the file mapped (safetensors), whose
    pages the kernel counts as free memory (the KV pool is sized by it), and which a file rewritten in place
    would change, or cut short."""
    half = exact_half(stored) if halves else None
    kept = half if half is not None else stored.to(device=device, dtype=dtype)
    if not fresh and not (packed and half is None and can_pack(kept)) and kept.device == stored.device and \
            kept.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr():
        kept = kept.clone(memory_format=torch.contiguous_format)
    return (kept, None) if half is not None else (None, kept)


def _read_table(reader: CheckpointReader, name: str, config: ModelConfig, device: torch.device, dtype: torch.dtype,
                halves: bool, packed: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The embedding table or the head `name` as kept (_kept_weight), of the size config.json makes."""
    stored = reader.tensor(name)
    if tuple(stored.shape) != (config.vocab_size, config.hidden_size):
        raise FormatError(f"{reader.folder}: the embeddings and the head: a tensor's size is not what config.json "
                          f"makes ({name} is {tuple(stored.shape)}, config.json makes "
                          f"{(config.vocab_size, config.hidden_size)})")
    return _kept_weight(stored, device, dtype, halves, packed=packed)


@contextmanager
def _fitting(reader: CheckpointReader, what: str) -> Iterator[None]:
    """A tensor of another size than config.json makes (torch's RuntimeError from a copy or a reshape) as one
    FormatError naming the folder and the part, not a traceback from the background load."""
    try:
        yield
    except RuntimeError as e:
        raise FormatError(f"{reader.folder}: {what}: a tensor's size is not what config.json makes ({e})") from None


def _check_no_layers_beyond(reader: CheckpointReader, model: LlamaModel, config: ModelConfig) -> None:
    """A FormatError where the folder holds decoder layers past config.json's count (other than a multi-token-
    prediction layer): a config that lists fewer would load, and serve a model without them."""
    base = model.layers[0].prefix.rsplit(".", 1)[0]
    numbered = re.compile(rf"{re.escape(base)}\.(\d+)\.")
    beyond = sorted({int(match[1]) for name in reader.names() if (match := numbered.match(name))
                     and int(match[1]) >= len(model.layers)
                     and not (config.mtp is not None and name.startswith(f"{config.mtp.prefix}."))})
    if beyond:
        raise FormatError(f"{reader.folder}: holds layers up to {beyond[-1]}, beyond the {len(model.layers)} of "
                          "config.json's num_hidden_layers")


def _load_layer(layer: torch.nn.Module, config: ModelConfig, index: int, reader: CheckpointReader, read,
                norm_weight) -> None:
    """A decoder layer's tensors that are not linear layers: norms, attention sinks, the latent attention's
    up-projection, a recurrent mixer's own, a mixture's router. config: the layer's model (index its layer)."""
    prefix = layer.prefix
    norms = _layer_norms(layer, config)
    for module, name in norms:  # (q/k norms with each head's own weights: Command R+'s a row per head, StableLM 2
        # 12B's a module per head, norms.H; read as one)
        stored = f"{prefix}.{name}"
        weight = norm_weight(f"{stored}.weight") if not reader.has(f"{stored}.norms.0.weight") else torch.cat(
            [norm_weight(f"{stored}.norms.{h}.weight") for h in range(module.weight.numel() // config.head_dim)])
        module.weight.copy_(weight.reshape(module.weight.shape))
    for module, name in norms if config.norm_bias else ():  # StableLM's LayerNorms (its q/k ones have none)
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(read(f"{prefix}.{name}.bias"))
    if config.attention_sinks:  # fp32, whatever the model's dtype
        layer.self_attn.sinks.copy_(reader.tensor(f"{prefix}.self_attn.sinks").float())
    if config.latent is not None:  # kv_b_proj in full precision, split by head for the absorbed products
        layer.self_attn.load_up_projection(read(f"{prefix}.self_attn.kv_b_proj.weight"))
    if config.linear_layers[index]:  # a recurrent mixer's convolution, decay, and gated norm
        mixer = f"{prefix}.{layer.mixer_name}"
        layer.self_attn.load(lambda name: reader.tensor(f"{mixer}.{name}"))
    if layer.mamba is not None:  # (Falcon-H1's, beside the attention)
        layer.mamba.load(lambda name: reader.tensor(f"{prefix}.{Mamba2.CHECKPOINT_NAME}.{name}"))
    if getattr(layer.mlp, "xielu", None) is not None:  # Apertus's activation factors, stored raw
        factors = {name: reader.tensor(f"{layer.mlp.prefix}.act_fn.{name}").float().reshape(()) for name in
                   ("alpha_p", "alpha_n", "beta", "eps")}
        alpha_p = torch.nn.functional.softplus(factors["alpha_p"])
        alpha_n = factors["beta"] + torch.nn.functional.softplus(factors["alpha_n"])
        layer.mlp.xielu.copy_(torch.stack([alpha_p, alpha_n, factors["beta"], factors["eps"]]))
    if config.moe_layers[index]:  # the router (and a shared expert's gate), kept in full precision
        router = ROUTER_NAMES.get(config.model_type, "gate")
        mlp = f"{prefix}.{config.mlp_name}"
        layer.mlp.router.copy_(reader.tensor(f"{mlp}.{router}.weight"))  # in its own dtype (fp32: GLM-4.5)
        if config.router_bias:
            layer.mlp.router_bias.copy_(reader.tensor(f"{mlp}.{router}.bias"))
        if config.router_correction:  # (ERNIE 4.5's (1, experts))
            correction = CORRECTION_NAMES.get(config.model_type, f"{router}.e_score_correction_bias")
            layer.mlp.correction.copy_(reader.tensor(f"{mlp}.{correction}").reshape(-1))
        if layer.mlp.shared_expert_gate is not None:
            layer.mlp.shared_expert_gate.copy_(read(f"{mlp}.shared_expert_gate.weight"))


def _use_packed_head(model: LlamaModel, config: ModelConfig, reader: CheckpointReader, device: torch.device,
                     dtype: torch.dtype, halves: bool, cache_dense: bool) -> None:
    """lm_head as an LCQ layer (quantize --head-bits). Tokens are looked up from a packed table: an untied
    model's own (format version 3), else the packed head a tied table is not stored beside, which keeps
    its packed tensors for that; or from an fp16 table (untied, version 2), kept as _use_dense_head keeps
    an untied table."""
    layer = reader.linear(HEAD).to(device)
    model.packed_head, model.lm_head = LCQLinear(layer, cache_dense), None
    if reader.has(f"{EMBED}.qweight"):
        model.embed_tokens = PackedEmbedding(reader.linear(EMBED).to(device))
    elif reader.has(f"{EMBED}.weight"):
        half, table = _read_table(reader, f"{EMBED}.weight", config, device, dtype, halves)
        model.embed_tokens.weight = torch.nn.Parameter(table if half is None else half, requires_grad=False)
    else:
        model.embed_tokens = PackedEmbedding(layer)


def _use_dense_head(model: LlamaModel, config: ModelConfig, reader: CheckpointReader, device: torch.device,
                    dtype: torch.dtype, halves: bool) -> None:
    """The full-precision head: an exact fp16 copy serving every CPU product where there is one (and the
    lookups of a tied table), else the weight, packed for CPU products where it can be. An embedding table
    is looked up from its exact fp16 copy where there is one (a CPU model then keeps no fp32 table: 113 MB
    less for SmolLM2's tied 49152 x 576), else from the table in the model's dtype.
    Each is read in its checkpoint's dtype and replaces the model's placeholder (LlamaModel): loading an
    fp16 table makes no fp32 copy of it (_kept_weight; the fp16 copy of Gemma-3-270M's 262144 x 640 table
    is 320 MiB, and its fp32 round trip and exactness check peaked 1.6 GiB above what loading began with)."""
    embed_half, embed = _read_table(reader, f"{EMBED}.weight", config, device, dtype, halves)
    # A tied table's lookups share the head's fp16 copy (or its table, where it has none)
    head_half, head = (embed_half, embed) if config.tie_word_embeddings else \
        _read_table(reader, f"{HEAD}.weight", config, device, dtype, halves, packed=True)
    model.embed_tokens.weight = torch.nn.Parameter(embed if embed_half is None else embed_half, requires_grad=False)
    model.lm_head_half = head_half
    if head_half is not None:  # it serves every product
        model.lm_head = None
    elif can_pack(head):  # a packed copy for CPU products; a tied embedding table stays for lookups
        model.lm_head = torch.nn.Parameter(pack_weight(head), requires_grad=False)
    else:
        model.lm_head = torch.nn.Parameter(head, requires_grad=False)
