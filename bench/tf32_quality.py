"""What TF32 products in the tuning stages (lcq quantize on a GPU, blockwise.tf32_products) do to quality, on CPU.

A CPU has no TF32, so it is emulated: while a tuning stage runs, every linear layer's input and weight are rounded to
TF32's 10-bit mantissa (to nearest, ties to even) before an fp32 product, as tensor cores round them; the attention's
own products stay fp32 (on a GPU TF32 takes them too where they are fp32 matmuls). The rows are bench/quality.py's
(SmolLM2-135M-Instruct, its settings), to set beside the same keys in bench/results/quality-cpu.json.

    python bench/tf32_quality.py --only lcq-w4r2-e10,lcq-w2r2-e10    # writes bench/results/quality-cpu-tf32.json
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lcq.quantizer.pipeline as pipeline  # noqa: E402
from bench import quality  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "quality-cpu-tf32.json"
MANTISSA_DROPPED = 13  # fp32's 23 mantissa bits less TF32's 10


def to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to 10 mantissa bits, to nearest with ties to even (finite values); the gradient passes
    through as if unrounded (the stage's S, V and B reach the weights through it)."""
    bits = x.detach().contiguous().view(torch.int32)
    half = (1 << (MANTISSA_DROPPED - 1)) - 1 + ((bits >> MANTISSA_DROPPED) & 1)
    rounded = ((bits + half) & ~((1 << MANTISSA_DROPPED) - 1)).view(torch.float32)
    return x + (rounded - x).detach()


@contextlib.contextmanager
def emulated_tf32_products(device: str, enabled: bool = True) -> Iterator[None]:
    """blockwise.tf32_products on CPU: F.linear on TF32-rounded operands while the stage runs."""
    if not enabled or torch.device(device).type == "cuda":  # (a GPU has TF32 itself)
        yield
        return
    linear = F.linear
    F.linear = lambda x, w, b=None: linear(to_tf32(x), to_tf32(w), b) if x.dtype == torch.float32 else linear(x, w, b)
    try:
        yield
    finally:
        F.linear = linear


def main() -> int:
    pipeline.tf32_products = emulated_tf32_products
    if "--results" not in sys.argv:
        sys.argv += ["--results", str(RESULTS)]
    return quality.main()


if __name__ == "__main__":
    sys.exit(main())
