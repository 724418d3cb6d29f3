"""A real uvicorn server in a background thread for the server tests, on an ephemeral port."""
from __future__ import annotations

import threading
import time

import httpx
import uvicorn

from lcq.runtime import EngineConfig

MODEL = "tiny"


class LiveServer:
    """uvicorn in a background thread on an ephemeral port, ready once the model has loaded."""

    def __init__(self, app):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        while httpx.get(self.url + "/health").status_code != 200:
            assert time.time() < deadline, "the model did not load"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def engine(self):
        return self.app.state.lcq.engine

    def metric(self, name: str, **labels) -> float:
        """A sample's value from /metrics (0 when absent)."""
        text = httpx.get(self.url + "/metrics").text
        want = {"model_name": MODEL, **labels}
        for line in text.splitlines():
            if line.startswith(name + "{"):
                series, value = line.rsplit(" ", 1)
                got = dict(kv.split("=", 1) for kv in series[len(name) + 1:-1].split(","))
                if {k: v.strip('"') for k, v in got.items()} == want:
                    return float(value)
        return 0.0

    def wait_pool_full(self, timeout: float = 10.0):
        deadline = time.time() + timeout
        while True:
            stats = self.engine.stats()
            if stats.num_running == 0 and stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks:
                return stats
            assert time.time() < deadline, f"KV blocks not returned: {stats}"
            time.sleep(0.05)


def engine_config(model_dir, **overrides) -> EngineConfig:
    fields = dict(model=str(model_dir), served_model_name=MODEL, kv_cache_memory_gb=0.01, max_num_seqs=8)
    return EngineConfig(**{**fields, **overrides})
