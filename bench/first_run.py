"""First run of the README's serve command: time from `make serve` on a fresh clone with an empty
model cache to the first chat answer, then the time a second start takes to be ready.

    python bench/first_run.py            # writes bench/results/first-run-cpu.json

The clone is of this checkout's HEAD, so it measures the committed code; its venv is built from
nothing (the Makefile's set-up), the demo model is downloaded, converted and quantized.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lcq.quantizer.demo import DEMO_SERVED_NAME  # noqa: E402

QUESTION = "What is the capital of France?"


def wait_ready(port: int, server: subprocess.Popen, timeout: float) -> float:
    """Seconds until /health answers 200."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return time.perf_counter() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise SystemExit(f"not ready after {timeout} s")


def ask(port: int) -> str:
    body = json.dumps({"model": DEMO_SERVED_NAME, "messages": [{"role": "user", "content": QUESTION}],
                       "max_tokens": 32, "temperature": 0}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def start(command: list[str], clone: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=clone, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "first-run-cpu.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        clone, cache, log = Path(tmp) / "lcq", Path(tmp) / "cache", Path(tmp) / "serve.log"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = dict(os.environ, LCQ_CACHE=str(cache), LCQ_PORT=str(args.port))
        began = time.perf_counter()
        server = start(["make", "serve"], clone, env, log)
        try:
            wait_ready(args.port, server, args.timeout)
            answer = ask(args.port)
            first_answer_s = time.perf_counter() - began
        finally:
            stop(server)
        server = start([str(clone / ".venv" / "bin" / "lcq"), "serve"], clone, env, log)
        try:
            restart_ready_s = wait_ready(args.port, server, args.timeout)
        finally:
            stop(server)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True,
                                text=True).stdout.strip()
    result = {
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "commit": commit,
        "versions": {"python": platform.python_version()},
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "first_answer_s": round(first_answer_s, 1), "restart_ready_s": round(restart_ready_s, 1),
        "question": QUESTION, "answer": answer,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| step | seconds | goal |\n|---|---|---|")
    print(f"| fresh clone: `make serve` to the first chat answer | {result['first_answer_s']} | < 600 |")
    print(f"| second start: `lcq serve` to ready | {result['restart_ready_s']} | < 30 |")
    print(f"answer: {answer!r}; wrote {args.out}")


if __name__ == "__main__":
    main()
