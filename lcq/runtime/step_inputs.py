"""A step's inputs on the host, and their packing into one buffer for the device.

The runner builds a step's token ids, positions and the arrays of its ForwardContext with numpy
(StepInputs). On CPU the model reads those arrays in place. On a GPU each small copy from pageable
memory is a staging copy of its own, and a decode step of a few sequences is short enough for a handful
of them, and the small device copies that spread them into place, to leave the GPU idle between steps.
So every array lies in one int64 buffer (StepLayout: the int32 ones in its int32 view), and a pinned
host buffer of that layout, filled by numpy, goes over in one copy; the decode graphs (cuda_graphs.py)
read their inputs through the views of a device buffer of their own, into which each step copies the
prefix its padded batch needs. (On an H200 a tiny model's graphed decode steps, which the host's work
bounds, took 213 us instead of 428 at batch 1, and 356 instead of 721 at batch 8.)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

import numpy as np
import torch

T = TypeVar("T", np.ndarray, torch.Tensor)


@dataclass
class StepInputs(Generic[T]):
    """A step's token ids and positions and the arrays of its ForwardContext (lcq/models/context.py), in
    their dtypes and shapes there: as numpy arrays on the host, or as tensors."""
    input_ids: T  # int64 (tokens,)
    positions: T  # int64 (tokens,)
    slot_mapping: T  # int64 (groups, tokens)
    adapter_slots: T  # int64 (tokens,): each token's LoRA adapter slot, -1 for the base model
    query_start: T  # int32 (seqs + 1,)
    context_lens: T  # int32 (seqs,)
    block_tables: T  # int32 (groups, seqs, width)
    state_slots: T | None = None  # int64 (seqs,), with recurrent layers

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    def map(self, convert: Callable) -> StepInputs:
        """Every array converted (torch.from_numpy, torch.Tensor.numpy)."""
        arrays = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return StepInputs(**{name: None if array is None else convert(array) for name, array in arrays.items()})


@dataclass(frozen=True)
class StepLayout:
    """Where the arrays of a step of up to `tokens` tokens and `seqs` sequences lie in one int64 buffer:
    the int64 arrays first, then in its int32 view query_start, context_lens and last the block tables, a
    sequence's (groups, width) after the one before, so that a step of fewer sequences needs only a prefix
    of the buffer (prefix)."""
    tokens: int
    seqs: int
    groups: int
    width: int
    states: bool  # whether there are state slots

    @classmethod
    def of(cls, step: StepInputs) -> StepLayout:
        """The layout that holds exactly `step`."""
        groups, seqs, width = step.block_tables.shape
        return cls(step.num_tokens, seqs, groups, width, step.state_slots is not None)

    @property
    def _longs(self) -> int:
        """The int64 elements before the int32 arrays."""
        return (3 + self.groups) * self.tokens + self.states * self.seqs

    def prefix(self, seqs: int) -> int:
        """The int64 elements at the buffer's start that hold every array of a step of `seqs` sequences."""
        ints = 2 * self.seqs + 1 + seqs * self.groups * self.width
        return self._longs + -(-ints // 2)

    @property
    def numel(self) -> int:
        return self.prefix(self.seqs)

    def views(self, buffer: torch.Tensor) -> StepInputs[torch.Tensor]:
        """The arrays as views of `buffer` (int64, at least numel elements), in StepInputs' shapes."""
        t, s, g = self.tokens, self.seqs, self.groups
        longs = buffer[:self._longs].split([t, t, g * t, t, s * self.states])
        ints = buffer.view(torch.int32)[2 * self._longs:2 * self.numel]
        query_start, context_lens, tables = ints.split([s + 1, s, len(ints) - 2 * s - 1])
        return StepInputs(input_ids=longs[0], positions=longs[1], slot_mapping=longs[2].view(g, t),
                          adapter_slots=longs[3], query_start=query_start, context_lens=context_lens,
                          block_tables=tables[:s * g * self.width].view(s, g, self.width).transpose(0, 1),
                          state_slots=longs[4] if self.states else None)


def pack(target: StepInputs[np.ndarray], step: StepInputs[np.ndarray]) -> None:
    """Writes step into target's first tokens and sequences (views of a buffer its size, or of a larger
    one), block tables up to the step's width: past it a larger buffer keeps what earlier steps wrote there
    (block ids, -1 or 0), which no row reads (a row reads the blocks its context_lens covers)."""
    tokens, seqs, width = step.num_tokens, step.num_seqs, step.block_tables.shape[2]
    target.input_ids[:tokens] = step.input_ids
    target.positions[:tokens] = step.positions
    target.slot_mapping[:, :tokens] = step.slot_mapping
    target.adapter_slots[:tokens] = step.adapter_slots
    target.query_start[:seqs + 1] = step.query_start
    target.context_lens[:seqs] = step.context_lens
    target.block_tables[:, :seqs, :width] = step.block_tables
    if step.state_slots is not None:
        target.state_slots[:seqs] = step.state_slots


def pad(target: StepInputs[np.ndarray], first: int, rows: int, width: int, scratch_state: int | None) -> None:
    """Rows first .. rows - 1 of a decode step (one token a sequence) as padding, up to block table column
    `width`: each writes nowhere (slot -1) and reads one token of block 0, under the base model, and with
    recurrent layers advances scratch_state (the state slot past the sequences')."""
    target.input_ids[first:rows] = 0
    target.positions[first:rows] = 0
    target.slot_mapping[:, first:rows] = -1
    target.adapter_slots[first:rows] = -1
    target.query_start[first + 1:rows + 1] = np.arange(first + 1, rows + 1)
    target.context_lens[first:rows] = 1
    target.block_tables[:, first:rows, :width] = 0
    if target.state_slots is not None:
        target.state_slots[first:rows] = scratch_state


def to_device(step: StepInputs[np.ndarray], device: torch.device) -> StepInputs[torch.Tensor]:
    """The step's arrays as tensors on `device`: on CPU the arrays themselves; else packed into a pinned
    buffer and copied in one go (the pinned memory is kept from reuse until the copy is done)."""
    if device.type == "cpu":
        return step.map(torch.from_numpy)
    layout = StepLayout.of(step)
    staging = torch.empty(layout.numel, dtype=torch.int64, pin_memory=True)
    pack(layout.views(staging).map(torch.Tensor.numpy), step)
    return layout.views(staging.to(device, non_blocking=True))


def host_tensor(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host values (a list, or a CPU tensor) as a tensor on `device`, without waiting for the work queued there: torch.tensor(...,
    device=cuda) waits for the stream to drain, which would hold the host until a step launched ahead of its
    tokens (engine.py, async scheduling) had finished. Copied from pinned memory (torch's pinned allocator keeps
    it from reuse until the copy is done): from pageable memory CUDA may wait for the stream all the same."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor
