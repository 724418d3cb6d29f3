"""LoRA adapters (PEFT folders) served over the base model's LCQ or dense layers.

An adapter adds scale * B (A x) to some linear layers: A (r, K), B (N, r). The base weights stay
as they are, packed or dense, so many adapters share one 2-bit base, as QLoRA fine-tunes are
meant to run.

A step may mix sequences of several adapters and of none: AdapterStack has a fixed number of slots,
each with room for one adapter of rank up to a fixed rank on every layer; LoRABatch says which slot
each row of the flattened batch uses, and each layer adds, per row, its slot's product (the other
slots' masked out). Adapters are copied into free slots and zeroed out of them in place, so the
stack's shapes never change: CUDA graphs captured once serve whatever the slots hold later.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lcq.errors import UserError
from lcq.format import StoredTensor, source_parts

from .config import ModelConfig
from .layers import UNGATED

WEIGHTS_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
# Our fused layers (their key under model.layers.{i}) and the checkpoint matrices they join, in order.
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "self_attn.o_proj": ("self_attn.o_proj",),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
         "mlp.down_proj": ("mlp.down_proj",)}


@dataclass
class LoRAAdapter:
    """One PEFT folder's matrices, on the CPU in fp32 until a stack copies them into a slot."""

    folder: str
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]]  # checkpoint matrix name -> (A (r, K), scale * B (N, r))

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.parts.values())


def layer_fused(config: ModelConfig, index: int) -> dict[str, tuple[str, ...]]:
    """FUSED for decoder layer `index`: the attention's layers (not those of DeepSeek's latent attention or of
    Qwen3.5's layers), and the MLP's (under the model's MLP name; up_proj alone where it has no gate) where the
    layer has a dense MLP. A
    mixture's experts, router and shared expert take no adapter."""
    plain_attention = config.latent is None and not any(config.linear_layers)
    fused = {layer: parts for layer, parts in FUSED.items() if layer.startswith("self_attn.") and plain_attention}
    if config.mlp_layers[index] and not config.moe_layers[index]:
        mlp = config.mlp_name
        inputs = ("up_proj",) if config.activation in UNGATED else ("gate_proj", "up_proj")
        fused.update({f"{mlp}.gate_up_proj": tuple(f"{mlp}.{name}" for name in inputs),
                      f"{mlp}.down_proj": (f"{mlp}.down_proj",)})
    return fused


def part_shapes(config: ModelConfig, index: int) -> dict[str, tuple[int, int]]:
    """(N, K) of every checkpoint matrix an adapter may reach in decoder layer `index` (layer_fused)."""
    c = config
    q, kv, mlp = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.mlp_name
    width = c.intermediate_size
    shapes = {"self_attn.q_proj": (q, c.hidden_size), "self_attn.k_proj": (kv, c.hidden_size),
              "self_attn.v_proj": (kv, c.hidden_size), "self_attn.o_proj": (c.hidden_size, q),
              f"{mlp}.gate_proj": (width, c.hidden_size), f"{mlp}.up_proj": (width, c.hidden_size),
              f"{mlp}.down_proj": (c.hidden_size, width)}
    reached = {part for parts in layer_fused(config, index).values() for part in parts}
    return {part: shape for part, shape in shapes.items() if part in reached}


def _refuse(folder: Path, what: str) -> UserError:
    return UserError(f"LoRA adapter {folder}: {what}")


