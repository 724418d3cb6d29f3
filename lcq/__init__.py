"""lcq: serve LLMs quantized with low-rank codebooks."""
__version__ = "0.1.0"
