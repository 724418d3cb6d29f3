"""A model's own multi-token-prediction layer (DeepSeek-V3, GLM-4.5, Qwen3-Next, Qwen3.5), which drafts for
speculative decoding (runtime/mtp.py).

It was trained beside the model to predict the token after next: at position p it reads the model's final
hidden state there and the embedding of the token at p + 1, each normed, projects the two side by side
back to the hidden width, runs one decoder layer of the model's kind (full attention over its own KV
cache of earlier positions), norms, and takes the model's head. A second draft feeds its own output back
as the hidden state of the next position.

Two layouts (lcq/format/mtp.py): DeepSeek's, whose first position's embedding is zeroed and whose next
draft reads the layer's output before the final norm, and Qwen3-Next's, whose next draft reads the normed
output. Both as vLLM runs them.
"""
from __future__ import annotations

import torch

from lcq.format.mtp import MtpNames


class MultiTokenPredictor(torch.nn.Module):
    def __init__(self, names: MtpNames, make_linear, layer: torch.nn.Module, make_norm):
        """layer: a DecoderLayer of the model's kind with full attention; make_norm(): a norm as the model's."""
        super().__init__()
        self.names = names
        self.embed_norm, self.hidden_norm, self.norm = make_norm(), make_norm(), make_norm()
        self.projection = make_linear([f"{names.prefix}.{names.projection}"])
        self.layer = layer

    def forward(self, embeddings: torch.Tensor, previous: torch.Tensor, positions: torch.Tensor, rope,
                attention) -> tuple[torch.Tensor, torch.Tensor]:
        """(the hidden states a next draft reads, the normed ones the head reads) of rows whose embeddings
        are of the tokens after their positions and whose `previous` are the model's final hidden states
        at them (or a draft's own)."""
        if self.names.zero_first_embedding:
            embeddings = embeddings.masked_fill((positions == 0).unsqueeze(-1), 0.0)
        joined = torch.cat([self.embed_norm(embeddings)[0], self.hidden_norm(previous)[0]], dim=-1)
        hidden, residual = self.layer(self.projection(joined), None, rope, attention)
        output = hidden + residual
        normed = self.norm(output)[0]
        return (normed if self.names.chains_normed else output), normed
