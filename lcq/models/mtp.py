"""A model's own multi-token-prediction layer (DeepSeek-V3, GLM-4.5, Qwen3-Next, Qwen3.5), which drafts for
speculative decoding (runtime/mtp.py).

It was trained beside the model to predict the token after next: at position p it reads the model's final
hidden state there and the embedding of the token at p + 1, each normed, projects the two side by side
back to the hidden width, runs one decoder layer of the model's kind (full attention over its own KV
cache of earlier positions), norms, and takes the model's head. A second draft feeds its own output back
as the hidden state of the next position.

Two layouts, by checkpoint names: DeepSeek's (`model.layers.{num_hidden_layers}.` with `enorm`, `hnorm`,
`eh_proj`, `shared_head.norm` and the layer's own tensors beside them; its `shared_head.head` and
`embed_tokens` copy the model's, which serve instead), whose first position's embedding is zeroed and
whose next draft reads the layer's output before the final norm; and Qwen3-Next's (`mtp.` with
`pre_fc_norm_embedding`, `pre_fc_norm_hidden`, `fc`, `layers.0.`, `norm`), whose next draft reads the
normed output. Both as vLLM runs them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MtpNames:
    """Where a checkpoint keeps its multi-token-prediction layer, and how the layer is run."""

    prefix: str  # its module: "model.layers.61" (DeepSeek-V3), "mtp" (Qwen3-Next)
    embed_norm: str
    hidden_norm: str
    projection: str  # [normed embedding; normed hidden] -> hidden width
    final_norm: str
    layer: str  # the decoder layer's prefix
    chains_normed: bool  # a next draft reads the normed output (Qwen3-Next), else the output before the norm
    zero_first_embedding: bool  # position 0's embedding zeroed (DeepSeek's, as vLLM runs it)


def mtp_names(config: dict, stored: list[str] | None) -> MtpNames | None:
    """The layout of the folder's multi-token-prediction layer, or None where it has none (its config may
    name one its checkpoint leaves out)."""
    names = stored or []
    if any(name.startswith("mtp.fc.") for name in names):
        return MtpNames("mtp", "pre_fc_norm_embedding", "pre_fc_norm_hidden", "fc", "norm", "mtp.layers.0", True,
                        False)
    prefix = f"model.layers.{config.get('num_hidden_layers')}"
    if config.get("num_nextn_predict_layers") and any(name.startswith(f"{prefix}.eh_proj.") for name in names):
        return MtpNames(prefix, "enorm", "hnorm", "eh_proj", "shared_head.norm", prefix, False, True)
    return None


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
