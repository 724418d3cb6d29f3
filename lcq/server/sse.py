"""Server-sent events for both generation endpoints: one `data:` JSON chunk per delta, keep-alive comments
while nothing is produced (proxies close idle connections), an error event if generation fails mid-stream,
and `data: [DONE]` at the end."""
from __future__ import annotations

import json
import logging
from typing import AsyncIterator, Callable, Iterable

from fastapi.responses import StreamingResponse

from lcq.runtime.outputs import RequestOutput

from .errors import error_body
from .generation import Choice, Generation

logger = logging.getLogger("lcq.server")
KEEPALIVE = ": keep-alive\n\n"
DONE = "data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def sse_events(generation: Generation, keepalive: float,
                     start: Callable[[], Iterable[dict]],
                     on_delta: Callable[[Choice, RequestOutput], Iterable[dict]],
                     finish: Callable[[], Iterable[dict]]) -> AsyncIterator[str]:
    """Drive `generation` and render it: `start` chunks first, one batch per delta, `finish` chunks last."""
    try:
        for chunk in start():
            yield event(chunk)
        async for item in generation.deltas(keepalive):
            if item is None:
                yield KEEPALIVE
                continue
            choice, out = item
            if out.finish_reason == "error":
                logger.error("generation of %s failed: %s", choice.request_id, out.error)
                yield event(error_body(500, out.error or "generation failed", code="engine_error"))
                yield DONE
                return
            for chunk in on_delta(choice, out):
                yield event(chunk)
        for chunk in finish():
            yield event(chunk)
        yield DONE
    finally:
        generation.abort()


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=HEADERS)
