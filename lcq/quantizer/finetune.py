"""The end-to-end stage of LCQ: once every block is packed, tune every layer's S, V and B (indices
fixed) and the blocks' RMSNorm weights on the KL divergence from the full-precision model's
next-token distributions to the quantized model's, over the calibration windows.

The block-wise stage fits each block to its full-precision output on its own; errors that are small
per block still add up over the blocks, and only the model's output says which of them matter. The
codebooks move under the indices (as AQLM's global fine-tuning does), and S and B go back through the
dual quantization at the end. The indices stay as packed unless --finetune-index-updates asks for
discrete steps between epochs too (move_indices, after PV-tuning): the block-wise stage chose each
weight's entry as the one nearest its full-precision value, and only the model's output can say that
a neighbouring entry serves it better. The teacher is the full-precision model's final
hidden state (after its last norm), which the block-wise stage has already computed, so its logits
cost one product with the head per batch and no second model is held.

A packed head gets a stage of its own first (tune_head): the same KL over the quantized model's final
hidden states, with only the head's codebooks moving, which is cheap since no block runs. A head tied to
the embedding table is also the written model's table (token t is the head's row t), so both stages look
tokens up in the head as it is being tuned (put_in_place) wherever the whole model runs: the end-to-end
stage throughout, the head stage to score its epochs (it trains on hidden states the blocks computed from
the full-precision table), so that the KL each reports is the written model's.

Both stages keep the codebooks of the epoch, the start included, with the lowest KL on held-out
calibration windows they never train on (_tune), as the block-wise stage does with its error.

Memory is what limits the end-to-end stage, since it holds the whole model at once: each layer keeps only its
indices as bytes and its codebooks (CodebookProduct rebuilds the dense weight when it needs it), and
each decoder block keeps only its input for the backward pass, recomputing the rest then.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lcq.format import HEAD, PackedLinear, dual_quantize, encode_linear
from lcq.format.codebook import decoded_b, decoded_s
from lcq.format.packing import unpack_indices

from .blockwise import adam_epochs
from .fit import Codebook, dense_weight, stored_codebook


class CodebookProduct(torch.autograd.Function):
    """x W^T (+ bias) for W = dense_weight(values, codes), differentiable in x and the values.

    Autograd through the gathered weight would keep the fp32 weight and int64 indices of every layer
    until the backward pass (12 bytes per weight, ~80 GB for a 7B model); this keeps x and the byte
    indices the layer holds anyway, rebuilds W in backward and folds its gradient into the values.
    Where `weight_sums` is given, the weight's own gradient and curvature are added to it too, for the
    index updates (move_indices)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, codes: torch.Tensor, in_features: int,
                bias: torch.Tensor | None, weight_sums: "WeightSums | None" = None) -> torch.Tensor:
        ctx.save_for_backward(x, values, codes)
        ctx.in_features, ctx.weight_sums = in_features, weight_sums
        return F.linear(x, dense_weight(values, codes, in_features), bias)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, values, codes = ctx.saved_tensors
        grad_x = grad_y @ dense_weight(values, codes, ctx.in_features)
        grad_w = grad_y.flatten(0, -2).t() @ x.flatten(0, -2)
        grad_w = F.pad(grad_w, (0, codes[0].numel() - ctx.in_features)).view(codes.shape)
        grad_values = torch.zeros_like(values).scatter_add_(2, codes.long(), grad_w)
        if ctx.weight_sums is not None:
            ctx.weight_sums.add(grad_w, grad_y, x)
        return grad_x, grad_values, None, None, None, None


@dataclass
class WeightSums:
    """Per weight (N, G, g), since the indices last moved: the sum of its gradients, and of its
    curvature estimated as the empirical Fisher diagonal, sum over tokens t of (dL/dy[t, n] x[t, k])^2."""

    grad: torch.Tensor
    curvature: torch.Tensor

    @classmethod
    def zeros(cls, shape: torch.Size, device: torch.device) -> "WeightSums":
        return cls(torch.zeros(shape, device=device), torch.zeros(shape, device=device))

    def add(self, grad_w: torch.Tensor, grad_y: torch.Tensor, x: torch.Tensor) -> None:
        """grad_w: the weight's gradient as (N, G, g); grad_y (..., N) and x (..., K): the product's."""
        self.grad.add_(grad_w)
        fisher = grad_y.flatten(0, -2).square().t() @ x.flatten(0, -2).square()
        self.curvature.view(fisher.shape[0], -1)[:, :fisher.shape[1]].add_(fisher)

    def clear(self) -> None:
        self.grad.zero_()
        self.curvature.zero_()


