"""The end-to-end stage of LCQ: once every block is packed, tune every layer's S, V and B (indices
fixed) and the blocks' RMSNorm weights on the KL divergence from the full-precision model's
next-token distributions to the quantized model's, over the calibration windows.

The block-wise stage fits each block to its full-precision output on its own; errors that are small
per block still add up over the blocks, and only the model's output says which of them matter. The
indices stay as packed, the codebooks move under them (as AQLM's global fine-tuning does), and S and
B go back through the dual quantization at the end. The teacher is the full-precision model's final
hidden state (after its last norm), which the block-wise stage has already computed, so its logits
cost one product with the head per batch and no second model is held.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

from lcq.format import PackedLinear, dual_quantize, encode_linear
from lcq.format.codebook import decoded_b, decoded_s
from lcq.format.packing import unpack_indices

from .blockwise import adam_epochs
from .fit import Codebook, stored_codebook

NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass
class LayerTuning:
    """One packed layer under tuning: its indices (N, G, g) as bytes and its float codebook."""

    prefix: str
    layer: PackedLinear
    codes: torch.Tensor
    book: Codebook

    @classmethod
    def start(cls, prefix: str, layer: PackedLinear, device: torch.device) -> "LayerTuning":
        """The codebook exactly as stored (S, B decoded from int8, V from fp16), so tuning starts from
        the packed model."""
        layer = layer.to(device)
        n, groups = layer.out_features, layer.num_groups
        codes = unpack_indices(layer.qweight, layer.bits).reshape(n, groups, layer.group_size).to(torch.uint8)
        book = Codebook(s=decoded_s(layer).float(), v=layer.v[0].float(), b=decoded_b(layer).float())
        return cls(prefix, layer, codes, book)

    def weight(self) -> torch.Tensor:
        """The dense (N, K) weight, differentiable in S, V and B."""
        n = self.codes.shape[0]
        dense = torch.gather(self.book.values(), 2, self.codes.long()).reshape(n, -1)
        return dense[:, :self.layer.in_features]

    def packed(self) -> PackedLinear:
        s_q, s_scale, b_q, b_scale = dual_quantize(self.book.s.detach(), self.book.b.detach())
        indices = self.codes.reshape(self.codes.shape[0], -1)[:, :self.layer.in_features].long()
        return encode_linear(indices, s_q, s_scale, b_q, b_scale, self.book.v.detach(), self.layer.in_features,
                             self.layer.bits, self.layer.group_size, self.layer.bias)


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student)."""
    student = F.log_softmax(student_logits.float().flatten(0, -2), dim=-1)
    teacher = F.log_softmax(teacher_logits.float().flatten(0, -2), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def finetune(model: torch.nn.Module, packed: dict[str, PackedLinear], norms: dict[str, torch.Tensor],
             tokens: torch.Tensor, teacher: torch.Tensor, head: torch.Tensor, epochs: int, lr: float,
             batch: int = 4, seed: int = 0, on_step: Callable[[float], None] | None = None,
             ) -> tuple[dict[str, PackedLinear], dict[str, torch.Tensor], tuple[float, float]]:
    """Adam on every layer's S, V, B and the given norm weights; returns the tuned layers (re-packed),
    the tuned norms and the KL on all windows before and after (the start is kept if it was lower).

    model: the quantized model's transformers CausalLM with every tensor but the packed layers' weights
    (and biases) loaded; packed: prefix -> layer; norms: name -> weight to tune; tokens (S, T);
    teacher (S, T, H): the full-precision final hidden states; head (V, H): the output embedding.
    Steps are relative to each tensor's magnitude (adam_epochs), as in the block-wise stage."""
    device = head.device
    layers = [LayerTuning.start(prefix, layer, device) for prefix, layer in packed.items()]
    norms = {name: weight.detach().float().to(device).clone() for name, weight in norms.items()}
    biases = {f"{t.prefix}.bias": t.layer.bias.float() for t in layers if t.layer.bias is not None}

    def weights() -> dict[str, torch.Tensor]:
        return {**{f"{t.prefix}.weight": t.weight() for t in layers}, **norms, **biases}

    def loss(rows: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = functional_call(model, tensors, (tokens[rows],), {"use_cache": False}, strict=False).logits
        return token_kl(logits, teacher[rows].float() @ head.t())

    def total() -> float:
        with torch.no_grad():
            tensors = weights()
            sums = [float(loss(torch.arange(i, min(i + batch, len(tokens)), device=device), tensors)) *
                    min(batch, len(tokens) - i) for i in range(0, len(tokens), batch)]
        return sum(sums) / len(tokens)

    before = total()
    if epochs <= 0:
        return packed, {}, (before, before)
    trained = [t for layer in layers for t in (layer.book.s, layer.book.v, layer.book.b)] + list(norms.values())
    adam_epochs(trained, lambda rows: loss(rows, weights()), len(tokens), epochs, lr, batch, seed, on_step)
    for layer in layers:  # scored as they will be stored: S and B through int8, V and the norms fp16
        layer.book = stored_codebook(layer.book)
    norms = {name: w.half().float() for name, w in norms.items()}
    after = total()
    if after > before:
        return packed, {}, (before, before)
    return {t.prefix: t.packed() for t in layers}, norms, (before, after)
