"""Errors the engine raises to its callers (the server maps them to HTTP statuses)."""


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit; the caller should retry later (HTTP 429)."""


class EngineNotReadyError(RuntimeError):
    """The engine is loading or draining and takes no new requests (HTTP 503)."""


class AdapterNotFoundError(LookupError):
    """No LoRA adapter of that name is loaded (HTTP 404 when unloading it)."""