def move_indices(values: torch.Tensor, codes: torch.Tensor, sums: WeightSums, fraction: float) -> torch.Tensor:
    """New indices (N, G, g) for one discrete step: every weight may move to the entry next to its own
    in value order, on the side its summed gradient points down to; of these moves the `fraction` of
    the layer's weights with the largest |gradient| / (curvature * |move|) are made.

    Why that order: with the loss modelled per weight as linear plus its curvature h, a move by d
    lowers it when |gradient| * |d| > h d^2 / 2, that is when |gradient| / (h |d|) > 1 / 2; taking the
    largest of these ratios is choosing the threshold that lets exactly `fraction` of the weights move.
    The curvature matters: on SmolLM2-135M W2 the same step ranked by |gradient| / |d| alone (one
    curvature for all) moved weights of the few input columns with very large activations, and 0.1%
    of each layer's weights took the held-out KL from 1.0 to 5.0. Moves to an entry of the same value,
    and weights without gradient or curvature (padding), are never made."""
    grad, curvature = sums.grad, sums.curvature
    ordered, order = values.sort(dim=-1)
    position = order.argsort(dim=-1).gather(-1, codes.long())
    target = (position - grad.sign().long()).clamp(0, values.shape[-1] - 1)
    distance = (ordered.gather(-1, target) - ordered.gather(-1, position)).abs()
    movable = (distance > 0) & (curvature > 0)
    ratio = torch.where(movable, grad.abs() / (curvature * distance).clamp_min(1e-30), 0.0).flatten()
    count = min(int(fraction * ratio.numel()), int((ratio > 0).sum()))
    moved = codes.clone()
    if count:
        chosen = ratio.topk(count).indices
        moved.view(-1)[chosen] = order.gather(-1, target).view(-1)[chosen].to(codes.dtype)
    return moved


@dataclass
class LayerTuning:
    """One packed layer under tuning: its indices (N, G, g) as bytes, its float codebook and, where its
    indices may move, its weights' gradient and curvature summed since they last did."""

    prefix: str
    layer: PackedLinear
    codes: torch.Tensor
    book: Codebook
    weight_sums: WeightSums | None = None
    # S and B in int8 as dual_quantize gave them (s_q, s_scale, b_q, b_scale), where book holds them decoded: written
    # as they are (dual quantization is not idempotent: decoded and quantized again, rows whose largest code is
    # under 127 get another scale, up to half a step off what was scored)
    quantized: tuple[torch.Tensor, ...] | None = None

    @classmethod
    def start(cls, prefix: str, layer: PackedLinear, device: torch.device) -> "LayerTuning":
        """The codebook exactly as stored (S, B decoded from int8, V from fp16), so tuning starts from
        the packed model. Only the indices and the codebook go to the device; `layer` stays where it was."""
        on_device = layer.to(device)
        n, groups = layer.out_features, layer.num_groups
        codes = unpack_indices(on_device.qweight, layer.bits).reshape(n, groups, layer.group_size).to(torch.uint8)
        book = Codebook(s=decoded_s(on_device).float(), v=on_device.v[0].float(), b=decoded_b(on_device).float())
        return cls(prefix, layer, codes, book,
                   quantized=(on_device.s_q, on_device.s_scale, on_device.b_q, on_device.b_scale))

    def bias(self) -> torch.Tensor | None:
        return None if self.layer.bias is None else self.layer.bias.float().to(self.codes.device)

    def packed(self) -> PackedLinear:
        """The layer with its indices and its codebook now: S and B as quantized where the codebook is their
        decoding (`quantized`), else dual-quantized."""
        decoded = None if self.quantized is None else stored_codebook(self.book, self.quantized)
        as_quantized = decoded is not None and torch.equal(decoded.s, self.book.s.detach()) and \
            torch.equal(decoded.b, self.book.b.detach())
        s_q, s_scale, b_q, b_scale = self.quantized if as_quantized else \
            dual_quantize(self.book.s.detach(), self.book.b.detach())
        indices = self.codes.reshape(self.codes.shape[0], -1)[:, :self.layer.in_features].long()
        return encode_linear(indices, s_q, s_scale, b_q, b_scale, self.book.v.detach(), self.layer.in_features,
                             self.layer.bits, self.layer.group_size, self.bias())