def load_adapter(folder: str | Path, config: ModelConfig, max_rank: int | None = None) -> LoRAAdapter:
    """A PEFT LoRA folder (adapter_config.json, adapter_model.safetensors) for this model's layers.
    UserError for what we would otherwise serve wrongly: DoRA, trained biases or extra modules
    (embeddings, the head), per-module ranks, fan_in_fan_out, shapes that do not fit the model, and
    a rank above `max_rank` (the stack's room)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:  # (is_file raises for some paths: a name too long, a folder not readable)
        complete = (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()
    except OSError as e:
        raise _refuse(folder, f"cannot be read ({e.strerror or e})") from None
    if not complete:
        raise _refuse(folder, f"needs {CONFIG_FILE} and {WEIGHTS_FILE} (a PEFT LoRA folder in safetensors)")
    try:
        settings = json.loads((folder / CONFIG_FILE).read_text())
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except Exception as e:  # unreadable, not JSON, not safetensors (SafetensorError is no OSError)
        raise _refuse(folder, f"cannot be read: {e}") from None
    if not isinstance(settings, dict):
        raise _refuse(folder, f"{CONFIG_FILE} holds a JSON {type(settings).__name__}, not an object of settings")
    if settings.get("peft_type", "LORA") != "LORA":
        raise _refuse(folder, f"peft_type {settings['peft_type']} is not LoRA")
    refused_unless = (("use_dora", (False, None)), ("bias", ("none", None)), ("modules_to_save", (None, [])),
                      ("fan_in_fan_out", (False, None)), ("rank_pattern", ({}, None)), ("alpha_pattern", ({}, None)))
    for key, allowed in refused_unless:
        if settings.get(key) not in allowed:
            raise _refuse(folder, f"{key} {settings[key]!r} is not supported")
    alpha, rslora = settings.get("lora_alpha", 8), bool(settings.get("use_rslora"))  # (PEFT's default alpha)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha < math.inf:
        raise _refuse(folder, f"lora_alpha must be a positive number (got {alpha!r})")
    config_rank = settings.get("r", 8)  # (PEFT's default) every pair's rank, and the scale's: alpha / r
    if not isinstance(config_rank, int) or isinstance(config_rank, bool) or config_rank < 1:
        raise _refuse(folder, f"r must be a positive integer (got {config_rank!r})")
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, a in tensors.items():
        if not name.endswith(".lora_A.weight"):
            if not name.endswith(".lora_B.weight"):
                raise _refuse(folder, f"tensor {name} is not a LoRA A or B matrix of a linear layer")
            if name.replace(".lora_B.", ".lora_A.") not in tensors:
                raise _refuse(folder, f"{name.removesuffix('.lora_B.weight')}: B without its A is not a LoRA pair")
            continue
        module = name.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        b = tensors.get(name.replace(".lora_A.", ".lora_B."))
        rank = a.shape[0] if a.dim() == 2 else 0
        if not rank or b is None or b.dim() != 2 or b.shape[1] != rank:
            raise _refuse(folder, f"{module}: A {tuple(a.shape)} and B {None if b is None else tuple(b.shape)} "
                                  "are not a LoRA pair")
        if rank != config_rank:  # (PEFT cannot load it; a rank of its own would scale it otherwise)
            raise _refuse(folder, f"{module}: rank {rank}, where {CONFIG_FILE} says r {config_rank}")
        if max_rank is not None and rank > max_rank:
            raise _refuse(folder, f"rank {rank} is above max_lora_rank {max_rank}")
        scale = alpha / (rank ** 0.5 if rslora else rank)
        parts.update(_model_parts(folder, config, module, a.float(), b.float() * scale))
    if not parts:
        raise _refuse(folder, "holds no LoRA matrices")
    return LoRAAdapter(str(folder), parts)


def _model_parts(folder: Path, config: ModelConfig, module: str, a: torch.Tensor,
                 b: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """An adapter's pair for `module` of the model it was trained on, as pairs for our model's matrices:
    where lcq reads that model as another architecture (lcq.format.views), B's rows are cut, reordered and
    scaled as the view does the weight's (Phi-3's fused q/k/v split, Granite's factors, ERNIE's and
    Helium's reordered query and key rows), which keeps B A the change to the weight lcq runs."""
    viewed = source_parts(config.source_config, f"{module}.weight") if config.source_config else \
        {f"{module}.weight": StoredTensor(f"{module}.weight")}
    if not viewed:
        raise _refuse(folder, f"{module} is not a linear layer of this model's decoder layers")
    pairs = {}
    for name, where in viewed.items():
        part_module = name.removesuffix(".weight")
        layer, _, part = part_module.removeprefix("model.layers.").partition(".")
        if not part_module.startswith("model.layers.") or not layer.isdigit() or int(layer) >= config.num_layers \
                or part not in part_shapes(config, int(layer)):
            raise _refuse(folder, f"{module} is not a linear layer of this model's decoder layers that takes an "
                                  "adapter (a mixture's experts, router and shared expert take none, nor does the "
                                  "attention of DeepSeek's and Qwen3.5's models)")
        n, k = part_shapes(config, int(layer))[part]
        rows = b if where.rows is None else b[where.rows[0]:where.rows[1]]
        if a.shape[1] != k or rows.shape[0] != n:
            raise _refuse(folder, f"{module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit its weight "
                                  f"({n} rows of {k} for {part})")
        pairs[part_module] = (a, where.rearranged(rows).float())
    return pairs


