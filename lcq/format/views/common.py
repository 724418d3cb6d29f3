"""What every view is made of: a stored tensor's place in the view (rows, order, scale), configs completed
with transformers' defaults, and fused matrices cut into their parts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

SPECIAL_FLOAT = "__float__"  # transformers 5's JSON for infinities and NaN
SPECIAL_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}
# Settings that Mistral's and Llama's configs have under the same name and meaning as Phi-3's and Granite's.
KEPT = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
        "rope_parameters", "rope_scaling", "sliding_window", "attention_bias", "mlp_bias", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "initializer_range", "use_cache")


class ViewError(ValueError):
    """A folder whose model cannot be read as one lcq runs."""


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor of the view lives: a stored tensor, or the rows [start, stop) of one."""

    name: str
    rows: tuple[int, int] | None = None
    # The view's tensor is the stored one times this, or each row times its own (read in fp32 where not 1).
    scale: float | tuple[float, ...] = 1.0
    order: tuple[int, ...] | None = None  # the view's row i is row order[i] of the rows above (then scaled)
    # how many rows `order` reorders (or picks from: Qwen3-Next's fused projections), where not len(order)
    picked_from: int | None = None
    # A mixture's experts stored as one 3-D tensor (gpt-oss): the view's tensor is the slice [expert] of its
    # first dimension, stored (in, out) where transposed, in MXFP4 where mxfp4 (the codes under `name`, the
    # scales under its name with _scales for _blocks), and `rows` taken every row_step-th row (gate and up
    # rows alternate)
    expert: int | None = None
    transposed: bool = False
    mxfp4: bool = False
    row_step: int = 1
    # Stored (out, in) where the stored matrix has this shape (out, in), else (in, out): transformers'
    # Transpose(check_dims=True), which keeps a tensor already of the model's shape, even where the matrix
    # is square and its shape cannot tell (Qwen3-VL-MoE: the Hub's files are (in, out), transformers' saves
    # (out, in))
    unless_shaped: tuple[int, int] | None = None

    @property
    def rows_read(self) -> int:
        """The rows `order` applies to: as many as it names, or those it picks from."""
        return self.picked_from or len(self.order)

    def is_transposed(self, stored_shape: tuple[int, ...]) -> bool:
        """Whether the stored matrix (an expert's slice: its last two dimensions) is (in, out)."""
        return self.transposed or (self.unless_shaped is not None and
                                   tuple(stored_shape[-2:]) != self.unless_shaped)

    def rearranged(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` (this tensor's rows of the stored one, already cut to `rows`) reordered (or picked) and scaled
        as the view reads them: for the stored tensor itself, and for an adapter's B matrix, whose rows are
        its matrix's output rows."""
        if self.order is not None:
            if rows.shape[0] != self.rows_read:
                raise ValueError(f"{self.name}: {rows.shape[0]} rows where the view reads {self.rows_read}")
            rows = rows[list(self.order)]
        if isinstance(self.scale, tuple):  # one per row
            return rows.float() * torch.tensor(self.scale).reshape(-1, *[1] * (rows.dim() - 1))
        return rows if self.scale == 1.0 else rows.float() * self.scale


def completed_config(model_type: str, settings: dict[str, Any], what: str) -> dict[str, Any]:
    """`settings` of a `model_type` config with transformers' defaults for the rest, named as its CausalLM."""
    try:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        completed = AutoConfig.for_model(model_type, **_special_floats(settings)).to_dict()
    except (ImportError, ValueError, KeyError) as e:
        raise ViewError(f"{what}: this transformers cannot read its text model "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    for key in ("transformers_version", "_name_or_path", "id2label", "label2id"):
        completed.pop(key, None)
    completed["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, model_type)]
    return completed


def _special_floats(value: Any) -> Any:
    """A config's values with the floats JSON has no literal for, as transformers 5 writes them ({"__float__":
    "Infinity"}: Granite 4.0-H's time_step_limit), as floats."""
    if isinstance(value, dict):
        if set(value) == {SPECIAL_FLOAT} and value[SPECIAL_FLOAT] in SPECIAL_FLOATS:
            return SPECIAL_FLOATS[value[SPECIAL_FLOAT]]
        return {key: _special_floats(item) for key, item in value.items()}
    return [_special_floats(item) for item in value] if isinstance(value, list) else value


def with_defaults(config: dict[str, Any], architecture: str) -> dict[str, Any]:
    """A config.json completed with transformers' defaults for its model_type (the Hub's files leave out
    what equals them, and a family's defaults need not be Llama's)."""
    return completed_config(config["model_type"], {key: value for key, value in config.items()
                                             if key not in ("model_type", "architectures", "auto_map")}, architecture)


def split_rows(stored: list[str], fused: dict[str, tuple]) -> dict[str, StoredTensor]:
    """Every stored tensor under its own name, but each one whose name ends in a key of `fused` as its
    parts: (the part's name suffix, first row, row past the last, scale, row order) each."""
    view = {}
    for name in stored:
        suffix = next((s for s in fused if name.endswith("." + s)), None)
        if suffix is None:
            view[name] = StoredTensor(name)
            continue
        prefix = name[: -len(suffix)]
        view.update({prefix + part: StoredTensor(name, None if start is None else (start, stop), scale, order)
                     for part, start, stop, scale, order in fused[suffix]})
    return view
