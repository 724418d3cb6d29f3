"""Offline quantization of Llama-family checkpoints to LCQ (and the RTN and GPTQ baselines)."""
from .options import QuantizeOptions, QuantizeSummary
from .pipeline import quantize_model

__all__ = ["QuantizeOptions", "QuantizeSummary", "quantize_model"]
