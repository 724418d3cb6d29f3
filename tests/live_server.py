"""Real servers for the server tests: uvicorn in a background thread on an ephemeral port, and nginx with
the shipped load-balancer configuration in front of several of them."""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn

from lcq.runtime import EngineConfig

MODEL = "tiny"


class LiveServer:
    """uvicorn in a background thread on an ephemeral port, ready once the model has loaded."""

    def __init__(self, app, wait_for_model: bool = True, root_path: str = ""):
        self.app = app
        self.wait_for_model = wait_for_model
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    root_path=root_path))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        while self.wait_for_model and httpx.get(self.url + "/health").status_code != 200:
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ShippedNginx:
    """nginx running docker/nginx.conf as shipped except its upstream servers (these replicas) and its port;
    skips the test where no nginx binary is installed (CI has none)."""

    def __init__(self, replicas: list[LiveServer], folder: Path, read_timeout: int | None = None):
        self.replicas = replicas
        self.folder = folder
        self.read_timeout = read_timeout  # seconds instead of the shipped proxy_read_timeout (a test's short wait)
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ShippedNginx":
        nginx = shutil.which("nginx")
        if nginx is None:
            pytest.skip("no nginx binary")
        port = _free_port()
        conf = (Path(__file__).resolve().parents[1] / "docker" / "nginx.conf").read_text()
        upstream = "".join(f"server {urlsplit(live.url).netloc};\n" for live in self.replicas)
        conf = re.sub(r"server lcq-replica:\d+ resolve;\n", upstream, conf)
        conf = re.sub(r"\s*resolver [^;]*;", "", conf)  # compose's DNS (and `resolve`, nginx >= 1.27.3) not needed
        conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};\n        access_log off;")
        if self.read_timeout is not None:
            conf = re.sub(r"proxy_read_timeout \d+s;", f"proxy_read_timeout {self.read_timeout}s;", conf)
        (self.folder / "nginx.conf").write_text(conf)
        settings = f"daemon off; pid {self.folder}/nginx.pid; error_log {self.folder}/error.log;"
        self.process = subprocess.Popen([nginx, "-p", str(self.folder), "-c", str(self.folder / "nginx.conf"),
                                         "-g", settings])
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 20
        while True:
            try:
                httpx.get(self.url + "/version")
                return self
            except httpx.TransportError:
                assert time.time() < deadline and self.process.poll() is None, \
                    (self.folder / "error.log").read_text()
                time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
