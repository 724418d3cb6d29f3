"""The transformers model a folder stands for, with LCQ layers dequantized into it.

Evaluation and tests compare against this: it depends only on the format and transformers,
never on our runtime, so it is an independent reference for the runtime's output.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lcq.errors import UserError
from lcq.format import (VIEWED_ARCHITECTURES, CheckpointReader, FormatError, ViewError, dequantize,
                        stored_tensor_names, view_config)
from lcq.format.views import interleaved_parts

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "ministral3", "qwen2", "qwen3", "gemma2", "gemma3_text", "smollm3",
                         "olmo2", "olmo3", "exaone4", "seed_oss", "hunyuan_v1_dense", "glm4", "qwen3_moe", "mixtral",
                         "olmoe", "qwen2_moe", "cohere", "cohere2", "stablelm", "gpt_oss", "llama4_text", "glm4_moe",
                         "ernie4_5_moe", "hunyuan_v1_moe", "dots1", "deepseek_v2", "deepseek_v3", "glm4_moe_lite",
                         "qwen3_5_text", "qwen3_5_moe_text", "qwen3_next", "minimax_m2", "granitemoehybrid", "granitemoe",
                         "granitemoeshared", "lfm2", "lfm2_moe", "bamba", "nemotron_h", "falcon_h1", "arcee", "apertus")


# A decoder layer's MLP (or mixture), by its module's name: Llama 4's, Granite 4.0-H's mixture, the others'; a
# Nemotron-H block's part (its mixer or MLP)
MLP_MODULES = ("feed_forward", "block_sparse_moe", "mlp", "mixer")


def read_config(model_dir: str | Path) -> dict:
    """config.json as a dict (of the architecture lcq reads the folder as: lcq.format.views), checked to be
    a supported Llama-family architecture."""
    path = Path(model_dir)
    if not path.is_dir():
        raise UserError(f"{path}: no such model folder")
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json (not a Hugging Face model folder)")
    try:
        config = view_config(json.loads((path / "config.json").read_text()), stored_tensor_names(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path / 'config.json'}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path / 'config.json'}: not UTF-8 text") from None
    except ViewError as e:
        raise UserError(f"{path / 'config.json'}: {e}") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"{path}: architecture {model_type!r} is not supported "
                        f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}; read as one of them: "
                        f"{', '.join(VIEWED_ARCHITECTURES)})")
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"):  # (the first is needed)
        value = config.get(key, None if key == "num_hidden_layers" else 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{path / 'config.json'}: {key} must be a positive integer, got {json.dumps(value)}")
    return config


def hf_config(model_dir: str | Path):
    """A transformers config without our quantization block (transformers does not know 'lcq'), set to
    torch's fused attention, or to transformers' eager attention where the scores are soft-capped (Gemma
    2) or have sinks (gpt-oss): SDPA has no such step."""
    from transformers import AutoConfig

    config = read_config(model_dir)
    config.pop("quantization_config", None)
    config.pop("transformers_version", None)
    model_type = config.pop("model_type")
    config = AutoConfig.for_model(model_type, **config)
    eager = getattr(config, "attn_logit_softcapping", None) or model_type == "gpt_oss"
    config._attn_implementation = "eager" if eager else "sdpa"
    return config


class GatedMLP(torch.nn.Module):
    """down(act(gate(x)) * up(x)) under the names lcq reads: an MLP stored otherwise, as lcq reads and quantizes
    it (lcq.format.views): gate and up stored as one matrix, gate's rows first (split_from: GLM-4-0414's
    gate_up_proj, Granite 4.0-H's shared_mlp.input_linear), or LFM2's w1, w3 and w2."""

    def __init__(self, gate: torch.nn.Linear, up: torch.nn.Linear, down: torch.nn.Linear, activation):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.activation_fn = gate, up, down, activation

    @classmethod
    def split_from(cls, fused: torch.nn.Linear, down: torch.nn.Linear, activation) -> "GatedMLP":
        width = fused.out_features // 2
        settings = dict(bias=False, device=fused.weight.device, dtype=fused.weight.dtype)
        return cls(torch.nn.Linear(fused.in_features, width, **settings),
                   torch.nn.Linear(fused.in_features, width, **settings), down, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation_fn(self.gate_proj(x)) * self.up_proj(x))


class PickedRows(torch.nn.Module):
    """A fused projection computed from its parts (modules its owner holds under their own names, looked up at
    each call: the quantizer's stages replace them), each part's rows put back where the fused matrix has
    them: Qwen3-Next's in_proj_qkvz and in_proj_ba as lcq reads and quantizes them
    (lcq.format.views.interleaved_parts), for transformers' layer that calls the fused one."""

    def __init__(self, owner: torch.nn.Module, parts: dict[str, list[int]]):
        super().__init__()
        self.owner = [owner]  # in a list, so that it is not registered as this module's child
        self.names = list(parts)
        picked = [row for rows in parts.values() for row in rows]
        self.inverse = sorted(range(len(picked)), key=picked.__getitem__)  # fused row -> its place among the parts'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self.owner[0], name)(x) for name in self.names], dim=-1)[..., self.inverse]


def _split_linear_attention(attention: torch.nn.Module) -> None:
    """Qwen3-Next's linear attention with its fused projections as their parts, each a Linear under its own
    name (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a), the fused names computing from them."""
    fused_rows = interleaved_parts(attention.num_k_heads, attention.num_v_heads, attention.head_k_dim,
                                   attention.head_v_dim)
    for fused, parts in fused_rows.items():
        original = getattr(attention, fused)
        settings = dict(bias=False, device=original.weight.device, dtype=original.weight.dtype)
        for name, rows in parts.items():
            setattr(attention, name, torch.nn.Linear(original.in_features, len(rows), **settings))
        setattr(attention, fused, PickedRows(attention, parts))


class SplitExperts(torch.nn.ModuleList):
    """A mixture's experts (transformers 5 keeps them as two 3-D tensors, gate_up_proj and down_proj; gpt-oss's
    stored (in, out), gate and up columns alternating, with biases) as checkpoints store them and lcq
    quantizes them: experts.{e}.gate_proj, up_proj and down_proj, each a Linear; the same sum over each
    token's chosen experts, in increasing expert order, through the experts' own gate function."""

    def __init__(self, experts: torch.nn.Module):
        count, rows, columns = experts.gate_up_proj.shape
        hidden, width = (rows, columns // 2) if experts.is_transposed else (columns, rows // 2)
        super().__init__(_expert(hidden, width, experts.gate_up_proj, experts.has_bias) for _ in range(count))
        self.concatenated = experts.is_concatenated
        experts._parameters.clear()  # its 3-D tensors, which these replace; its gate function stays
        self.apply_gate = experts._apply_gate

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for expert in top_k_index.unique().tolist():
            rows, slots = (top_k_index == expert).nonzero(as_tuple=True)
            e, x = self[expert], hidden[rows]
            gate, up = e["gate_proj"](x), e["up_proj"](x)
            gate_up = torch.cat((gate, up), -1) if self.concatenated else torch.stack((gate, up), -1).flatten(-2)
            y = e["down_proj"](self.apply_gate(gate_up))
            out.index_add_(0, rows, (y * top_k_weights[rows, slots, None]).to(out.dtype))
        return out


class SplitLlama4Experts(torch.nn.ModuleList):
    """Llama 4's experts (gate_up_proj (experts, hidden, 2 x width), gate columns then up's, and down_proj
    (experts, width, hidden), each (in, out)) as experts.{e}.gate_proj, up_proj and down_proj, each a Linear.
    transformers runs every expert over every token, its input times the router's weight, 0 where the
    expert was not chosen; this runs each expert over the rows it was chosen for (a zero row, without
    biases, gives a zero output), the same sums."""

    def __init__(self, experts: torch.nn.Module):
        count, hidden, columns = experts.gate_up_proj.shape
        super().__init__(_expert(hidden, columns // 2, experts.gate_up_proj, False) for _ in range(count))
        self.activation = experts.act_fn.forward  # (the module itself would join the list)

    def forward(self, routed_in: torch.Tensor) -> torch.Tensor:
        """routed_in (experts x tokens, hidden), expert-major -> the same shape."""
        x = routed_in.view(len(self), -1, routed_in.shape[-1])
        out = torch.zeros_like(x)
        for e, expert in enumerate(self):
            rows = x[e].ne(0).any(-1).nonzero().squeeze(1)
            chosen = x[e, rows]
            out[e, rows] = expert["down_proj"](self.activation(expert["gate_proj"](chosen)) * expert["up_proj"](chosen))
        return out.view(routed_in.shape)


class SplitUngatedExperts(torch.nn.ModuleList):
    """Nemotron-H's experts (up_proj (experts, width, in), down_proj (experts, in, width), without a gate) as
    experts.{e}.up_proj and down_proj, each a Linear; the same sum over each token's chosen experts."""

    def __init__(self, experts: torch.nn.Module):
        count, width, hidden = experts.up_proj.shape
        settings = dict(bias=False, device=experts.up_proj.device, dtype=experts.up_proj.dtype)
        super().__init__(torch.nn.ModuleDict({"up_proj": torch.nn.Linear(hidden, width, **settings),
                                              "down_proj": torch.nn.Linear(width, hidden, **settings)})
                         for _ in range(count))
        self.activation = experts.act_fn.forward  # (the module itself would join the list)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for expert in top_k_index.unique().tolist():
            rows, slots = (top_k_index == expert).nonzero(as_tuple=True)
            y = self[expert]["down_proj"](self.activation(self[expert]["up_proj"](hidden[rows])))
            out.index_add_(0, rows, (y * top_k_weights[rows, slots, None]).to(out.dtype))
        return out


def _expert(hidden: int, width: int, like: torch.Tensor, bias: bool) -> torch.nn.ModuleDict:
    """An expert's gate_proj, up_proj and down_proj as Linears, on the device and in the dtype of `like`."""
    settings = dict(bias=bias, device=like.device, dtype=like.dtype)
    return torch.nn.ModuleDict({"gate_proj": torch.nn.Linear(hidden, width, **settings),
                                "up_proj": torch.nn.Linear(hidden, width, **settings),
                                "down_proj": torch.nn.Linear(width, hidden, **settings)})


def as_stored(layer: torch.nn.Module) -> torch.nn.Module:
    """A transformers decoder layer with its MLP's matrices as checkpoints store them and lcq quantizes
    them, each a Linear: GLM-4-0414's gate_up_proj and Granite 4.0-H's dense MLP's input_linear as gate_proj
    and up_proj, LFM2's w1, w3 and w2 as gate_proj, up_proj and down_proj (GatedMLP), a mixture's experts
    one by one (SplitExperts; Llama 4's, under feed_forward: SplitLlama4Experts; Granite's under
    block_sparse_moe; Nemotron-H's, under mixer: SplitUngatedExperts), Qwen3-Next's fused linear-attention
    projections as Qwen3.5's parts; Falcon-H1's in_proj factors, folded into its weights, as 1."""
    if hasattr(getattr(layer, "linear_attn", None), "in_proj_qkvz"):  # Qwen3-Next's fused projections
        _split_linear_attention(layer.linear_attn)
    if type(getattr(layer, "mamba", None)).__name__ == "FalconH1Mixer":  # its in_proj rows' factors: all 1, as lcq
        # reads its config (folded into the weights: lcq.format.views), so no buffer of them (the model's, or a
        # layer's built alone, which has none) is needed
        layer.mamba._buffers.pop("mup_vector", None)
        layer.mamba.mup_vector = 1.0
    if getattr(layer, "shared_mlp", None) is not None:  # Granite 4.0-H's dense MLP, beside its mixture
        shared = layer.shared_mlp
        layer.shared_mlp = GatedMLP.split_from(shared.input_linear, shared.output_linear, shared.activation)
    owner = next((name for name in MLP_MODULES if getattr(layer, name, None) is not None), None)
    mlp = getattr(layer, owner) if owner else None
    if hasattr(mlp, "w1"):  # LFM2's
        setattr(layer, owner, mlp := GatedMLP(mlp.w1, mlp.w3, mlp.w2, torch.nn.functional.silu))
    if hasattr(mlp, "gate_up_proj"):
        setattr(layer, owner, mlp := GatedMLP.split_from(mlp.gate_up_proj, mlp.down_proj, mlp.activation_fn))
    experts = getattr(mlp, "experts", None)
    if experts is not None and isinstance(getattr(experts, "gate_up_proj", None), torch.nn.Parameter):
        mlp.experts = SplitLlama4Experts(experts) if type(experts).__name__ == "Llama4TextExperts" else \
            SplitExperts(experts)
    if experts is not None and isinstance(getattr(experts, "up_proj", None), torch.nn.Parameter):  # Nemotron-H's
        mlp.experts = SplitUngatedExperts(experts)
    return layer


def model_as_stored(model: torch.nn.Module) -> torch.nn.Module:
    """A transformers CausalLM with each decoder layer as as_stored leaves it, and its embedding table under
    the name lcq reads it by (model.embed_tokens; Nemotron-H's model.embeddings, which its model still reads)."""
    for layer in model.model.layers:
        as_stored(layer)
    if "embeddings" in model.model._modules:
        table = model.model._modules.pop("embeddings")
        model.model.embed_tokens = table
        object.__setattr__(model.model, "embeddings", table)  # (not a second registration of the module)
    return model


def load_reference_model(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """A transformers CausalLM in eval mode on CPU: full precision, or LCQ dequantized."""
    from transformers import AutoModelForCausalLM

    config = hf_config(model_dir)
    model = model_as_stored(AutoModelForCausalLM.from_config(config, dtype=dtype))
    reader = CheckpointReader(model_dir)
    state: dict[str, torch.Tensor] = {}
    for prefix in reader.quantized_prefixes():
        layer = reader.linear(prefix)
        state[f"{prefix}.weight"] = dequantize(layer, dtype)
        if layer.bias is not None:
            state[f"{prefix}.bias"] = layer.bias.to(dtype)
    packed = set(reader.quantized_prefixes())
    if "lm_head" in packed and config.tie_word_embeddings:  # the packed head is the embedding table too
        state["model.embed_tokens.weight"] = state["lm_head.weight"]
    for name in reader.names():
        if name.rsplit(".", 1)[0] not in packed:
            state[name] = reader.tensor(name).to(dtype)
    expected = model.state_dict()
    for name, tensor in state.items():  # a layer from another model's files: one line, not torch's traceback
        if name in expected and expected[name].shape != tensor.shape:
            raise FormatError(f"{model_dir}: tensor '{name}' is {list(tensor.shape)}, but config.json makes it "
                              f"{list(expected[name].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise FormatError(f"{model_dir}: tensors missing {missing[:3]} or unexpected {unexpected[:3]}")
    return model.eval()
