"""QuantizeOptions: every setting of `lcq quantize`, checked in one place, and what a run reports."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch

from lcq.errors import UserError
from lcq.inputs import device_problem

from .finetune import StageScore
from .layer_bits import LayerWidths

METHODS = ("lcq", "rtn", "gptq")
# How LCQ picks each weight's index: its nearest codebook entry; GPTQ's sweep over the codebooks;
# or that sweep, S and B refit to the chosen indices through the Hessian, and a second sweep.
ASSIGNMENTS = ("nearest", "gptq", "gptq-refit")
# The block-wise stage's default Adam step per bit width, relative to each of S, V, B's mean
# magnitude. A step of that size moves codebook entries by a fixed share of the group's range, so it
# must shrink as the entries get closer: on SmolLM2-135M (blocks 0-2, held-out text) 1e-2 lowered the
# block error most at 2 bits but never lowered it at 4 bits, where 1e-3 cut it by 7-14%.
DEFAULT_LR = {2: 1e-2, 3: 3e-3, 4: 1e-3}
# The end-to-end stage's step (finetune.py), relative like the block-wise one; it refines codebooks
# the block-wise stage already fitted, so it is smaller.
DEFAULT_FINETUNE_LR = {2: 1e-3, 3: 3e-4, 4: 1e-4}
BLOCK_ERRORS = ("relative", "norm-weighted")
DEFAULT_SEQLEN = 512  # tokens per calibration window, unless the model's context is shorter (for_context)


@dataclass
class QuantizeOptions:
    bits: int = 2
    rank: int = 2
    group_size: int = 64
    method: str = "lcq"
    calib_text: str | None = None
    nsamples: int = 128
    seqlen: int | None = None  # None: DEFAULT_SEQLEN, or the model's context where shorter (for_context)
    epochs: int = 10
    lr: float | None = None  # None: DEFAULT_LR for the bit width
    init: str = "kmeans"
    assign: str = "nearest"
    device: str = "cpu"
    act_order: bool = False
    seed: int = 0
    batch_size: int = 4
    finetune_epochs: int = 0
    finetune_lr: float | None = None  # None: DEFAULT_FINETUNE_LR for the bit width
    finetune_samples: int | None = None  # the end-to-end stage's training windows; None: nsamples
    finetune_index_updates: float = 0.0  # fraction of each layer's weights moved between end-to-end epochs
    head_bits: int = 0  # lm_head and the embedding table (tied or not) packed at this width; 0: kept fp16
    layer_bits: list[str] = field(default_factory=list)  # rules for layers at another width (layer_bits.py)
    target_bits: float | None = None  # stored bits per weight to spend, each layer's width chosen (allocation.py)
    val_samples: int | None = None  # held-out windows of the tuning stages; None: a quarter of nsamples
    block_error: str = "norm-weighted"  # that stage's error: with the readers' unit weights, or per token relative
    tf32: bool = True  # the tuning stages' fp32 products in TF32 on a GPU (blockwise.tf32_products)

    def validate(self) -> None:
        """Every setting, and calibration text present when the method needs data."""
        self.validate_settings()
        if self.needs_data and not (self.calib_text and self.calib_text.strip()):
            raise UserError(f"--method {self.method} needs calibration text (--calib FILE), and it is empty")

    def validate_settings(self) -> None:
        """Every setting but the calibration text (checked before any default text is fetched)."""
        checks = [
            (self.bits in (2, 3, 4), f"--bits must be 2, 3 or 4 (got {self.bits})"),
            (self.head_bits in (0, 2, 3, 4), f"--head-bits must be 0 (fp16), 2, 3 or 4 (got {self.head_bits})"),
            (1 <= self.rank <= 4, f"--rank must be 1 to 4 (got {self.rank})"),
            (self.group_size in (32, 64, 128), f"--group-size must be 32, 64 or 128 (got {self.group_size})"),
            (self.method in METHODS, f"--method must be one of {', '.join(METHODS)} (got {self.method})"),
            # RTN at rank > 1 is the same grid with unused extra ranks (a cheap way to make rank-r files).
            (self.method != "gptq" or self.rank == 1, "--method gptq uses the uniform grid: --rank must be 1"),
            (self.init in ("kmeans", "rtn"), f"--init must be kmeans or rtn (got {self.init})"),
            (self.assign in ASSIGNMENTS, f"--assign must be one of {', '.join(ASSIGNMENTS)} (got {self.assign})"),
            (self.method == "lcq" or self.assign == "nearest", "--assign applies to --method lcq only"),
            (self.nsamples >= 1 and (self.seqlen is None or self.seqlen >= 8),
             "--nsamples must be >= 1 and --seqlen >= 8"),
            (self.epochs >= 0, "--epochs must be >= 0"),
            (self.val_samples is None or self.val_samples >= 0, f"--val-samples must be >= 0 (got {self.val_samples})"),
            (self.block_error in BLOCK_ERRORS,
             f"--block-error must be one of {', '.join(BLOCK_ERRORS)} (got {self.block_error})"),
            (self.finetune_epochs >= 0, "--finetune-epochs must be >= 0"),
            (self.method == "lcq" or self.finetune_epochs == 0, "--finetune-epochs applies to --method lcq only"),
            (self.finetune_lr is None or 0 < self.finetune_lr < math.inf,
             f"--finetune-lr must be positive and finite (got {self.finetune_lr})"),
            (self.finetune_samples is None or self.finetune_samples >= 1,
             f"--finetune-samples must be >= 1 (got {self.finetune_samples})"),
            (self.finetune_samples is None or self.finetune_epochs > 0, "--finetune-samples needs --finetune-epochs"),
            (0 <= self.finetune_index_updates < 1,
             f"--finetune-index-updates must be a fraction in [0, 1) (got {self.finetune_index_updates})"),
            (self.finetune_index_updates == 0 or self.finetune_epochs >= 2,
             "--finetune-index-updates moves indices between end-to-end epochs: it needs --finetune-epochs 2 or more"),
            (self.lr is None or 0 < self.lr < math.inf, f"--lr must be positive and finite (got {self.lr})"),
            (self.batch_size >= 1, f"--batch-size must be >= 1 (got {self.batch_size})"),
            # torch's seeds (torch.manual_seed: -2**63 to 2**64 - 1), less the 2 that the held-out and extra
            # calibration windows add to it
            (-2**63 <= self.seed <= 2**64 - 3, f"--seed must be between {-2**63} and {2**64 - 3} (got {self.seed})"),
            (self.target_bits is None or not self.layer_bits,
             "--target-bits chooses every layer's width itself: drop --layer-bits, or the target"),
            (self.target_bits is None or self.needs_data,
             "--target-bits weighs layers on calibration text: --method lcq or gptq, not rtn"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        LayerWidths(self.bits, self.layer_bits)  # parses the --layer-bits rules: a bad one raises
        if (problem := device_problem(self.device)) is not None:
            raise UserError(problem)

    def for_context(self, context: int | None) -> "QuantizeOptions":
        """These options for a model of `context` positions (None: its config states none), with --seqlen
        chosen: the default shortened to the context, and a longer --seqlen refused as `lcq eval --ctx`
        refuses one, since windows past the model's positions calibrate it on inputs it never takes."""
        if self.seqlen is None:
            return replace(self, seqlen=DEFAULT_SEQLEN if context is None else min(DEFAULT_SEQLEN, context))
        if context is not None and self.seqlen > context:
            raise UserError(f"--seqlen {self.seqlen} is longer than the model's context of {context} tokens")
        return self

    @property
    def widths(self) -> LayerWidths:
        """Each decoder linear layer's width: --bits, or what a --layer-bits rule gives it."""
        return LayerWidths(self.bits, self.layer_bits)

    @property
    def block_lr(self) -> float:
        """The block-wise stage's Adam step: --lr, or the default for the bit width."""
        return self.block_lr_of(self.bits)

    def block_lr_of(self, bits: int) -> float:
        """The block-wise stage's step for a layer of width `bits`: --lr, or that width's default, since a
        step that moves 2-bit codebooks well overshoots 3- and 4-bit ones (DEFAULT_LR)."""
        return DEFAULT_LR[bits] if self.lr is None else self.lr

    @property
    def end_to_end_lr(self) -> float:
        """The end-to-end stage's Adam step: --finetune-lr, or the default for the bit width."""
        return self.end_to_end_lr_of(self.bits)

    def end_to_end_lr_of(self, bits: int) -> float:
        """The end-to-end stage's step for a layer of width `bits`: --finetune-lr, or that width's default."""
        return DEFAULT_FINETUNE_LR[bits] if self.finetune_lr is None else self.finetune_lr

    @property
    def end_to_end_windows(self) -> int:
        """The end-to-end stage's training windows: --finetune-samples, by default --nsamples. The first
        of them are the block-wise stage's; more are drawn after the held-out ones (calibration_batch)."""
        return self.nsamples if self.finetune_samples is None else self.finetune_samples

    @property
    def held_out_windows(self) -> int:
        """Calibration windows the block-wise, head and end-to-end stages score their epochs on and never
        train on (optimize_block, finetune._tune): --val-samples, by default a quarter of --nsamples (at
        least 1); none where no stage trains."""
        if self.method != "lcq" or self.epochs == self.finetune_epochs == 0:
            return 0
        return max(1, self.nsamples // 4) if self.val_samples is None else self.val_samples

    @property
    def extra_windows(self) -> int:
        """Windows the end-to-end stage trains on beyond the block-wise stage's."""
        return max(0, self.end_to_end_windows - self.nsamples)

    def window_rows(self) -> tuple[slice, slice, torch.Tensor]:
        """Which of calibration_batch's rows each stage uses: the block-wise and head stages' training
        windows, the held-out ones, and the end-to-end stage's training windows (the first of the
        block-wise ones, then the extra ones drawn after the held-out)."""
        n, held = self.nsamples, self.held_out_windows
        extra = torch.arange(n + held, n + held + self.extra_windows)
        return slice(0, n), slice(n, n + held), torch.cat([torch.arange(min(n, self.end_to_end_windows)), extra])

    @property
    def needs_data(self) -> bool:
        return self.method != "rtn"

    @property
    def gptq_indices(self) -> bool:
        """Whether the final indices come from GPTQ's error-compensating sweep (needs full X^T X)."""
        return self.method == "gptq" or self.assign != "nearest"

    def recorded(self) -> dict:
        """The options as stored with the output (calibration text by size, not content)."""
        d = asdict(self)
        text = d.pop("calib_text")
        d["calib_chars"] = len(text) if text else 0
        d["lr"] = self.block_lr
        d["val_samples"] = self.held_out_windows
        d["finetune_lr"] = self.end_to_end_lr if self.finetune_epochs else None
        d["finetune_samples"] = self.end_to_end_windows if self.finetune_epochs else None
        return d


@dataclass
class QuantizeSummary:
    seconds: float  # of this run (a --resume's, without the blocks read back)
    bits_per_weight: float  # of the decoder's packed layers (a packed head shows in size_bytes)
    size_bytes: int
    peak_memory_bytes: int
    block_losses: list[tuple[float, float]] = field(default_factory=list)
    head_kl: StageScore | None = None  # the head stage's (a packed head only)
    finetune_kl: StageScore | None = None  # the end-to-end stage's
    finetune_peak_memory_bytes: int | None = None  # that stage's own peak (it holds the whole model)
    layer_bits: list[str] = field(default_factory=list)  # the --layer-bits rules used (--target-bits: chosen)
    resumed_blocks: int = 0  # finished blocks a --resume read back from OUT_DIR.partial instead of quantizing

