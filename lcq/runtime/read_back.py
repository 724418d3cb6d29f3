"""A step's draw read back to the host as soon as it is drawn.

On a GPU, reading a tensor (`.tolist()`, `float(t[i])`) waits for everything queued on the stream before the
read, and with async scheduling (engine.py) the next step's forward pass is queued right after the draw: a plain
read would wait for that forward pass too, then leave the GPU idle while the host took the tokens in. So the
tokens, and the log-probability rows the requests asked for, are copied into pinned host memory right after
the draw, before anything else is queued, and an event recorded after the copies tells the host when they
have landed (vLLM's AsyncOutput does the same). On CPU the tensors are read as they are.
"""
from __future__ import annotations

import torch

from .step_inputs import host_tensor


def _on_host(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a device tensor in pinned host memory, queued without waiting (the tensor itself on CPU)."""
    if not tensor.is_cuda:
        return tensor
    copy = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return copy.copy_(tensor, non_blocking=True)


class ReadBack:
    """The chosen tokens of a step's rows, and the raw log-probabilities of the rows in `asked`, on their way to
    the host."""

    def __init__(self, chosen: torch.Tensor, logprobs: torch.Tensor | None, asked: list[int]):
        self._chosen = _on_host(chosen)
        rows = None if logprobs is None or not asked else \
            logprobs if len(asked) == logprobs.shape[0] else logprobs[host_tensor(asked, logprobs.device)]
        self._rows = None if rows is None else _on_host(rows)
        self._row_of = {row: i for i, row in enumerate(asked)} if self._rows is not None else {}
        self._landed = None
        if chosen.is_cuda:
            self._landed = torch.cuda.Event()
            self._landed.record()

    def tokens(self) -> list[int]:
        """The chosen tokens, once they have landed."""
        if self._landed is not None:
            self._landed.synchronize()
        return self._chosen.tolist()

    def logprobs(self, row: int) -> torch.Tensor | None:
        """Row `row`'s log-probabilities on the host (after tokens()), None where its request asked for none."""
        index = self._row_of.get(row)
        return None if index is None else self._rows[index]
