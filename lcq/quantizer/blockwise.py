"""The block-wise stage of LCQ: learn S, V and B of every linear layer of one decoder block by
gradient descent on the block's output error.

The block with quantized weights sees the output of the already-quantized previous blocks; its
target is the full-precision block's output. The nearest-entry assignment is recomputed in every
forward pass, so the gradient reaches exactly the codebook entries in use.

The error is measured per token relative to the token's size (block_error): everything that reads
the residual stream reads it through an RMSNorm, and a plain MSE is ruled by the attention-sink
token, whose hidden state in SmolLM2-135M is about 25,000 in norm against a median of 150 (99% of
the squared norm of a calibration batch from block 15 on). For the same reason the quantizer weighs
its hidden units by how strongly those norms scale them (`units`; --block-error norm-weighted, the
default): an RMSNorm multiplies unit c by its weight w_c, so an error in c reaches every reader w_c
times as large. Gemma-3-270M's readers weigh their units from 0.004 to 15 (in w^2), and there the
weighting took W2 r2 e10 from 3.12x to 2.37x of fp16 perplexity; SmolLM2-135M's (0.5 to 2.2) moved
nothing beyond noise.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.func import functional_call

from .fit import Codebook, assign, dense_weight

BlockCall = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


@dataclass
class LayerFit:
    """One linear layer being learned: its full-precision weight grouped (N, G, g) and its codebook."""

    name: str
    wg: torch.Tensor
    in_features: int
    book: Codebook

    def weight(self) -> torch.Tensor:
        """The dense (N, K) weight the current codebook gives, differentiable in S, V and B."""
        values = self.book.values()
        return dense_weight(values, assign(self.wg, values.detach()), self.in_features)


def block_call(block: torch.nn.Module, inputs: Callable[[torch.Tensor], dict]) -> BlockCall:
    """f(weights, hidden) running the transformers decoder block with some weights replaced; inputs(hidden)
    gives the block's other arguments (rotary cos and sin, an attention mask where it needs one). A block
    that returns a tuple (Bamba's, as Jamba's) gives its hidden states first."""

    def call(weights: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        out = functional_call(block, weights, (hidden,), inputs(hidden), strict=False)
        return out[0] if isinstance(out, tuple) else out

    return call


def block_error(outputs: torch.Tensor, targets: torch.Tensor, units: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of |output - target|^2 / |target|^2, each hidden unit's square weighted by
    `units` (H,) where given."""
    error, size = (outputs - targets).pow(2), targets.pow(2)
    if units is not None:
        error, size = error * units, size * units
    return (error.sum(-1) / size.sum(-1).clamp_min(1e-12)).mean()


