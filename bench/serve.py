"""Load benchmark of a running `lcq serve`: N concurrent streaming clients for D seconds.

Each client loops: pick a prompt length and an output length from a fixed mix, stream a completion,
record time to first token (TTFT), the gaps between streamed tokens (ITL) and the HTTP status. A 429
is a clean rejection (the queue is full, the client backs off for Retry-After) and is counted apart
from failures. After the run the server's /metrics must show the KV block pool drained back to 0
(no leaked blocks) and, with a known server pid, its resident memory before and after is reported.

    python bench/serve.py --url http://127.0.0.1:8000 --clients 128 --duration 60
    python bench/serve.py --launch            # starts `lcq serve` (demo model) on a free port itself
    python bench/serve.py --launch PATH --clients 8 --duration 10
    python bench/serve.py --launch PATH --clients 1 32 --duration 20   # one server, a run at each count

The device is the server's (TGI's /info: model_device_type), named from this machine (its CPU, or its GPU by
nvidia-smi), so a server on another machine is named by its device type alone.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.records import cpu_name  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing about rivers, "
         "mountains and the long history of quiet towns near the sea").split()
PROMPT_WORDS = (8, 32, 128)  # short chat turn, paragraph, page-ish context
OUTPUT_TOKENS = (16, 64, 128)


@dataclass
class Totals:
    """Everything the clients observed; one instance shared by all of them (single event loop)."""

    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)  # first error body per status, to explain it
    output_tokens: int = 0
    prompt_tokens: int = 0
    completed: int = 0

    def count(self, status: str, detail: str = "") -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if detail:
            self.examples.setdefault(status, detail[:300])


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def make_prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def one_request(http: httpx.AsyncClient, model: str, rng: random.Random, totals: Totals) -> float:
    """Stream one completion; return how long the client should back off (Retry-After on 429/503)."""
    body = {"model": model, "prompt": make_prompt(rng, rng.choice(PROMPT_WORDS)),
            "max_tokens": rng.choice(OUTPUT_TOKENS), "temperature": 0.8, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    start = time.perf_counter()
    last = None
    streamed, counted = 0, False  # tokens of a stream cut short (cancelled, failed) count as streamed
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                totals.count(str(response.status_code), (await response.aread()).decode(errors="replace"))
                return float(response.headers.get("retry-after", 1)) if response.status_code in (429, 503) else 0.0
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    totals.output_tokens += chunk["usage"]["completion_tokens"]
                    totals.prompt_tokens += chunk["usage"]["prompt_tokens"]
                    counted = True
                if not any(choice.get("text") for choice in chunk.get("choices", [])):
                    continue
                now = time.perf_counter()
                streamed += 1
                if last is None:
                    totals.ttft.append(now - start)
                else:
                    totals.itl.append(now - last)
                last = now
        totals.count("200")
        totals.completed += 1
        totals.e2e.append(time.perf_counter() - start)
    except httpx.HTTPError as error:
        totals.count(f"error:{type(error).__name__}", str(error))
    finally:
        if not counted:
            totals.output_tokens += streamed
    return 0.0


async def client(http: httpx.AsyncClient, model: str, seed: int, deadline: float, totals: Totals) -> None:
    rng = random.Random(seed)
    while time.perf_counter() < deadline:
        backoff = await one_request(http, model, rng, totals)
        if backoff:
            await asyncio.sleep(min(backoff, max(0.0, deadline - time.perf_counter())))


def read_metrics(url: str, headers: dict) -> dict[str, float]:
    return parse_metrics(httpx.get(url + "/metrics", headers=headers, timeout=10).text)


def parse_metrics(text: str) -> dict[str, float]:
    """The `lcq:` samples of a Prometheus exposition, summed over labels (one model per server)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(lcq:[a-z0-9_]+)(\{[^}]*\})? ([0-9.eE+-]+|NaN)$", line)
        if match:
            samples[match[1]] = samples.get(match[1], 0.0) + float(match[3])
    return samples


def rss_mib(pid: int | None) -> float | None:
    """Resident memory of the server process from /proc (no psutil)."""
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model: str | None, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """Start `lcq serve` on a free local port and wait until /health answers 200."""
    port = free_port()
    command = [sys.executable, "-m", "lcq.cli", "serve", *([model] if model else []),
               "--host", "127.0.0.1", "--port", str(port), *extra]
    server = subprocess.Popen(command, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 1800  # the first demo run quantizes the model
    try:
        while time.time() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"lcq serve exited with {server.returncode}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return server, url
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise SystemExit("lcq serve did not become healthy")
    except BaseException:  # (a time limit's SIGINT too: the server, in a session of its own, would outlive us)
        stop(server)
        raise


def stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()


def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for package in ("lcq", "torch", "transformers", "httpx", "fastapi", "uvicorn"):
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return found


def device_name(url: str, headers: dict, local: bool) -> str:
    """What the server runs on: its device type from /info, named as this machine's CPU or GPU where it is local."""
    try:
        kind = httpx.get(url + "/info", headers=headers, timeout=10).json().get("model_device_type") or "cpu"
    except (httpx.HTTPError, ValueError):
        kind = "cpu"
    if kind == "cpu":
        return f"cpu: {cpu_name()}, {os.cpu_count()} cores" if local else "cpu"
    if local and shutil.which("nvidia-smi"):
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True).stdout.splitlines()
        if names:
            return names[0].strip()
    return kind