class TunedLinear(torch.nn.Module):
    """Stands in for a packed layer's nn.Linear in the model under tuning."""

    def __init__(self, tuning: LayerTuning):
        super().__init__()
        self.tuning = tuning
        self.bias = tuning.bias()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tuning
        return CodebookProduct.apply(x, t.book.values(), t.codes, t.layer.in_features, self.bias, t.weight_sums)


def put_in_place(model: torch.nn.Module, layers: list[LayerTuning], table: LayerTuning | None = None) -> None:
    """Each layer in the model (a transformers CausalLM) in place of its nn.Linear (TunedLinear); `table`: a
    packed head tied to the embedding table, whose current rows the model then looks tokens up in, as the
    written model does (it stores no other table)."""
    for tuning in layers:
        parent, _, name = tuning.prefix.rpartition(".")
        setattr(model.get_submodule(parent), name, TunedLinear(tuning))
    if table is not None:
        embed = model.model.embed_tokens
        embed.forward = functools.partial(_looked_up, table, getattr(embed, "embed_scale", None))


def _looked_up(table: LayerTuning, scale: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    """The embeddings of `ids`: rows of the packed layer `table` from its current codebooks (differentiable in
    them), times the scale the table's own module applies (Gemma 3's embed_scale)."""
    flat = ids.flatten()
    rows = dense_weight(table.book.values()[flat], table.codes[flat], table.layer.in_features)
    rows = rows.reshape(*ids.shape, rows.shape[-1])
    return rows if scale is None else rows * scale


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student)."""
    student = F.log_softmax(student_logits.float().flatten(0, -2), dim=-1)
    teacher = F.log_softmax(teacher_logits.float().flatten(0, -2), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def _recompute_in_backward(block: torch.nn.Module) -> None:
    """Keep only the block's inputs for the backward pass and run its forward again there."""
    block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


# A loss over a batch of window indices, and how many windows there are.
Windows = tuple[Callable[[torch.Tensor], torch.Tensor], int]


class StageScore(NamedTuple):
    """A tuning stage's mean KL at the start and of the codebooks kept, the epoch they come from (0: the
    start), with held-out windows the KL there after each epoch, and with index updates the fraction
    of the weights moved after each epoch but the last."""

    before: float
    after: float
    epoch: int
    by_epoch: tuple[float, ...] = ()
    moved: tuple[float, ...] = ()


def _model_kl(model: torch.nn.Module, tokens: torch.Tensor, teacher: torch.Tensor, head: torch.Tensor) -> Windows:
    """The KL of the model's logits over windows of `tokens` to the teacher's final hidden states times the
    full-precision `head`."""
    def loss(rows: torch.Tensor) -> torch.Tensor:
        return token_kl(model(tokens[rows], use_cache=False).logits, teacher[rows].float() @ head.t())
    return loss, len(tokens)


def _mean_loss(windows: Windows, batch: int, device: torch.device) -> float:
    """The mean loss over all of `windows`, in batches."""
    loss, samples = windows
    with torch.no_grad():
        sums = [float(loss(torch.arange(i, min(i + batch, samples), device=device))) * min(batch, samples - i)
                for i in range(0, samples, batch)]
    return sum(sums) / samples


