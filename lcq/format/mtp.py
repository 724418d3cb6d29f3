"""Where a checkpoint keeps its multi-token-prediction layer (DeepSeek-V3, GLM-4.5, Qwen3-Next, Qwen3.5): the
layer the quantizer packs beside the decoder layers and the model runs to draft (lcq/models/mtp.py).

Two layouts, by tensor names: DeepSeek's, `model.layers.{num_hidden_layers}.` with `enorm`, `hnorm`,
`eh_proj`, `shared_head.norm` and the decoder layer's own tensors beside them (its `shared_head.head` and
`embed_tokens` copy the model's head and table, which serve instead); Qwen3-Next's, `mtp.` with
`pre_fc_norm_embedding`, `pre_fc_norm_hidden`, `fc`, `norm` and the decoder layer under `mtp.layers.0.`.
"""
from __future__ import annotations

from dataclasses import dataclass


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

    @property
    def own_modules(self) -> tuple[str, ...]:
        """The modules under `prefix` that are the layer's own, not its decoder layer's (DeepSeek's sit side by
        side), with the copies of the model's head and table that DeepSeek's checkpoints keep there."""
        return (self.embed_norm, self.hidden_norm, self.projection, self.final_norm.split(".")[0], "embed_tokens")


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
