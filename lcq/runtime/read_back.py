"""A step's draw read back to the host as soon as it is drawn.

On a GPU, reading a tensor (`.tolist()`, `float(t[i])`) waits for everything queued on the stream before the
read, and with async scheduling (engine.py) the next step's forward pass is queued right after the draw: a plain
read would wait for that forward pass too, then leave the GPU idle while the host took the tokens in. So the
tokens, and for the requests that asked for logprobs each one's chosen and most likely log-probabilities (picked
on the device, as vLLM's sampler does: whole rows are 0.6 MB each at a 152k vocabulary), are copied into pinned
host memory right after the draw, before anything else is queued, and an event recorded after the copies tells
the host when they have landed (vLLM's AsyncOutput does the same). On CPU the tensors are read as they are.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .step_inputs import host_tensor


class DrawnLogprobs(NamedTuple):
    """A row's raw log-probabilities as read back: its chosen token's, and the most likely ones (as many as the
    step's requests asked for at most, likeliest first; a request takes its first top_logprobs)."""
    chosen: float
    top_values: torch.Tensor
    top_ids: torch.Tensor


def _on_host(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a device tensor in pinned host memory, queued without waiting (the tensor itself on CPU)."""
    if not tensor.is_cuda:
        return tensor
    copy = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return copy.copy_(tensor, non_blocking=True)


class ReadBack:
    """The chosen tokens of a step's rows, and the logprobs of the rows in `asked` (row -> top_logprobs asked
    for), on their way to the host."""

    def __init__(self, chosen: torch.Tensor, logprobs: torch.Tensor | None, asked: dict[int, int]):
        self._chosen = _on_host(chosen)
        self._row_of: dict[int, int] = {}
        if logprobs is not None and asked:
            rows = list(asked)
            index = host_tensor(rows, logprobs.device)
            picked = logprobs[index].gather(1, chosen[index].clamp(0, logprobs.shape[1] - 1).unsqueeze(1))
            top = logprobs[index].topk(max(asked.values()), dim=-1)
            self._picked, self._values, self._ids = (_on_host(t) for t in (picked.squeeze(1), *top))
            self._row_of = {row: i for i, row in enumerate(rows)}
        self._landed = None
        if chosen.is_cuda:  # (on the stream of the device that queued the copies)
            self._landed = torch.cuda.Event()
            self._landed.record(torch.cuda.current_stream(chosen.device))

    def tokens(self) -> list[int]:
        """The chosen tokens, once they have landed."""
        if self._landed is not None:
            self._landed.synchronize()
        return self._chosen.tolist()

    def logprobs(self, row: int) -> DrawnLogprobs | None:
        """Row `row`'s logprobs (after tokens()), None where its request asked for none."""
        i = self._row_of.get(row)
        return None if i is None else DrawnLogprobs(float(self._picked[i]), self._values[i], self._ids[i])
