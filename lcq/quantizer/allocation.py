"""Each decoder layer's width chosen for a budget of bits per weight (`--target-bits`).

Widening a layer costs a known number of stored bits (lcq.format.stored_bytes) and lowers the model's
loss by an amount estimated before anything is tuned. Per token t, a block whose output moves from
y_t to y'_t changes the token's next-token loss by about g_t . (y'_t - y_t), g_t the loss gradient at
the block's output; to second order the expected loss grows by half the sum of their squares (the
empirical Fisher of the block's output, per token). One backward pass of the full-precision model
over calibration windows, streamed block by block like the rest of the quantizer, gives every
block's g; each unit of layers that share a width is then fitted at each width (the codebooks the
block-wise stage starts from) and its block run once with the fit in place. The block is run whole,
so what a layer's error does inside it (through attention's softmax for q/k) is measured, not
assumed. The diagonal Fisher of the weights, which drops the interplay of different weights' errors,
ranked SmolLM2-135M's layer-0 o_proj at 2 bits 3x above its q/k/v, where quantizing each alone (the
rest in full precision) raised the calibration loss 4.8x less for o_proj; this estimate ranks them
the right way (65 against 230, measured 19 against 93).

The estimates of different blocks add up (to that order), so the choice is a knapsack solved
greedily: every unit starts at --bits, and the unit whose next bit buys the largest estimated loss
drop per stored byte is widened, one bit at a time, while the budget lasts.
"""
from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from typing import Callable

import torch

from lcq.errors import UserError
from lcq.format import SUPPORTED_BITS, CheckpointReader, stored_bytes

from .blockwise import BlockCall, block_call, run_block
from .layer_bits import ALIASES, PROJECTIONS, block_linears

# Projections that must share a width, each under the --layer-bits name that sets them together; in a
# mixture of experts a unit holds every expert's matrices of its projections (a rule covers them all).
UNITS = {"qkv": ALIASES["qkv"], "o_proj": ALIASES["o_proj"], "gate_up": ("gate_proj", "up_proj"),
         "down_proj": ("down_proj",)}
WEIGHING_WINDOWS = 16  # calibration windows of the backward pass; every block's input is held for them
WIDEST = max(SUPPORTED_BITS)


def unit_of(linear: str) -> str:
    """The unit of a block's linear layer, by its projection (its name's last part)."""
    projection = linear.rsplit(".", 1)[-1]
    return next(unit for unit, projections in UNITS.items() if projection in projections)


@dataclass
class Unit:
    """Layers of one decoder layer that share a width, with their stored bytes and estimated loss increase
    at each width from --bits up."""

    layer: int
    name: str  # a key of UNITS
    stored: dict[int, int]
    loss: dict[int, float]

    def rule(self, bits: int) -> str:
        return f"{self.name}@{self.layer}={bits}"


def linear_shapes(reader: CheckpointReader, num_layers: int) -> dict[tuple[int, str], tuple[int, int]]:
    """(out_features, in_features) of every decoder linear layer that is packed (a mixture's: each expert's),
    by (layer, name within it), from the files' headers."""
    pattern = re.compile(r"model\.layers\.(\d+)\.(.+\.(?:" + "|".join(PROJECTIONS) + r"))\.weight")
    found = (pattern.fullmatch(name) for name in reader.names())
    return {(int(match[1]), match[2]): reader.shape(match[0]) for match in found
            if match and int(match[1]) < num_layers}


def unit_bytes(shapes: dict[tuple[int, str], tuple[int, int]], layer: int, name: str, bits: int, rank: int,
               group_size: int) -> int:
    """Stored bytes of a unit's layers at `bits` (each is stored as its own matrix)."""
    return sum(stored_bytes(*shape, bits, rank, group_size) for (index, linear), shape in shapes.items()
               if index == layer and unit_of(linear) == name)


def bits_per_weight_range(shapes: dict[tuple[int, str], tuple[int, int]], bits: int, rank: int,
                          group_size: int) -> tuple[float, float]:
    """The decoder's stored bits per weight with every layer at `bits`, and with every layer at the widest."""
    weights = sum(n * k for n, k in shapes.values())
    return tuple(8 * sum(stored_bytes(n, k, width, rank, group_size) for n, k in shapes.values()) / weights
                 for width in (bits, WIDEST))


def check_target(shapes: dict[tuple[int, str], tuple[int, int]], target: float, bits: int, rank: int,
                 group_size: int) -> None:
    """Refuse a budget below every layer at --bits, or at or above every layer at the widest."""
    low, high = bits_per_weight_range(shapes, bits, rank, group_size)
    if not low <= target < high:
        raise UserError(f"--target-bits {target}: at rank {rank} and group size {group_size} this model stores "
                        f"{low:.3f} bits per weight with every layer at --bits {bits} and {high:.3f} with every layer "
                        f"at {WIDEST}; choose a target in that range, below {high:.3f} (or --bits {WIDEST})")


