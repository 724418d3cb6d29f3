"""Server-sent events for the generation endpoints: one `data:` JSON chunk per delta, keep-alive comments
while nothing is produced (proxies close idle connections), an error event if generation fails mid-stream,
and `data: [DONE]` at the end. The Responses API names each event instead (`event: TYPE`) and ends with
its last event; a background response's stream is kept (EventLog) for clients to read again."""
from __future__ import annotations

import asyncio
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


def named_event(payload: dict) -> str:
    """An event named by its payload's `type`, as the Responses API sends them."""
    return f"event: {payload['type']}\n{event(payload)}"


def error_chunks(message: str, bad_request: bool = False) -> Iterable[dict]:
    """The error event of a failed stream: a 400's envelope where what the request asked for failed it
    (RequestOutput.bad_request), as the whole reply's status would be, else a 500's."""
    yield error_body(400, message, code="invalid_value") if bad_request else error_body(500, message, code="engine_error")


async def sse_events(generation: Generation, keepalive: float,
                     start: Callable[[], Iterable[dict]],
                     on_delta: Callable[[Choice, RequestOutput], Iterable[dict]],
                     finish: Callable[[], Iterable[dict]],
                     failed: Callable[[str, bool], Iterable[dict]] = error_chunks,
                     render: Callable[[dict], str] = event, end: str = DONE) -> AsyncIterator[str]:
    """Drive `generation` and render it: `start` chunks first, one batch per delta, `finish` chunks last
    (or `failed` ones if the engine fails the request), then `end`."""
    try:
        for chunk in start():
            yield render(chunk)
        async for item in generation.deltas(keepalive):
            if item is None:
                yield KEEPALIVE
                continue
            choice, out = item
            if out.finish_reason == "error":
                (logger.warning if out.bad_request else logger.error)("generation of %s failed: %s",
                                                                      choice.request_id, out.error)
                for chunk in failed(out.error or "generation failed", out.bad_request):
                    yield render(chunk)
                if end:
                    yield end
                return
            for chunk in on_delta(choice, out):
                yield render(chunk)
        for chunk in finish():
            yield render(chunk)
        if end:
            yield end
    finally:
        generation.abort()


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=HEADERS)


class EventLog:
    """A background stream's events as sent (the event with sequence number n at index n), read by any number
    of clients, each from where it asks, who may leave and come back without touching the generation."""

    def __init__(self):
        self.events: list[str] = []
        self.ended = False
        self._changed = asyncio.Event()

    def add(self, event: str) -> None:
        self.events.append(event)
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self, after: int, keepalive: float) -> AsyncIterator[str]:
        """The events after sequence number `after`, then each one as it comes until the stream ends; keep-alive
        comments while none comes."""
        sent = after + 1
        while True:
            while sent < len(self.events):
                yield self.events[sent]
                sent += 1
            if self.ended:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), keepalive)
            except asyncio.TimeoutError:
                yield KEEPALIVE