class AdapterStack:
    """`slots` adapters of rank up to `rank` side by side on every fused layer: A (S W, K) and B (N, S W),
    W = rank x the layer's parts (3 for q, k, v). Slot s owns columns s W .. s W + W; part j of a fused
    layer takes columns j rank .. j rank + r of them and, in B, that part's rows. Unused columns hold
    zeros, which add nothing. One product then serves a step whatever mix of slots its rows use.
    Layers no held adapter touches (most, for PEFT's default q and v targets) are skipped in eager steps."""

    def __init__(self, config: ModelConfig, slots: int, rank: int, device: torch.device, dtype: torch.dtype):
        self.slots, self.rank = slots, rank
        self.layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # fused layer -> A, B, owner
        self.b_rows: dict[str, torch.Tensor] = {}  # on CPU: fused layer -> B transposed (slots W, N)
        # checkpoint matrix name -> (its fused layer, its first column within a slot, its first row in B)
        self.places: dict[str, tuple[str, int, int]] = {}
        for index in range(config.num_layers):
            shapes = part_shapes(config, index)
            for fused, members in layer_fused(config, index).items():
                layer = f"model.layers.{index}.{fused}"
                rows = 0
                for part, member in enumerate(members):
                    self.places[f"model.layers.{index}.{member}"] = (layer, part * rank, rows)
                    rows += shapes[member][0]
                width = rank * len(members)
                a = torch.zeros(slots * width, shapes[members[0]][1], device=device, dtype=dtype)
                b = torch.zeros(rows, slots * width, device=device, dtype=dtype)
                owner = torch.arange(slots, device=device).repeat_interleave(width)  # each column's slot
                self.layers[layer] = (a, b, owner)
                if device.type == "cpu":  # B's transpose, row by row what the one-call C decode step reads
                    self.b_rows[layer] = torch.zeros(slots * width, rows, dtype=dtype)
        self.held: dict[int, set[str]] = {}  # slot -> the fused layers its adapter has matrices in
        self.holders: dict[str, int] = dict.fromkeys(self.layers, 0)  # fused layer -> slots with matrices there
        # holders > 0 per decoder layer and fused layer in FUSED's order, 0 where a layer has none (the C step's)
        self.active = torch.zeros(config.num_layers, len(FUSED), dtype=torch.uint8)

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copy the adapter into `slot` (zeros where it has nothing); load_adapter checked its rank."""
        self.clear(slot)
        self.held[slot] = {self.places[module][0] for module in adapter.parts}
        for layer in self.held[slot]:
            self.holders[layer] += 1
        self._update_active()
        for module, (a, b) in adapter.parts.items():
            layer, column, row = self.places[module]
            a_all, b_all, _ = self.layers[layer]
            first = slot * (a_all.shape[0] // self.slots) + column
            a_all[first:first + a.shape[0]].copy_(a)
            b_all[row:row + b.shape[0], first:first + a.shape[0]].copy_(b)
            if layer in self.b_rows:
                self.b_rows[layer][first:first + a.shape[0], row:row + b.shape[0]].copy_(b.t())

    def clear(self, slot: int) -> None:
        for layer in self.held.pop(slot, ()):
            self.holders[layer] -= 1
        self._update_active()
        for layer, (a_all, b_all, _) in self.layers.items():
            width = a_all.shape[0] // self.slots
            a_all[slot * width:(slot + 1) * width].zero_()
            b_all[:, slot * width:(slot + 1) * width].zero_()
            if layer in self.b_rows:
                self.b_rows[layer][slot * width:(slot + 1) * width].zero_()

    def _update_active(self) -> None:
        for layer, count in self.holders.items():
            self.active[fused_place(layer)] = int(count > 0)


def fused_place(layer: str) -> tuple[int, int]:
    """(decoder layer, position in FUSED) of a fused layer's name: model.layers.{i}.{module}.{name}, whose MLP
    module may have the model's own name (feed_forward, ...)."""
    index, _, module = layer.removeprefix("model.layers.").partition(".")
    kinds = [name.rpartition(".")[2] for name in FUSED]
    return int(index), kinds.index(module.rpartition(".")[2])


@dataclass
class LoRABatch:
    """A step's adapters: `slots` (rows,) int64 holds each row's slot in the stack, -1 for rows of the base
    model. `every_layer`: products on layers no adapter holds too, as a CUDA graph must, so that adapters
    loaded after its capture take effect."""

    stack: AdapterStack
    slots: torch.Tensor
    every_layer: bool = False

    def add(self, layer: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (rows, N) = x @ W^T of fused layer `layer`, plus each row's adapter product (in place): x times
        every slot's A, the columns of other slots zeroed per row, times every B; y itself for a layer no
        adapter may reach (the attention of the families with recurrent layers)."""
        if layer not in self.stack.layers or not (self.every_layer or self.stack.holders[layer]):
            return y
        a, b, owner = self.stack.layers[layer]
        low_rank = (x @ a.t()).mul_(self.slots.unsqueeze(1) == owner)
        return y.addmm_(low_rank, b.t())
