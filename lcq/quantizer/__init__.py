"""Offline quantization of Llama-family checkpoints to LCQ (and the RTN and GPTQ baselines)."""
from .pipeline import QuantizeOptions, QuantizeSummary, quantize_model

__all__ = ["QuantizeOptions", "QuantizeSummary", "quantize_model"]
