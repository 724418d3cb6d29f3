"""Timing of GPU work as the engine runs it: replayed from a CUDA graph, weights cold in L2.

At the bandwidth limit a 2-bit decode product takes a few microseconds (~2 us for 4096x4096 on
an H100), less than Python and the launch path need to issue it, so host-side timers (and
triton.testing.do_bench) would measure the launch, not the kernel. The engine replays decode steps from CUDA graphs, so kernels are timed the same way,
with the L2 cache flushed before every replay so that weights stream from device memory.
Used by the kernels' autotuner and by bench/kernels.py.

How the L2 is flushed (`flush`): "write" zeroes a buffer several times its size, as the autotuner always
has, which leaves it full of dirty lines that the timed kernel's reads must write back to memory on their
way in; "read" reads that buffer instead (a sum), which leaves clean lines, as in a decode step, where the
cache holds the earlier layers' weights. bench/product_floor.py times both.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

L2_FLUSH_BYTES = 256 << 20  # several times the 50-60 MB L2 of an H100 / H200
_flush_buffers: dict[torch.device, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    if device not in _flush_buffers:
        _flush_buffers[device] = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    return _flush_buffers[device]


FLUSHES = ("write", "read", "none")


def graph_time(fn: Callable[[], object], quantiles: Sequence[float] | None = None, reps: int = 30,
               flush: str = "write") -> float | list[float]:
    """Milliseconds per call of fn captured in a CUDA graph: the median, or the given quantiles
    (the interface of the Triton autotuner's do_bench). fn runs once first, outside the capture,
    so that compilation and allocation stay out of the graph."""
    if flush not in FLUSHES:
        raise ValueError(f"flush is one of {FLUSHES}, not {flush!r}")
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    buffer = _flush_buffer(torch.device("cuda", torch.cuda.current_device()))
    for _ in range(3):
        graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        if flush == "write":
            buffer.zero_()  # the GPU is busy with this while the host issues the replay
        elif flush == "read":
            buffer.sum()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = torch.tensor([s.elapsed_time(e) for s, e in zip(starts, ends)], dtype=torch.float64)
    del graph
    if quantiles is not None:
        return torch.quantile(times, torch.tensor(list(quantiles), dtype=torch.float64)).tolist()
    return times.median().item()