async def run_load(url: str, model: str, clients: int, args: argparse.Namespace,
                   headers: dict) -> tuple[Totals, float]:
    totals = Totals()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    timeout = httpx.Timeout(args.request_timeout, connect=30)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout) as http:
        start = time.perf_counter()
        deadline = start + args.duration
        tasks = [asyncio.create_task(client(http, model, args.seed + i, deadline, totals)) for i in range(clients)]
        _, unfinished = await asyncio.wait(tasks, timeout=args.duration + args.grace)
        for task in unfinished:  # closing the stream aborts the request in the server
            task.cancel()
            totals.count("cancelled_after_grace")
        await asyncio.gather(*unfinished, return_exceptions=True)
        return totals, time.perf_counter() - start


def wait_for_idle(url: str, headers: dict, timeout: float) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits and the KV pool is empty (or the timeout passes)."""
    deadline = time.time() + timeout
    while True:
        samples = read_metrics(url, headers)
        idle = (samples.get("lcq:num_requests_running", 0) == 0 and samples.get("lcq:num_requests_waiting", 0) == 0
                and samples.get("lcq:kv_cache_usage_perc", 0) == 0)
        if idle or time.time() > deadline:
            return samples
        time.sleep(0.5)


def report(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f} ms"


def one_round(url: str, model: str, clients: int, args: argparse.Namespace, headers: dict, pid: int | None) -> dict:
    """One load run of `clients`, then wait for the server to go idle; its counts, latencies and the server's
    memory."""
    rss_start, load_start = rss_mib(pid), os.getloadavg()[0]
    before = read_metrics(url, headers)
    totals, elapsed = asyncio.run(run_load(url, model, clients, args, headers))
    idle_start = time.perf_counter()
    after = wait_for_idle(url, headers, args.idle_timeout)
    idle_wait = time.perf_counter() - idle_start
    rss_end = rss_mib(pid)
    return {
        "clients": clients,
        "requests_completed": totals.completed,
        "status_counts": dict(sorted(totals.statuses.items())),
        "status_examples": totals.examples,
        "rejected_429": totals.statuses.get("429", 0),
        "failed": sum(n for status, n in totals.statuses.items()
                      if status not in ("200", "429", "cancelled_after_grace")),
        "elapsed_s": round(elapsed, 2),
        "output_tokens": totals.output_tokens,
        "prompt_tokens": totals.prompt_tokens,
        "output_tok_per_s": round(totals.output_tokens / elapsed, 2),
        "ttft_p50_s": percentile(totals.ttft, 50), "ttft_p99_s": percentile(totals.ttft, 99),
        "itl_p50_s": percentile(totals.itl, 50), "itl_p99_s": percentile(totals.itl, 99),
        "e2e_p50_s": percentile(totals.e2e, 50), "e2e_p99_s": percentile(totals.e2e, 99),
        "load_average_1m_start_end": [load_start, os.getloadavg()[0]],  # other work on the machine
        "server_rss_mib_start": rss_start, "server_rss_mib_end": rss_end,
        "kv_cache_usage_after": after.get("lcq:kv_cache_usage_perc"),
        "idle_wait_s": round(idle_wait, 1),
        "running_after": after.get("lcq:num_requests_running"),
        "waiting_after": after.get("lcq:num_requests_waiting"),
        "preemptions": after.get("lcq:num_preemptions_total", 0) - before.get("lcq:num_preemptions_total", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server to load (ignored with --launch)")
    parser.add_argument("--launch", nargs="?", const="", default=None, metavar="MODEL",
                        help="start `lcq serve [MODEL]` on a free port (no MODEL: the demo model)")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `lcq serve` argument (repeatable)")
    parser.add_argument("--server-pid", type=int, help="pid of the server, for RSS before and after")
    parser.add_argument("--api-key", default=os.environ.get("LCQ_API_KEY"))
    parser.add_argument("--model", help="model id (default: the first of /v1/models)")
    parser.add_argument("--clients", type=int, nargs="+", default=[128],
                        help="concurrent clients; several counts: a run at each against the same server")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds new requests are started")
    parser.add_argument("--grace", type=float, default=120.0,
                        help="seconds requests still running at the end may take before the client cancels them")
    parser.add_argument("--idle-timeout", type=float, default=180.0,
                        help="seconds to wait after the load for the server to finish aborts and free its KV blocks")
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1,
                        help="load runs in a row against the same server (memory across rounds; first one reported)")
    parser.add_argument("--label", default="", help="free text stored with the results (what this run is)")
    parser.add_argument("--output", type=Path,
                        help="default: bench/results/serve-cpu.json, or serve-gpu-<gpu>.json for a server on a GPU")
    args = parser.parse_args()
    if min(args.clients) < 1 or args.duration <= 0 or args.rounds < 1:
        parser.error("--clients and --rounds must be >= 1 and --duration > 0")
    if len(args.clients) > 1 and args.rounds > 1:
        parser.error("--rounds repeats one client count: give a single --clients with it")

    server = None
    url, pid = args.url.rstrip("/"), args.server_pid
    if args.launch is not None:
        server, url = launch(args.launch or None, args.serve_arg)
        pid = server.pid
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rounds = []
    try:
        model = args.model or httpx.get(url + "/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
        device = device_name(url, headers, local=args.launch is not None or pid is not None
                             or url.startswith(("http://127.0.0.1", "http://localhost")))
        counts = args.clients if len(args.clients) > 1 else args.clients * args.rounds
        for number, clients in enumerate(counts, 1):
            rounds.append(one_round(url, model, clients, args, headers, pid))
            if len(counts) > 1:
                print(f"run {number}/{len(counts)}: {clients} clients, {rounds[-1]['requests_completed']} requests, "
                      f"{rounds[-1]['output_tok_per_s']:.1f} output tok/s, "
                      f"RSS {rounds[-1]['server_rss_mib_start']} -> {rounds[-1]['server_rss_mib_end']} MiB", flush=True)
    finally:
        if server is not None:
            stop(server)
    results = rounds[0]
    settings = {"url": url, "launched": args.launch is not None, "model": model, "clients": args.clients,
                "duration_s": args.duration, "grace_s": args.grace, "prompt_words": PROMPT_WORDS,
                "output_tokens": OUTPUT_TOKENS,
                "serve_args": args.serve_arg, "seed": args.seed, "label": args.label}
    record = {"device": device, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "versions": versions(), "settings": settings, "results": results}
    if len(args.clients) > 1:  # one run per client count: `results` is the first
        record["rows"] = rounds
    if args.rounds > 1:  # memory across rounds on one server: the first round is `results`
        settings["rounds"] = args.rounds
        record["rounds"] = rounds
        record["server_rss_mib_after_each_round"] = [r["server_rss_mib_end"] for r in rounds]
    if args.output is None:
        on_gpu = not device.startswith("cpu")
        args.output = RESULTS / (f"serve-gpu-{re.sub(r'[^a-z0-9]+', '-', device.lower()).strip('-')}.json" if on_gpu
                                 else "serve-cpu.json")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(args.output)

    if len(args.clients) > 1:
        print("| clients | requests | output tok/s | TTFT p50 / p99 | ITL p50 / p99 |\n| --- | --- | --- | --- | --- |")
        for r in rounds:
            print(f"| {r['clients']} | {r['requests_completed']} | {r['output_tok_per_s']:.1f} | "
                  f"{fmt_ms(r['ttft_p50_s'])} / {fmt_ms(r['ttft_p99_s'])} | "
                  f"{fmt_ms(r['itl_p50_s'])} / {fmt_ms(r['itl_p99_s'])} |")
    report([
        ("device", device),
        ("model", model),
        ("clients x duration", f"{args.clients[0]} x {args.duration:g} s (+ drain: {results['elapsed_s']:.1f} s)"),
        ("completed requests", str(results["requests_completed"])),
        ("HTTP statuses", ", ".join(f"{k}: {v}" for k, v in results["status_counts"].items())),
        ("output tok/s", f"{results['output_tok_per_s']:.1f}"),
        ("TTFT p50 / p99", f"{fmt_ms(results['ttft_p50_s'])} / {fmt_ms(results['ttft_p99_s'])}"),
        ("ITL p50 / p99", f"{fmt_ms(results['itl_p50_s'])} / {fmt_ms(results['itl_p99_s'])}"),
        ("server RSS start / end", f"{results['server_rss_mib_start']} / {results['server_rss_mib_end']} MiB"
         if pid else "- (no --server-pid)"),
        *([("RSS after each round", " / ".join(f"{r['server_rss_mib_end']}" for r in rounds) + " MiB")]
          if args.rounds > 1 and pid else []),
        ("KV cache usage after", str(results["kv_cache_usage_after"])),
        ("preemptions", str(results["preemptions"])),
        ("written", str(args.output)),
    ])


if __name__ == "__main__":
    main()
