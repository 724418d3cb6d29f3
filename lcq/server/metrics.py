"""Prometheus metrics named like vLLM's (prefix `lcq:` instead of `vllm:`), so existing dashboards and
autoscalers that watch queue depth, KV usage and latency histograms work after a rename.

Each app owns its CollectorRegistry: two servers in one process (tests) never share counters.
Engine-wide state (running, waiting, KV usage, preemptions) is read from engine.stats() at scrape time.
"""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lcq.runtime.outputs import RequestOutput

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
FINISH_REASONS = ("stop", "length")  # of requests that succeed
REJECTION_REASONS = ("queue_full", "not_ready", "model_not_found", "invalid_request")  # Generation.submit's
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class EngineStatsCollector:
    """Gauges (and the preemption and draft counters) that mirror the engine's own state when Prometheus
    scrapes."""

    def __init__(self, stats: Callable[[], object | None], model_name: str):
        self.stats = stats
        self.model_name = model_name

    def collect(self):
        stats = self.stats()
        values = {
            "num_requests_running": getattr(stats, "num_running", 0),
            "num_requests_waiting": getattr(stats, "num_waiting", 0),
            "kv_cache_usage_perc": getattr(stats, "kv_cache_usage", 0.0),
        }
        for name, value in values.items():
            gauge = GaugeMetricFamily(f"lcq:{name}", name.replace("_", " "), labels=["model_name"])
            gauge.add_metric([self.model_name], float(value))
            yield gauge
        counters = {
            "num_preemptions": ("requests preempted to free KV blocks", "num_preemptions_total"),
            "spec_decode_num_drafts": ("sequence steps that verified drafts (speculative decoding; mean tokens per "
                                       "drafted step: 1 + accepted tokens / drafts)", "num_drafts_total"),
            "spec_decode_num_draft_tokens": ("draft tokens verified (speculative decoding)", "num_draft_tokens_total"),
            "spec_decode_num_accepted_tokens": ("draft tokens accepted", "num_accepted_tokens_total"),
        }
        for name, (doc, field) in counters.items():
            counter = CounterMetricFamily(f"lcq:{name}", doc, labels=["model_name"])
            counter.add_metric([self.model_name], float(getattr(stats, field, 0)))
            yield counter

    def describe(self):
        return []  # collected lazily: describing would call the engine at registration time


