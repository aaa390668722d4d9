"""Prometheus metrics, in one registry, served on a port of their own (`PARLEY_METRICS_PORT`).

Counters and histograms are recorded where things happen (the transport's error boundary, the
generation, the event log). Gauges are read when scraped, from the live parts (admission, the
engine), so nothing has to keep them up to date. Besides Parley's own names, the gauges the
Gateway API Inference Extension's endpoint picker reads are exported under vLLM's names
(`vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc`), so a
Parley pod can sit in an InferencePool (docs/operations.md).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

REGISTRY = CollectorRegistry(auto_describe=True)

# Latency buckets (seconds): a CPU engine's time to first token runs from milliseconds to
# seconds; a GPU's inter-token latency from a few milliseconds.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 60.0)

REQUESTS = Counter("parley_requests", "RPCs answered, by RPC and HTTP status", ["rpc", "status"], registry=REGISTRY)
REQUEST_SECONDS = Histogram("parley_request_duration_seconds", "Time to answer an RPC (to its last byte)", ["rpc"],
                            buckets=_LATENCY, registry=REGISTRY)
TIME_TO_FIRST_TOKEN = Histogram("parley_time_to_first_token_seconds",
                                "From a create request's arrival to its first output token", buckets=_LATENCY,
                                registry=REGISTRY)
INTER_TOKEN = Histogram("parley_inter_token_latency_seconds",
                        "Mean time between output tokens, one observation per response", buckets=_LATENCY,
                        registry=REGISTRY)
RESPONSE_SECONDS = Histogram("parley_response_duration_seconds",
                             "From a create request's arrival to its response's end", buckets=_LATENCY,
                             registry=REGISTRY)
RESPONSES = Counter("parley_responses", "Responses finished, by project and status", ["project", "status"],
                    registry=REGISTRY)
INPUT_TOKENS = Counter("parley_input_tokens", "Prompt tokens of finished responses", ["project"], registry=REGISTRY)
CACHED_TOKENS = Counter("parley_cached_tokens", "Prompt tokens served from the KV cache", ["project"],
                        registry=REGISTRY)
OUTPUT_TOKENS = Counter("parley_output_tokens", "Output tokens of finished responses", ["project"], registry=REGISTRY)
STORE_WRITE_SECONDS = Histogram("parley_store_write_seconds", "One event-log transaction (group commit)",
                                buckets=_LATENCY, registry=REGISTRY)
STORE_READ_SECONDS = Histogram("parley_store_read_seconds", "One stored response read", buckets=_LATENCY,
                               registry=REGISTRY)
SESSIONS = Gauge("parley_sessions_open", "Open sessions (WebSocket connections and typed Session streams)",
                 registry=REGISTRY)
TURN_STATES = Counter("parley_turn_states", "previous_response_id turns whose chain's state this replica kept "
                      "(`hit`) or did not (`miss`: the chain is read from the store)", ["result"], registry=REGISTRY)
SESSION_TURNS = Counter("parley_session_turns", "Creates over sessions, by how their stream ended "
                        "(`refused`: an error before any event)", ["outcome"], registry=REGISTRY)


class LiveGauges:
    """Gauges read at scrape time from callables the app registers."""

    def __init__(self):
        self.waiting: Callable[[], int] = lambda: 0
        self.running: Callable[[], int] = lambda: 0
        self.kv_usage: Callable[[], float | None] = lambda: None
        self.engine_healthy: Callable[[], bool] = lambda: True

    def collect(self):
        waiting, running, kv = self.waiting(), self.running(), self.kv_usage()
        yield GaugeMetricFamily("parley_requests_waiting", "Generations waiting for a slot", value=waiting)
        yield GaugeMetricFamily("parley_requests_running", "Generations running", value=running)
        yield GaugeMetricFamily("parley_engine_healthy", "1 while the engine can serve", value=int(self.engine_healthy()))
        # The endpoint picker's names (vLLM's family).
        yield GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting (endpoint picker)", value=waiting)
        yield GaugeMetricFamily("vllm:num_requests_running", "Requests running (endpoint picker)", value=running)
        if kv is not None:
            yield GaugeMetricFamily("parley_kv_cache_usage_ratio", "KV cache cells in use, 0..1", value=kv)
            yield GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV cache usage, 0..1 (endpoint picker)", value=kv)


LIVE = LiveGauges()
REGISTRY.register(LIVE)


def serve(host: str, port: int):
    """The /metrics endpoint on host:port (0: a free port), on a thread of its own; returns the
    HTTP server (`server_address[1]` is the port; `shutdown()` stops it)."""
    server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    return server