def choose_widths(units: list[Unit], bits: int, budget_bytes: float) -> dict[tuple[int, str], int]:
    """(layer, unit name) -> width: the greedy knapsack of the module docstring. A step that no longer fits is
    skipped, not the end: a smaller unit's may still fit."""
    widths = {(u.layer, u.name): bits for u in units}

    def step(index: int, width: int) -> tuple[float, int, int]:
        u = units[index]
        return -(u.loss[width] - u.loss[width + 1]) / (u.stored[width + 1] - u.stored[width]), index, width

    heap = [step(i, bits) for i in range(len(units)) if bits < WIDEST]
    heapq.heapify(heap)
    spent = 0
    while heap:
        gain, index, width = heapq.heappop(heap)
        u = units[index]
        cost = u.stored[width + 1] - u.stored[width]
        if gain >= 0 or spent + cost > budget_bytes:  # gain is the negated drop: >= 0 buys nothing
            continue
        spent += cost
        widths[u.layer, u.name] = width + 1
        if width + 1 < WIDEST:
            heapq.heappush(heap, step(index, width + 1))
    return widths


def describe_widths(rules: list[str], bits: int) -> str:
    """The chosen rules in a line: each unit and width with its layers, e.g. "qkv=3 in layers 0-3, 7"."""
    layers: dict[str, list[int]] = {}
    for rule in rules:
        unit, rest = rule.split("@")
        layer, width = rest.split("=")
        layers.setdefault(f"{unit}={width}", []).append(int(layer))
    if not layers:
        return f"every layer at {bits} bits"
    return "; ".join(f"{unit} in layers {_ranges(sorted(found))}" for unit, found in layers.items()) + \
        f"; the rest at {bits} bits"


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def weigh_blocks(source, tokens: torch.Tensor, head: torch.Tensor, batch: int,
                 on_block: Callable[["BlockGradient"], None]) -> None:
    """The full-precision model forward over `tokens` (S, T), block by block, holding each block's input;
    the next-token loss (summed) at the top; then back down block by block, each recomputed with its
    gradient, handing on_block each block with its inputs, outputs and the loss gradient at its output.
    `source`: the model read block by block (source.SourceModel)."""
    hidden = source.embed(tokens)
    inputs = []
    for index in range(source.num_layers):
        inputs.append(hidden)
        hidden = run_block(block_call(source.block(index), source.block_inputs(index)), {}, hidden, batch)
    grad = _head_gradient(source, hidden, tokens.to(hidden.device), head)
    for index in reversed(range(source.num_layers)):
        block = source.block(index).requires_grad_(False)
        call = block_call(block, source.block_inputs(index))
        importance, grad_in = _block_backward(call, block, inputs[index], grad, batch)
        on_block(BlockGradient(index, block, call, inputs[index], hidden, grad, importance, batch))
        hidden, grad = inputs.pop(), grad_in


@dataclass
class BlockGradient:
    """One decoder block of the full-precision model over the weighing windows: its inputs and outputs
    (S, T, H), the loss gradient at its outputs, and each linear layer's mean x_k^2 (its fits' weights)."""

    index: int
    block: torch.nn.Module
    call: BlockCall
    inputs: torch.Tensor
    outputs: torch.Tensor
    grad: torch.Tensor
    importance: dict[str, torch.Tensor]
    batch: int

    @torch.no_grad()
    def loss_increase(self, weights: dict[str, torch.Tensor]) -> float:
        """The estimated next-token loss increase with some of the block's weights replaced: per token, the
        first-order change of its loss is g_t . (y'_t - y_t) at the block's output; the increase is half
        their sum of squares (the empirical Fisher of the block's output, per token, with no term dropped)."""
        total = 0.0
        for start in range(0, self.inputs.shape[0], self.batch):
            rows = slice(start, start + self.batch)
            change = self.call(weights, self.inputs[rows]) - self.outputs[rows]
            total += float((self.grad[rows] * change).sum(-1).pow(2).sum())
        return total / 2


def _head_gradient(source, hidden: torch.Tensor, tokens: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """d(summed next-token cross-entropy)/d(last hidden states), one window at a time (the logits of a
    large vocabulary are the biggest tensor here)."""
    grads = []
    for window, ids in zip(hidden, tokens):
        h = window.unsqueeze(0).clone().requires_grad_()
        logits = source.final_norm(h)[0, :-1] @ head.t()
        torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").backward()
        grads.append(h.grad)
    return torch.cat(grads)


def _block_backward(call: BlockCall, block: torch.nn.Module, inputs: torch.Tensor, grad_out: torch.Tensor,
                    batch: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each linear layer's mean x_k^2 over the block's inputs, and the loss gradient at the block's input."""
    linears = block_linears(block)
    importance: dict[str, torch.Tensor] = {}

    def hook(module, args, output, name):
        importance[name] = importance.get(name, 0) + args[0].detach().flatten(0, -2).pow(2).sum(0)
    hooks = [block.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
             for name in linears]
    grads_in = []
    try:
        for start in range(0, inputs.shape[0], batch):
            x = inputs[start:start + batch].clone().requires_grad_()
            call({}, x).backward(grad_out[start:start + batch])
            grads_in.append(x.grad)
    finally:
        for h in hooks:
            h.remove()
    tokens = inputs.shape[0] * inputs.shape[1]
    return {name: total / tokens for name, total in importance.items()}, torch.cat(grads_in)
