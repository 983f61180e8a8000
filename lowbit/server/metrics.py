"""Prometheus metrics, in a registry of the server's own (not the process-global one), named as vLLM names its
own with a `lowbit:` prefix."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the /metrics route)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = {"model_name": model_name}
        self.num_requests_running = Gauge("lowbit:num_requests_running", "Requests in the running batch",
                                          labelnames=["model_name"], registry=r).labels(**labels)
        self.num_requests_running_max = Gauge(
            "lowbit:num_requests_running_max", "The most requests ever in one running batch",
            labelnames=["model_name"], registry=r).labels(**labels)
        self.num_requests_waiting = Gauge("lowbit:num_requests_waiting", "Requests waiting to be scheduled",
                                          labelnames=["model_name"], registry=r).labels(**labels)
        self.kv_cache_usage_perc = Gauge("lowbit:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)",
                                         labelnames=["model_name"], registry=r).labels(**labels)
        self.batch_size = Histogram("lowbit:batch_size", "Sequences run together in one engine step",
                                    labelnames=["model_name"], buckets=_BATCH_BUCKETS, registry=r).labels(**labels)
        self.prompt_tokens = Counter("lowbit:prompt_tokens", "Prompt tokens processed",
                                     labelnames=["model_name"], registry=r).labels(**labels)
        self.generation_tokens = Counter("lowbit:generation_tokens", "Tokens generated",
                                         labelnames=["model_name"], registry=r).labels(**labels)
        self.time_to_first_token = Histogram(
            "lowbit:time_to_first_token_seconds", "Time from arrival to the first generated token",
            labelnames=["model_name"], buckets=_LATENCY_BUCKETS, registry=r).labels(**labels)
        self.time_per_output_token = Histogram(
            "lowbit:time_per_output_token_seconds", "Mean time per generated token after the first, per request",
            labelnames=["model_name"], buckets=_LATENCY_BUCKETS, registry=r).labels(**labels)
        self.e2e_request_latency = Histogram(
            "lowbit:e2e_request_latency_seconds", "Time from arrival to the last token",
            labelnames=["model_name"], buckets=_LATENCY_BUCKETS, registry=r).labels(**labels)
        self.request_success = Counter("lowbit:request_success", "Engine requests finished, by reason",
                                       labelnames=["model_name", "finished_reason"], registry=r)
        self.http_requests = Counter("lowbit:http_requests", "HTTP requests answered, by route and status",
                                     labelnames=["method", "path", "status"], registry=r)
        self._model_name = model_name
        self._running_max = 0

    def observe_step(self, num_running: int, num_waiting: int, kv_usage: float, batch_size: int) -> None:
        self.num_requests_running.set(num_running)
        self.num_requests_waiting.set(num_waiting)
        self.kv_cache_usage_perc.set(kv_usage)
        if batch_size:
            self.batch_size.observe(batch_size)
        if num_running > self._running_max:
            self._running_max = num_running
            self.num_requests_running_max.set(num_running)

    def observe_finished(self, reason: str, ttft: float | None, e2e: float, num_output_tokens: int) -> None:
        self.request_success.labels(model_name=self._model_name, finished_reason=reason).inc()
        self.e2e_request_latency.observe(e2e)
        if ttft is not None:
            self.time_to_first_token.observe(ttft)
            if num_output_tokens > 1:
                self.time_per_output_token.observe((e2e - ttft) / (num_output_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
