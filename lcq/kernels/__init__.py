"""Matrix products with packed LCQ weights: Triton kernels on CUDA, a torch path on CPU."""
from .linear import HAS_TRITON, LCQLinear, lcq_linear

__all__ = ["HAS_TRITON", "LCQLinear", "lcq_linear"]
