"""Llama-family models on LCQ (or dense) linear layers, over a paged KV cache."""
from .config import ModelConfig
from .context import ForwardContext
from .llama import LlamaModel
from .loader import load_model

__all__ = ["ForwardContext", "LlamaModel", "ModelConfig", "load_model"]
