"""Stored responses, for GET /v1/responses/{id} and for continuing a conversation with
`previous_response_id`: kept in this process's memory, the least recently used dropped past a count.

Each entry holds its whole conversation as chat messages, so a response whose ancestors were dropped
still continues; the message dicts are shared with those ancestors, not copied. A background response is
stored at once (queued) and again when it ends; meanwhile its task is in `running` (and it is never dropped), and
a streamed one's events are kept (`streams`: sse.EventLog) for as long as it is stored, so that a client can read them again from any point.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .responses_protocol import ResponseObject

if TYPE_CHECKING:
    from .sse import EventLog


@dataclass
class StoredResponse:
    response: ResponseObject
    conversation: list[dict[str, Any]]  # chat messages up to this response's output (instructions excluded)
    input_items: list[dict[str, Any]]  # this response's own input, as its input_items route lists it


class ResponseStore:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self.running: dict[str, asyncio.Task] = {}  # background responses still generating, by id
        self.streams: dict[str, EventLog] = {}  # streamed background responses' events, by id

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, entry: StoredResponse) -> None:
        """Store (or update) a response, dropping the least recently used past the capacity; never a
        background response still generating, which must stay pollable and cancellable (the store may hold
        more than its capacity while these do)."""
        if self.capacity <= 0:
            return
        self._entries[entry.response.id] = entry
        self._entries.move_to_end(entry.response.id)
        idle = (key for key in list(self._entries) if key not in self.running)
        while len(self._entries) > self.capacity and (oldest := next(idle, None)) is not None:
            del self._entries[oldest]
            self.streams.pop(oldest, None)

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> bool:
        self.streams.pop(response_id, None)
        return self._entries.pop(response_id, None) is not None
