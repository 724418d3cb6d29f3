"""Generation runtime: paged KV cache, continuous batching, sampling, sync/async/offline engines."""
from .async_engine import AsyncEngine
from .config import EngineConfig
from .engine import EngineStats, LLMEngine
from .errors import AdapterNotFoundError, ContextLengthError, EngineNotReadyError, QueueFullError
from .llm import LLM, Completion
from .outputs import RequestOutput, TokenLogprob, Usage
from .sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["AdapterNotFoundError", "AsyncEngine", "Completion", "ContextLengthError", "EngineConfig",
           "EngineNotReadyError", "EngineStats", "LLM", "LLMEngine", "QueueFullError", "RequestOutput", "SamplingParams",
           "StructuredOutputsParams", "TokenLogprob", "Usage"]
