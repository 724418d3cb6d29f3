"""Errors the engine raises to its callers (the server maps them to HTTP statuses)."""


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit; the caller should retry later (HTTP 429)."""


class EngineNotReadyError(RuntimeError):
    """The engine is loading or draining and takes no new requests (HTTP 503)."""


class ContextLengthError(ValueError):
    """A prompt longer than the model's context (HTTP 400, code context_length_exceeded, as OpenAI's, in vLLM's
    words: client libraries read either as a context overflow, which agents answer by trimming the history)."""


class AdapterNotFoundError(LookupError):
    """No LoRA adapter of that name is loaded (HTTP 404 when unloading it)."""
