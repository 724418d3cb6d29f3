"""Matrix products with packed LCQ weights: Triton kernels on CUDA, a torch path on CPU."""
from .linear import LCQLinear, lcq_linear

__all__ = ["LCQLinear", "lcq_linear"]
