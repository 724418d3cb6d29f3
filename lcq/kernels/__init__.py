"""Matrix products with packed LCQ weights: Triton kernels on CUDA, a torch path on CPU."""
import os

# Triton 3.10 compiles without fused multiply-adds unless asked (3.9 warns where TRITON_DEFAULT_FP_FUSION is unset).
# The kernels here count on them: the one-row products and the codebooks' S . V - B take an FFMA where two
# instructions would do without. A value the user set is kept.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from . import linear  # noqa: E402
from .linear import HAS_TRITON, LCQLinear, lcq_linear  # noqa: E402

__all__ = ["HAS_TRITON", "LCQLinear", "lcq_linear", "linear"]
