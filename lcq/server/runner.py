"""uvicorn, run programmatically, with a drain phase before it stops listening."""
from __future__ import annotations

import asyncio

import uvicorn

from .app import Lifecycle


class DrainingServer(uvicorn.Server):
    """The first SIGTERM/SIGINT drains the engine while the server keeps answering (health and new requests
    get 503, running requests finish within the drain timeout); then uvicorn stops. A second signal stops
    at once: the requests still running are aborted (their streams end with finish_reason "abort"), and
    uvicorn stops as their connections close; a third does not wait for them."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle):
        super().__init__(config)
        self.lifecycle = lifecycle
        self.failed = False
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        """(Not uvicorn's, which would raise the signal again once stopped: the exit status stays 0.)"""
        loop = asyncio.get_event_loop()
        if not self._draining:
            self._draining = True
            loop.call_soon_threadsafe(self._drain)
        elif not self.should_exit:
            loop.call_soon_threadsafe(self.lifecycle.state.engine.hurry)
            self.should_exit = True
        else:  # a third: not even the aborted streams' last chunks are waited for
            self.force_exit = True

    def _drain(self) -> None:
        self.lifecycle.drain().add_done_callback(lambda _: setattr(self, "should_exit", True))

    def fail(self) -> None:
        """The model could not be loaded: stop serving and let `lcq serve` exit with an error."""
        self.failed = True
        self.should_exit = True
