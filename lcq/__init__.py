"""lcq: serve LLMs quantized with low-rank codebooks."""
__version__ = "0.1.0"

_OFFLINE = ("LLM", "SamplingParams", "StructuredOutputsParams")


def __getattr__(name: str):
    """`from lcq import LLM, SamplingParams`, as vLLM's: the runtime (and torch) loads only when they are asked
    for, so `import lcq` stays light for the CLI and the format."""
    if name in _OFFLINE:
        from lcq import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'lcq' has no attribute {name!r}")