@torch.no_grad()
def run_block(call: BlockCall, weights: dict[str, torch.Tensor], inputs: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([call(weights, inputs[i:i + batch]) for i in range(0, inputs.shape[0], batch)])


def _loss(call: BlockCall, fits: list[LayerFit], inputs: torch.Tensor, targets: torch.Tensor, batch: int,
          units: torch.Tensor | None) -> float:
    with torch.no_grad():
        weights = {f"{f.name}.weight": f.weight() for f in fits}
        outputs = run_block(call, weights, inputs, batch)
        return float(block_error(outputs, targets, units))


@contextlib.contextmanager
def tf32_products(device: str, enabled: bool = True) -> Iterator[None]:
    """A tuning stage's fp32 matrix products in TF32 on a CUDA device (inputs rounded to 10-bit mantissas, sums in
    fp32): its steps are nearly all products (71% of a block's step on CPU, torch's profiler), which tensor cores run
    several times as fast in TF32 as the GPU runs fp32 (an H100: ~495 against ~67 dense TFLOPS; not yet timed here).
    Emulated on CPU (bench/tf32_quality.py), SmolLM2's perplexity after 10 block-wise epochs moved by -0.2% at W4 and
    +1.1% at W2, inside what the fp32 rounding of two CPUs' kernels moves it by (0.8% and 1.7%: docs/quality.md), and
    not at all at W2 after the end-to-end stage too.
    Elsewhere, or not enabled (--no-tf32), products stay fp32."""
    if not enabled or torch.device(device).type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _each(lr: float | Sequence[float], count: int) -> list[float]:
    """One step per item: `lr` for all, or `lr` as given, one per item."""
    return [lr] * count if isinstance(lr, (int, float)) else list(lr)


def adam_epochs(tensors: list[torch.Tensor], step_loss: Callable[[torch.Tensor], torch.Tensor], samples: int,
                epochs: int, lr: float | Sequence[float], batch: int, seed: int,
                on_step: Callable[[float], None] | None, after_epoch: Callable[[], None] | None = None) -> None:
    """Adam on `tensors` in place over `epochs` shuffled passes of `samples` in batches, cosine schedule;
    step_loss(rows) is a batch's loss, after_epoch() is called at the end of each pass. Each tensor's step
    is lr (one for all, or one per tensor) times its mean magnitude: Adam steps are about lr in size, and
    S, B, V (and norm weights) live on very different scales."""
    for tensor in tensors:
        tensor.requires_grad_(True)
    optimizer = torch.optim.Adam([{"params": [t], "lr": rate * float(t.detach().abs().mean().clamp_min(1e-8))}
                                  for t, rate in zip(tensors, _each(lr, len(tensors)), strict=True)])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * -(-samples // batch))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(samples, generator=generator).to(tensors[0].device)
        for i in range(0, samples, batch):
            loss = step_loss(order[i:i + batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if on_step is not None:
                on_step(loss.item())
        if after_epoch is not None:
            with torch.no_grad():
                after_epoch()
    for tensor in tensors:
        tensor.requires_grad_(False)


def optimize_block(call: BlockCall, fits: list[LayerFit], inputs: torch.Tensor, targets: torch.Tensor,
                   epochs: int, lr: float | Sequence[float], batch: int = 4, seed: int = 0,
                   on_step: Callable[[float], None] | None = None,
                   held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
                   units: torch.Tensor | None = None) -> tuple[float, float]:
    """Adam on every layer's S, V, B (adam_epochs; `lr`: one step, or one per layer of `fits`, since the
    step that suits a layer depends on its width). The codebooks kept are the best seen: with
    `held_out` (inputs, targets) windows, those of the epoch (0: the start) with the lowest error on
    them, scored after every epoch; without, the start or the end, scored on the training windows.
    Returns the score (error, its hidden units weighted by `units` if given) at the start and of the
    codebooks kept.

    Why held-out windows: with a few thousand calibration tokens the stage fits the windows themselves.
    On Gemma-3-270M at W4 (16 windows of 256 tokens) it lowered the training error of every block by
    3-50%, while the error on 16 other windows of the same book rose by 10% in one block and fell by
    under 5% in twelve of the 18."""
    score_inputs, score_targets = held_out if held_out is not None else (inputs, targets)

    def score() -> float:
        return _loss(call, fits, score_inputs, score_targets, batch, units)

    def snapshot() -> list[Codebook]:
        return [f.book.copy() for f in fits]

    before = best = score()
    if epochs <= 0:
        return before, before
    kept = snapshot()

    def keep_if_best() -> None:
        nonlocal best, kept
        loss = score()
        if loss < best:
            best, kept = loss, snapshot()

    def step_loss(rows: torch.Tensor) -> torch.Tensor:
        weights = {f"{f.name}.weight": f.weight() for f in fits}
        return block_error(call(weights, inputs[rows]), targets[rows], units)

    adam_epochs([t for f in fits for t in (f.book.s, f.book.v, f.book.b)], step_loss, inputs.shape[0], epochs,
                [rate for rate in _each(lr, len(fits)) for _ in range(3)], batch, seed, on_step,
                keep_if_best if held_out is not None else None)
    if held_out is None:
        keep_if_best()
    for f, book in zip(fits, kept):
        f.book = book
    return before, best