def finetune(model: torch.nn.Module, packed: dict[str, PackedLinear], norm_names: list[str],
             tokens: torch.Tensor, teacher: torch.Tensor, head: torch.Tensor, epochs: int, lr: float,
             batch: int = 4, seed: int = 0, on_step: Callable[[float], None] | None = None,
             held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
             width_lr: Callable[[int], float] | None = None, index_updates: float = 0.0, tied: bool = False,
             ) -> tuple[dict[str, PackedLinear], dict[str, torch.Tensor], StageScore]:
    """Adam on every layer's S, V, B and the named norm weights; returns the tuned layers (re-packed),
    the tuned norms and the stage's score (_tune: the best epoch on the `held_out` (tokens, teacher)
    windows, or the start or the end on the training windows). Where the start is kept, `packed` comes
    back as it was and no norms.

    model: the quantized model's transformers CausalLM (fp32) with every tensor but the packed layers'
    loaded, which this turns into the model under tuning (its packed layers become TunedLinear);
    packed: prefix -> layer; tokens (S, T); teacher (S, T, H): the full-precision final hidden states;
    head (V, H): the output embedding. Steps are relative to each tensor's magnitude (adam_epochs), as
    in the block-wise stage: width_lr(bits) for a layer of that width where given, else lr; lr for the
    norms. index_updates > 0: after every epoch but the last, that fraction of each layer's weights move
    to a neighbouring entry (move_indices, on the weights' gradient and curvature summed over the
    epoch) if that lowers the mean KL on the training windows, else a quarter of it, a sixteenth, or
    none; this holds a float32 gradient and curvature per weight (8 bytes) for the stage and costs up
    to four forward passes over the training windows per step. tied: `packed` holds the head, tied to the
    embedding table: the model looks tokens up in the head under tuning (put_in_place).

    Why the check: the step is only as good as its quadratic model of the loss. On SmolLM2-135M W2 r2
    (3 epochs over 64 windows) an unchecked 0.1% per step lowered the held-out KL after the first
    (0.953 -> 0.944 against indices fixed) and raised it after the second (0.971 against 0.945), and
    1% raised it to 1.40."""
    device = head.device
    model.requires_grad_(False)
    layers = [LayerTuning.start(prefix, layer, device) for prefix, layer in packed.items()]
    put_in_place(model, layers, next(t for t in layers if t.prefix == HEAD) if tied else None)
    for block in model.model.layers:
        _recompute_in_backward(block)
    norms = {name: model.get_parameter(name) for name in norm_names}
    if index_updates:
        for tuning in layers:
            tuning.weight_sums = WeightSums.zeros(tuning.codes.shape, device)

    def kl_on(tokens: torch.Tensor, teacher: torch.Tensor) -> Windows:
        return _model_kl(model, tokens, teacher, head)

    step_of = width_lr or (lambda bits: lr)
    steps = [step_of(t.layer.bits) for t in layers for _ in range(3)] + [lr] * len(norms)
    train = kl_on(tokens, teacher)
    moved: list[float] = []

    def move_all_indices() -> None:
        codes = [tuning.codes for tuning in layers]
        current = _mean_loss(train, batch, device)
        for fraction in (index_updates, index_updates / 4, index_updates / 16, 0.0):
            for tuning, start in zip(layers, codes):
                tuning.codes = move_indices(tuning.book.values(), start, tuning.weight_sums, fraction) \
                    if fraction else start
            if not fraction or _mean_loss(train, batch, device) < current:
                break
        moved.append(fraction)
        for tuning in layers:
            tuning.weight_sums.clear()

    score = _tune(layers, list(norms.values()), train, epochs, steps, batch, seed, on_step,
                  None if held_out is None else kl_on(*held_out), move_all_indices if index_updates else None)
    score = score._replace(moved=tuple(moved))
    if score.epoch == 0:
        return packed, {}, score
    return {t.prefix: t.packed() for t in layers}, {name: w.detach() for name, w in norms.items()}, score


class Served(NamedTuple):
    """The quantized model as it will be served, for the head stage of a head tied to the embedding table:
    its transformers CausalLM with every packed layer but the head in place (put_in_place), and the tokens
    of the training and held-out windows whose hidden states the stage is given."""

    model: torch.nn.Module
    tokens: torch.Tensor
    held_out_tokens: torch.Tensor


def tune_head(layer: PackedLinear, hidden: torch.Tensor, teacher: torch.Tensor, head: torch.Tensor, epochs: int,
              lr: float, batch: int = 4, seed: int = 0, on_step: Callable[[float], None] | None = None,
              held_out: tuple[torch.Tensor, torch.Tensor] | None = None, served: Served | None = None,
              ) -> tuple[PackedLinear, StageScore]:
    """The head stage: the packed head's S, V and B (indices fixed) tuned on the KL from the
    full-precision model's next-token distributions to the quantized model's, over its final hidden
    states. The head's output is the logits, so its own reconstruction error says little about what
    matters; this also lets the head make up for the decoder's error. Returns the tuned layer (`layer`
    itself where the start is kept) and the stage's score (_tune, on the `held_out` (hidden, teacher)
    windows where given).

    hidden, teacher (S, T, H): the quantized and full-precision models' final hidden states (after the
    last norm); head (V, H): the full-precision head. served: for a head tied to the embedding table, the
    whole model to score each candidate with (Served), since the head's rows are its inputs too."""
    tuning = LayerTuning.start(HEAD, layer, head.device)
    bias = tuning.bias()

    def kl_on(hidden: torch.Tensor, teacher: torch.Tensor) -> Windows:
        def loss(rows: torch.Tensor) -> torch.Tensor:
            logits = CodebookProduct.apply(hidden[rows].float(), tuning.book.values(), tuning.codes,
                                           layer.in_features, bias)
            return token_kl(logits, teacher[rows].float() @ head.t())
        return loss, len(hidden)

    held, scored = None if held_out is None else kl_on(*held_out), None
    if served is not None:
        put_in_place(served.model, [tuning], tuning)
        scored = _model_kl(served.model, served.tokens, teacher, head)
        held = None if held_out is None else _model_kl(served.model, served.held_out_tokens, held_out[1], head)
    score = _tune([tuning], [], kl_on(hidden, teacher), epochs, lr, batch, seed, on_step, held, scored_train=scored)
    return (layer if score.epoch == 0 else tuning.packed()), score


