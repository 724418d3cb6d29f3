"""Arrival counters for kernels whose last program to finish combines the others' partial results (a split-K
product, a decode attention split over its context): zeroed int32s in one buffer per device, which those
kernels leave zeroed again."""
from __future__ import annotations

import torch

_counters: dict[torch.device, torch.Tensor] = {}
# Counters outgrown by a larger launch, kept alive: a CUDA graph captured before holds their address, and
# the allocator must not hand their memory to anything else while the graph may replay.
_outgrown: list[torch.Tensor] = []


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """At least `count` zeroed int32 counters on device (kernels launched one after another share them)."""
    counters = _counters.get(device)
    if counters is None or counters.numel() < count:
        if counters is not None:
            _outgrown.append(counters)
        counters = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        _counters[device] = counters
    return counters
