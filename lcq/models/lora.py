"""LoRA adapters (PEFT folders) served over the base model's LCQ or dense layers.

An adapter adds scale * B (A x) to some linear layers: A (r, K), B (N, r). The base weights stay
as they are, packed or dense, so many adapters share one 2-bit base, as QLoRA fine-tunes are
meant to run. Our layers fuse q/k/v and gate/up along N; an adapter's matrices for the parts of
one fused layer are joined the same way: their A rows stacked, their B placed block-diagonally
at each part's rows (a part the adapter leaves out contributes nothing).

A step may mix sequences of several adapters and of none: AdapterStack holds all adapters side by
side, LoRABatch says which one each row of the flattened batch uses, and each layer adds, per row,
its adapter's product (the others' masked out).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lcq.errors import UserError

from .config import ModelConfig

WEIGHTS_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
# Our fused layers (their key under model.layers.{i}) and the checkpoint matrices they join, in order.
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "self_attn.o_proj": ("self_attn.o_proj",),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
         "mlp.down_proj": ("mlp.down_proj",)}

Adapter = dict[str, tuple[torch.Tensor, torch.Tensor]]  # fused layer name -> (A (R, K), scale * B (N, R))


def part_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(N, K) of every checkpoint matrix of one decoder layer."""
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return {"self_attn.q_proj": (q, c.hidden_size), "self_attn.k_proj": (kv, c.hidden_size),
            "self_attn.v_proj": (kv, c.hidden_size), "self_attn.o_proj": (c.hidden_size, q),
            "mlp.gate_proj": (c.intermediate_size, c.hidden_size), "mlp.up_proj": (c.intermediate_size, c.hidden_size),
            "mlp.down_proj": (c.hidden_size, c.intermediate_size)}


def _refuse(folder: Path, what: str) -> UserError:
    return UserError(f"LoRA adapter {folder}: {what}")


def load_adapter(folder: str | Path, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> Adapter:
    """A PEFT LoRA folder (adapter_config.json, adapter_model.safetensors) for our fused layers.
    UserError for what we would otherwise serve wrongly: DoRA, trained biases or extra modules
    (embeddings, the head), per-module ranks, fan_in_fan_out, shapes that do not fit the model."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise _refuse(folder, f"needs {CONFIG_FILE} and {WEIGHTS_FILE} (a PEFT LoRA folder in safetensors)")
    settings = json.loads((folder / CONFIG_FILE).read_text())
    if settings.get("peft_type", "LORA") != "LORA":
        raise _refuse(folder, f"peft_type {settings['peft_type']} is not LoRA")
    refused_unless = (("use_dora", (False, None)), ("bias", ("none", None)), ("modules_to_save", (None, [])),
                      ("fan_in_fan_out", (False, None)), ("rank_pattern", ({}, None)), ("alpha_pattern", ({}, None)))
    for key, allowed in refused_unless:
        if settings.get(key) not in allowed:
            raise _refuse(folder, f"{key} {settings[key]!r} is not supported")
    alpha, rslora = settings.get("lora_alpha", settings.get("r", 8)), bool(settings.get("use_rslora"))
    shapes = part_shapes(config)
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # checkpoint matrix name -> (A, scale * B)
    tensors = load_file(str(folder / WEIGHTS_FILE))
    for name, a in tensors.items():
        if not name.endswith(".lora_A.weight"):
            if not name.endswith(".lora_B.weight"):
                raise _refuse(folder, f"tensor {name} is not a LoRA A or B matrix of a linear layer")
            continue
        module = name.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        b = tensors.get(name.replace(".lora_A.", ".lora_B."))
        layer, _, part = module.removeprefix("model.layers.").partition(".")
        if not module.startswith("model.layers.") or part not in shapes or not layer.isdigit() \
                or int(layer) >= config.num_layers:
            raise _refuse(folder, f"{module} is not a linear layer of this model's decoder layers")
        n, k = shapes[part]
        rank = a.shape[0]
        if b is None or a.shape != (rank, k) or b.shape != (n, rank):
            raise _refuse(folder, f"{module}: A {tuple(a.shape)} and B {None if b is None else tuple(b.shape)} "
                                  f"do not fit its ({n}, {k}) weight")
        scale = alpha / (rank ** 0.5 if rslora else rank)
        parts[module] = (a.float(), b.float() * scale)
    if not parts:
        raise _refuse(folder, "holds no LoRA matrices")
    adapter: Adapter = {}
    for index in range(config.num_layers):
        for fused, members in FUSED.items():
            names = [f"model.layers.{index}.{m}" for m in members]
            if not any(n in parts for n in names):
                continue
            a_rows, b_blocks = [], []
            rank_total = sum(parts[n][0].shape[0] for n in names if n in parts)
            offset = 0
            for n, member in zip(names, members):
                rows = shapes[member][0]
                block = torch.zeros(rows, rank_total)
                if n in parts:
                    a, b = parts[n]
                    a_rows.append(a)
                    block[:, offset:offset + a.shape[0]] = b
                    offset += a.shape[0]
                b_blocks.append(block)
            adapter[f"model.layers.{index}.{fused}"] = (torch.cat(a_rows).to(device, dtype),
                                                       torch.cat(b_blocks).to(device, dtype))
    return adapter


class AdapterStack:
    """Every served adapter's matrices of each fused layer side by side: A (S R, K) and B (N, S R), adapter s
    in columns s R .. s R + R (R: the largest rank any of them has there, the rest zero). One product
    then serves a step whatever mix of adapters its rows use, and the step's shapes do not depend on
    that mix, so CUDA graphs capture it."""

    def __init__(self, adapters: list[Adapter]):
        self.count = len(adapters)
        self.layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for layer in dict.fromkeys(key for adapter in adapters for key in adapter):
            present = [adapter[layer] for adapter in adapters if layer in adapter]
            rank, (a0, b0) = max(a.shape[0] for a, _ in present), present[0]
            a_all = a0.new_zeros(self.count * rank, a0.shape[1])
            b_all = b0.new_zeros(b0.shape[0], self.count * rank)
            for index, adapter in enumerate(adapters):
                if layer in adapter:
                    a, b = adapter[layer]
                    a_all[index * rank:index * rank + a.shape[0]] = a
                    b_all[:, index * rank:index * rank + b.shape[1]] = b
            owner = torch.arange(self.count, device=a0.device).repeat_interleave(rank)  # each column's adapter
            self.layers[layer] = (a_all, b_all, owner)


@dataclass
class LoRABatch:
    """A step's adapters: `slots` (rows,) int64 holds each row's adapter index in the stack, -1 for rows of
    the base model."""

    stack: AdapterStack
    slots: torch.Tensor

    def add(self, layer: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (rows, N) = x @ W^T of fused layer `layer`, plus each row's adapter product (in place): x times
        every adapter's A, the columns of other adapters zeroed per row, times every B."""
        weights = self.stack.layers.get(layer)
        if weights is None:
            return y
        a, b, owner = weights
        low_rank = (x @ a.t()).mul_(self.slots.unsqueeze(1) == owner)
        return y.addmm_(low_rank, b.t())