class ServerMetrics:
    """Every metric the server exports, with `model_name` bound once."""

    def __init__(self, model_name: str, engine_stats: Callable[[], object | None]):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(f"lcq:{name}", doc, labels + list(extra), registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"lcq:{name}", doc, labels, buckets=buckets, registry=self.registry)

        self.prompt_tokens = counter("prompt_tokens", "prompt tokens computed (counted at a request's first token; per choice of n)")
        self.generation_tokens = counter("generation_tokens", "generated tokens")
        self.request_success = counter("request_success", "finished requests by finish reason", ("finished_reason",))
        self.request_aborted = counter("request_aborted", "requests aborted (client gone, shutdown)")
        self.request_errors = counter("request_error", "requests that failed inside the engine")
        self.request_rejected = counter("request_rejected", "requests refused before running", ("reason",))
        self.http_requests = counter("http_requests", "HTTP responses by status", ("status",))
        self.prefix_cache_queries = counter("prefix_cache_queries", "prompt tokens of finished requests looked up "
                                            "in the prefix cache")
        self.prefix_cache_hits = counter("prefix_cache_hits", "prompt tokens served from the prefix cache")
        self.ttft = histogram("time_to_first_token_seconds", "arrival to first token", LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "time between generated tokens", LATENCY_BUCKETS)
        # vLLM's older name of the same (its dashboards before 0.11 plot it)
        self.tpot = histogram("time_per_output_token_seconds", "time between generated tokens", LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "arrival to first scheduled", LATENCY_BUCKETS)
        self.prefill_time = histogram("request_prefill_time_seconds", "first scheduled to first token",
                                      LATENCY_BUCKETS)
        # Of requests that finished (not aborted, not failed):
        self.e2e = histogram("e2e_request_latency_seconds", "arrival to last token", LATENCY_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds", "first token to last token", LATENCY_BUCKETS)
        self.inference_time = histogram("request_inference_time_seconds", "first scheduled to last token",
                                        LATENCY_BUCKETS)
        self.prompt_len = histogram("request_prompt_tokens", "prompt tokens per request", TOKEN_BUCKETS)
        self.generation_len = histogram("request_generation_tokens", "generated tokens per request", TOKEN_BUCKETS)
        self.registry.register(EngineStatsCollector(engine_stats, model_name))
        # Every series from the start, at 0 (as vLLM's): a series that first appears at 1 has no increase to
        # rate(), so the first error, abort or 429 of a process would never show
        for metric in (self.prompt_tokens, self.generation_tokens, self.request_aborted, self.request_errors,
                       self.prefix_cache_queries, self.prefix_cache_hits, self.ttft, self.itl, self.tpot,
                       self.queue_time, self.prefill_time, self.e2e, self.decode_time, self.inference_time,
                       self.prompt_len, self.generation_len):
            metric.labels(model_name)
        for reason in FINISH_REASONS:
            self.request_success.labels(model_name, reason)
        for reason in REJECTION_REASONS:
            self.request_rejected.labels(model_name, reason)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def rejected(self, reason: str) -> None:
        self.request_rejected.labels(self.model_name, reason).inc()

    def http_response(self, status: int) -> None:
        self.http_requests.labels(self.model_name, str(status)).inc()

    def track(self, prompt_tokens: int, counts_output: bool = True) -> "RequestTracker":
        return RequestTracker(self, prompt_tokens, counts_output)


class RequestTracker:
    """Latency and token accounting of one engine request, fed with each delta it streams. Times are the
    engine's (RequestOutput.elapsed and the first delta's queue and first-token times, from the request's
    arrival), so a client that reads slowly does not stretch them."""

    def __init__(self, metrics: ServerMetrics, prompt_tokens: int, counts_output: bool = True):
        self.metrics = metrics
        self.prompt_tokens = prompt_tokens
        self.counts_output = counts_output  # False: the tokens made are dropped (a scored prompt's): none counted
        self.prompt_counted = False
        self.queue_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token: float | None = None  # when the engine made the latest delta with tokens
        self.generated = 0
        self.done = False

    def observe(self, out: RequestOutput) -> None:
        m, name = self.metrics, self.metrics.model_name
        if out.first_token_time is not None:  # the first delta: the prompt has been computed
            self.queue_time, self.first_token_time = out.queue_time or 0.0, out.first_token_time
            m.ttft.labels(name).observe(self.first_token_time)
            m.queue_time.labels(name).observe(self.queue_time)
            m.prefill_time.labels(name).observe(self.first_token_time - self.queue_time)
            self._count_prompt()
        new_tokens = len(out.token_ids) if self.counts_output else 0
        if new_tokens:
            if self.last_token is not None and out.elapsed is not None:
                gap = (out.elapsed - self.last_token) / new_tokens
                for _ in range(new_tokens):
                    m.itl.labels(name).observe(gap)
                    m.tpot.labels(name).observe(gap)
            self.last_token = out.elapsed
            self.generated += new_tokens
            m.generation_tokens.labels(name).inc(new_tokens)
        if out.finish_reason is not None:
            if out.usage is not None:  # the hit rate a vLLM dashboard plots as hits / queries
                m.prefix_cache_queries.labels(name).inc(out.usage.prompt_tokens)
                m.prefix_cache_hits.labels(name).inc(out.usage.cached_tokens)
            self.finish(out.finish_reason, out.elapsed)

    def finish(self, reason: str, elapsed: float | None = None) -> None:
        """Count the request's end once: an abort or an engine error, or a success by reason with its
        lengths and latencies (an aborted request's time is its client's patience, not the server's)."""
        if self.done:
            return
        self.done = True
        m, name = self.metrics, self.metrics.model_name
        if reason == "abort":
            m.request_aborted.labels(name).inc()
            return
        if reason == "error":
            m.request_errors.labels(name).inc()
            return
        m.request_success.labels(name, reason).inc()
        self._count_prompt()
        m.prompt_len.labels(name).observe(self.prompt_tokens)
        m.generation_len.labels(name).observe(self.generated)
        if elapsed is not None:
            m.e2e.labels(name).observe(elapsed)
            if self.first_token_time is not None:
                m.decode_time.labels(name).observe(elapsed - self.first_token_time)
                m.inference_time.labels(name).observe(elapsed - self.queue_time)

    def discard(self) -> None:
        """Count nothing: the API request was refused as a whole (another of its choices was)."""
        self.done = True

    def _count_prompt(self) -> None:
        """Prompt tokens count once computed: at the first token, or at the end of a request that
        generates none (an embedding)."""
        if not self.prompt_counted:
            self.prompt_counted = True
            self.metrics.prompt_tokens.labels(self.metrics.model_name).inc(self.prompt_tokens)


STATS_LOG_INTERVAL = 10.0  # seconds between activity lines (vLLM's VLLM_LOG_STATS_INTERVAL)


class ActivityLog:
    """The line the server logs every STATS_LOG_INTERVAL seconds while it has work, as vLLM's engine does (off with
    --disable-log-stats): prompt and generation throughput over the interval, requests running and waiting, KV
    cache usage and the prefix cache's hit rate over the interval; nothing while idle."""

    COUNTERS = ("prompt_tokens", "generation_tokens", "prefix_cache_queries", "prefix_cache_hits")

    def __init__(self, metrics: ServerMetrics, engine_stats: Callable[[], object | None]):
        self.metrics, self.engine_stats = metrics, engine_stats
        self.since, self.before = time.monotonic(), self._totals()

    def _totals(self) -> dict[str, float]:
        """Each counter summed over its labels (the base model's names and the adapters')."""
        return {name: sum(sample.value for family in getattr(self.metrics, name).collect()
                          for sample in family.samples if sample.name.endswith("_total"))
                for name in self.COUNTERS}

    def line(self) -> str | None:
        """The interval's line since the last call, or None when nothing ran, waited or finished in it."""
        now, totals, stats = time.monotonic(), self._totals(), self.engine_stats()
        seconds = max(now - self.since, 1e-9)
        delta = {name: totals[name] - self.before[name] for name in self.COUNTERS}
        self.since, self.before = now, totals
        running, waiting = getattr(stats, "num_running", 0), getattr(stats, "num_waiting", 0)
        if not (running or waiting or any(delta.values())):
            return None
        queries = delta["prefix_cache_queries"]
        hit_rate = f"{100 * delta['prefix_cache_hits'] / queries:.1f}%" if queries else "-"
        return (f"prompt throughput {delta['prompt_tokens'] / seconds:.1f} tokens/s, generation throughput "
                f"{delta['generation_tokens'] / seconds:.1f} tokens/s, running {running} reqs, waiting {waiting} "
                f"reqs, KV cache usage {100 * getattr(stats, 'kv_cache_usage', 0.0):.1f}%, prefix cache hit rate "
                f"{hit_rate}")
