"""What programmatic dependent launch saves at a kernel boundary (lcq/kernels/dependent_launch.py).

    python bench/dependent_launch.py     # CUDA, compute capability 9.0 or more

A chain of 200 small kernels, each adding a weight vector (read before its wait, like a product's weights)
to the previous kernel's output, captured in a CUDA graph once with dependent launch and once without, for
vectors of 4K, 1M and 16M floats. Prints the time per kernel and checks the chain's result; writes
bench/results/dependent-launch-<gpu>.json (device, date, versions, rows).
"""
from __future__ import annotations

import datetime
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lcq.kernels.dependent_launch import wait_for_earlier_kernels  # noqa: E402

KERNELS = 200
BLOCK = 1024


@triton.jit
def _add_kernel(x_ptr, y_ptr, w_ptr, n, PDL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)  # independent of the kernel before
    wait_for_earlier_kernels(PDL)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask, other=0.0) + w, mask=mask)


def time_chain(n: int, dependent: bool, replays: int = 20) -> tuple[float, bool]:
    """Microseconds per kernel of the chain replayed from a graph, and whether its result is right."""
    weight = torch.ones(n, device="cuda")
    buffers = [torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda")]
    launch = {"PDL": True, "launch_pdl": True} if dependent else {"PDL": False}

    def chain() -> None:
        for i in range(KERNELS):
            _add_kernel[(triton.cdiv(n, BLOCK),)](buffers[i % 2], buffers[(i + 1) % 2], weight, n, BLOCK=BLOCK,
                                                  **launch)

    chain()  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    buffers[0].zero_()
    graph.replay()
    torch.cuda.synchronize()
    right = bool((buffers[0] == KERNELS).all())  # an even chain ends where it began
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / replays / KERNELS * 1e6, right


def main() -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        print("needs a CUDA GPU of compute capability 9.0 or more (Hopper)", file=sys.stderr)
        sys.exit(2)
    rows = []
    print("| floats | us per kernel, plain | with dependent launch |\n| --- | --- | --- |")
    for n in (4096, 1 << 20, 1 << 24):
        (plain, plain_right), (dependent, dependent_right) = time_chain(n, False), time_chain(n, True)
        if not (plain_right and dependent_right):
            raise SystemExit(f"the chain of {n} floats added up wrong")
        rows.append({"floats": n, "kernels": KERNELS, "plain_us": round(plain, 3), "dependent_us": round(dependent, 3)})
        print(f"| {n} | {plain:.2f} | {dependent:.2f} |")
    device = torch.cuda.get_device_name()
    out = ROOT / "bench" / "results" / f"dependent-launch-{re.sub(r'[^a-z0-9]+', '-', device.lower()).strip('-')}.json"
    out.write_text(json.dumps({"device": device, "date": datetime.date.today().isoformat(),
                               "versions": {"torch": torch.__version__, "triton": triton.__version__,
                                            "python": platform.python_version()},
                               "command": " ".join(sys.argv), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