def _tune(layers: list[LayerTuning], others: list[torch.Tensor], train: Windows, epochs: int,
          lr: float | Sequence[float], batch: int, seed: int, on_step: Callable[[float], None] | None,
          held_out: Windows | None, between_epochs: Callable[[], None] | None = None,
          scored_train: Windows | None = None) -> StageScore:
    """Adam on the layers' S, V, B and `others` over the `train` windows (adam_epochs; `lr`: one step, or one
    per tensor in that order), between_epochs() called after every epoch but the last, once it is
    scored (it may replace the layers' indices). Every candidate is
    scored as it will be stored (S and B through int8, V and `others` fp16) by its mean loss: with
    `held_out` windows after every epoch, without only at the end, on the training windows. The best,
    the start included, is what the layers (codebooks and indices) and `others` hold on return (the
    start: as they were).

    Why held-out windows: the end-to-end stage fits its few calibration windows. On SmolLM2-135M at W2
    r2 e10 with 16 windows and 40 epochs their KL fell to about 0.2 while 4 held-out windows stayed
    near 0.98 (docs/quality.md); the choice keeps epochs past the useful ones from costing anything.
    In the rows measured so far the held-out KL had not yet risen by the tenth epoch.

    scored_train: the training windows as a candidate is scored on them where that differs from how they
    are trained on (tune_head's tied head: through the whole model)."""
    device = layers[0].codes.device

    def mean_loss() -> float:
        scored = held_out if held_out is not None else scored_train if scored_train is not None else train
        return _mean_loss(scored, batch, device)

    def hold(books: list[Codebook], codes: list[torch.Tensor], weights: list[torch.Tensor],
             quantized: list[tuple | None]) -> None:
        for layer, book, layer_codes, layer_quantized in zip(layers, books, codes, quantized):
            layer.book, layer.codes, layer.quantized = book, layer_codes, layer_quantized
        with torch.no_grad():
            for weight, value in zip(others, weights):
                weight.copy_(value)

    # Indices are replaced, never changed in place (move_indices), so a state holds them by reference.
    start = [layer.book.copy() for layer in layers], \
        [layer.codes for layer in layers], [w.detach().clone() for w in others], [layer.quantized for layer in layers]
    before = best = mean_loss()
    kept, kept_epoch, finished, scores = None, 0, 0, []

    def score_stored() -> None:
        nonlocal best, kept, kept_epoch, finished
        finished += 1
        if held_out is None and finished < epochs:
            return
        codes = [layer.codes for layer in layers]
        trained = [layer.book for layer in layers], codes, [w.detach().clone() for w in others], [None] * len(layers)
        quantized = [dual_quantize(layer.book.s.detach(), layer.book.b.detach()) for layer in layers]
        stored = [stored_codebook(layer.book, q) for layer, q in zip(layers, quantized)], codes, \
            [w.detach().half().float() for w in others], quantized
        hold(*stored)
        score = mean_loss()
        hold(*trained)
        scores.append(score)
        if score < best:
            best, kept, kept_epoch = score, stored, finished

    def after_epoch() -> None:
        score_stored()
        if between_epochs is not None and finished < epochs:
            between_epochs()

    if epochs > 0:
        tensors = [t for layer in layers for t in (layer.book.s, layer.book.v, layer.book.b)] + others
        adam_epochs(tensors, train[0], train[1], epochs, lr, batch, seed, on_step, after_epoch)
    hold(*(kept if kept is not None else start))
    return StageScore(before, best, kept_epoch, tuple(scores) if held_out is not None else ())
