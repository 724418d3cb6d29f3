"""Per-layer bit widths (`--layer-bits`): some of the decoder's linear layers at another width than
`--bits`, as llama.cpp's K-quant mixes give attn_v and ffn_down more bits than the rest.

A rule is NAME[@FIRST[-LAST]]=BITS: the projection NAME (a Hugging Face name such as down_proj, or
qkv, gate_up, all) in decoder layers FIRST to LAST (every layer without @), at BITS. Later rules win.
The runtime fuses q/k/v and gate/up into one product each, so their parts must share a width. In a
mixture of experts, a rule on an MLP projection covers every expert's matrix of that name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from lcq.errors import UserError
from lcq.format import SUPPORTED_BITS

# DeepSeek's latent attention (MLA) reads its input through these beside q_proj (kv_b_proj, which the runtime
# multiplies in full precision by head, stays so)
LATENT_INPUTS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa")
# Qwen3.5's linear attention (under linear_attn): its input projections, run as one product, and its output's
# (out_proj: Mamba-2's too, whose input projection is in_proj)
LINEAR_INPUTS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
PROJECTIONS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               **dict.fromkeys(LATENT_INPUTS, "self_attn"),
               **dict.fromkeys((*LINEAR_INPUTS, "out_proj"), "linear_attn"), "in_proj": "mamba",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), LINEAR_INPUTS)
# qkv: the attention's input projections (a latent attention's run one by one, but are named together; Mamba-2's
# and LFM2's convolutions' in_proj); o_proj: its output projection, the recurrent layers' out_proj too
ALIASES = {"qkv": FUSED[0] + LATENT_INPUTS + LINEAR_INPUTS + ("in_proj",), "o_proj": ("o_proj", "out_proj"),
           "gate_up": FUSED[1],
           "all": tuple(PROJECTIONS)}
# a Llama layer's packed linears
DENSE_LINEARS = tuple(f"{PROJECTIONS[p]}.{p}" for p in PROJECTIONS if PROJECTIONS[p] not in ("linear_attn", "mamba")
                      and p not in LATENT_INPUTS)
_RULE = re.compile(r"(?P<name>\w+)(@(?P<first>\d+)(-(?P<last>\d+))?)?=(?P<bits>\d+)")


def block_linears(block: torch.nn.Module) -> list[str]:
    """The matrices of a decoder block that are packed, by module name: the attention's four and the MLP's
    three, or each expert's three (a mixture's router stays in full precision)."""
    return [name for name, module in block.named_modules()
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS]


@dataclass(frozen=True)
class WidthRule:
    projections: tuple[str, ...]
    first: int  # decoder layers first..last (inclusive); last None: every layer
    last: int | None
    bits: int

    def covers(self, layer: int) -> bool:
        return self.first <= layer and (self.last is None or layer <= self.last)


def parse_rule(spec: str) -> WidthRule:
    """One rule from its text, or a UserError saying what a rule looks like."""
    match = _RULE.fullmatch(spec.strip())
    names = ", ".join([*PROJECTIONS, *ALIASES])
    if match is None:
        raise UserError(f"--layer-bits {spec!r}: expected NAME[@FIRST[-LAST]]=BITS, NAME one of {names}")
    name, bits = match["name"], int(match["bits"])
    if name not in PROJECTIONS and name not in ALIASES:
        raise UserError(f"--layer-bits {spec!r}: unknown projection {name!r} (one of {names})")
    if bits not in SUPPORTED_BITS:
        raise UserError(f"--layer-bits {spec!r}: bits must be 2, 3 or 4")
    if match["first"] is None:
        return WidthRule(ALIASES.get(name, (name,)), 0, None, bits)
    first = int(match["first"])
    last = first if match["last"] is None else int(match["last"])
    if last < first:
        raise UserError(f"--layer-bits {spec!r}: the last layer comes before the first")
    return WidthRule(ALIASES.get(name, (name,)), first, last, bits)


class LayerWidths:
    """The width of each decoder linear layer: `bits`, unless a rule says otherwise."""

    def __init__(self, bits: int, specs: list[str]):
        self.bits = bits
        self.rules = [parse_rule(part) for spec in specs for part in spec.split(",") if part.strip()]
        # Past the highest layer any rule names, every layer is alike: checking one more covers them all.
        named = [rule.last for rule in self.rules if rule.last is not None]
        for layer in range(max(named, default=0) + 2):
            self._check_fused(layer)

    def of(self, layer: int, linear: str) -> int:
        """The width of `linear` (e.g. "mlp.down_proj") in decoder layer `layer`."""
        projection = linear.rsplit(".", 1)[-1]
        widths = [rule.bits for rule in self.rules if projection in rule.projections and rule.covers(layer)]
        return widths[-1] if widths else self.bits

    def check_layers(self, num_layers: int, projections: set[str]) -> None:
        """Refuse rules naming layers or projections the model does not have (a typo would otherwise do
        nothing); `projections`: the names of the model's packed linears (down_proj, ...)."""
        for rule in self.rules:
            if rule.last is not None and rule.last >= num_layers:
                raise UserError(f"--layer-bits: layer {rule.last} does not exist "
                                f"(the model has {num_layers} layers, 0 to {num_layers - 1})")
            if projections and not projections & set(rule.projections):
                raise UserError(f"--layer-bits: the model has no {', '.join(rule.projections)} (its packed "
                                f"projections: {', '.join(sorted(projections))})")

    def overrides(self, num_layers: int, layer_linears: Callable[[int], Iterable[str]] = lambda _: DENSE_LINEARS
                  ) -> dict[str, int]:
        """Full module name -> width, for every layer whose width is not `bits` (quantization_config.layer_bits);
        layer_linears: a decoder layer's packed linears by name within it (a mixture's: each expert's)."""
        widths = {f"model.layers.{layer}.{name}": self.of(layer, name)
                  for layer in range(num_layers) for name in layer_linears(layer)}
        return {name: bits for name, bits in widths.items() if bits != self.bits}

    def _check_fused(self, layer: int) -> None:
        for parts in FUSED:
            widths = [self.of(layer, p) for p in parts]
            if len(set(widths)) > 1:
                alias = next(a for a, members in ALIASES.items() if set(parts) <= set(members))
                raise UserError(f"--layer-bits: {', '.join(parts)} run as one fused product and need one width "
                                f"(layer {layer}: {', '.join(map(str, widths))}); set {alias}=BITS instead")
