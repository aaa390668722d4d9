"""Serving path: Parley on the synthetic engine vs a minimal grpc.aio baseline, both behind Envoy.

  python bench/serving.py [--levels 1,16,64,256] [--seconds 10] [--tokens 256]
                          [--paced-rate 100] [--paced-levels 1,8] [--message-cost-streams 64]

For each concurrency level, Parley then the baseline (both stay up and take turns, so drift in
the shared machine's speed hits both alike): streamed tokens/s (delta events received), TTFT
and ITL p50/p99, and server and Envoy CPU seconds per 1,000 tokens. The same again with tokens
paced as a small model on CPU emits them (one message per token): what the serving path costs
beside an engine that shares its cores. Then gRPC's and Envoy's own cost per response and per
message (the baseline's frames regrouped into 3 to 32 messages), the resident memory of an
idle open stream, and the pipeline's own CPU per token with no transport at all (the ceiling
any transport meets). Last, what durability costs: Parley with `acknowledged` durability (the
default: a response's id and its terminal event leave only once stored, SQLite synchronous=FULL)
against `relaxed` (write-behind), taking turns at each level.
The load generator shares the machine with what it measures (2 cores here): the numbers
include that competition, for Parley and the baseline alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import orjson
from google.api import httpbody_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_seconds, free_port, rss_bytes, save, start, stop  # noqa: E402
from loadgen import request_bytes, run_load  # noqa: E402
from parley import config  # noqa: E402
from parley.cli import GIL_SWITCH_INTERVAL_S  # noqa: E402
from parley.gateway import Envoy  # noqa: E402
from parley.v1 import service_pb2_grpc  # noqa: E402

MODEL = "synthetic"


def parley_command(port: int, store: str, tokens: int, rate: float = 0,
                   durability: str = "acknowledged") -> tuple[list[str], dict]:
    env = {"PARLEY_ENGINE": "synthetic", "PARLEY_MODEL_NAME": MODEL, "PARLEY_GRPC_PORT": str(port), "PARLEY_METRICS_PORT": "0", "PARLEY_WEBSOCKET_PORT": "0",
           "PARLEY_DURABILITY": durability,
           "PARLEY_STORE_PATH": store, "PARLEY_SYNTHETIC_OUTPUT_TOKENS": str(tokens),
           "PARLEY_SYNTHETIC_TOKENS_PER_SECOND": str(rate), "PARLEY_LOG_LEVEL": "warning",
           "PARLEY_LOG_FORMAT": "json", "PARLEY_MAX_CONCURRENT_GENERATIONS": "1024",
           "PARLEY_MAX_QUEUED_GENERATIONS": "1024"}
    return [sys.executable, "-m", "parley", "serve"], env


async def capture_batches(port: int, body: bytes) -> list[list[str]]:
    """The SSE frames of one Parley response, grouped as Parley sent them (one list per message)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = service_pb2_grpc.ResponsesHttpStub(channel)
        messages = [m.data.decode() async for m in stub.HttpCreateResponse(
            httpbody_pb2.HttpBody(content_type="application/json", data=body))]
    return [[frame + "\n\n" for frame in message.split("\n\n") if frame] for message in messages]


async def measure(target: str, server_pid: int, envoy: Envoy, body: bytes, level: int, seconds: float) -> dict:
    port = envoy.settings.http_port
    await run_load("127.0.0.1", port, body, level, seconds=1.0, warmup=0)  # warm connections and caches
    before = (cpu_seconds(server_pid), cpu_seconds(envoy.process.pid), time.perf_counter())
    result = await run_load("127.0.0.1", port, body, level, seconds=seconds, warmup=0)
    server_cpu = cpu_seconds(server_pid) - before[0]
    envoy_cpu = cpu_seconds(envoy.process.pid) - before[1]
    thousands = max(result["deltas"], 1) / 1000
    result.update(target=target, concurrency=level, server_cpu_s=round(server_cpu, 3), envoy_cpu_s=round(envoy_cpu, 3),
                  server_cpu_s_per_1k_tokens=round(server_cpu / thousands, 4),
                  envoy_cpu_s_per_1k_tokens=round(envoy_cpu / thousands, 4),
                  tokens_per_second=round(result["tokens_per_second"], 1), seconds=round(result["seconds"], 2))
    print(json.dumps(result), flush=True)
    return result


async def idle_stream_memory(workdir: Path, tokens: int, streams: int) -> dict:
    """RSS growth of the server per open stream that is waiting for its next token."""
    port = free_port()
    command, env = parley_command(port, str(workdir / "idle.sqlite3"), tokens, rate=0.02)
    server = start(command, env, "listening on")
    envoy = None
    try:
        envoy = gateway(port)
        body = orjson.dumps({"model": MODEL, "input": "hello", "stream": True, "max_output_tokens": tokens})
        payload = request_bytes("127.0.0.1", envoy.settings.http_port, body)
        await asyncio.sleep(1)
        baseline = rss_bytes(server.pid)
        connections = []
        for _ in range(streams):
            reader, writer = await asyncio.open_connection("127.0.0.1", envoy.settings.http_port)
            writer.write(payload)
            connections.append((reader, writer))
        for reader, _ in connections:  # every stream is open once its first token arrived
            await reader.readuntil(b"response.output_text.delta")
        await asyncio.sleep(1)
        grown = rss_bytes(server.pid) - baseline
        for _, writer in connections:
            writer.close()
        return {"streams": streams, "server_rss_before_mb": round(baseline / 2**20, 1),
                "server_rss_growth_mb": round(grown / 2**20, 2), "kib_per_idle_stream": round(grown / streams / 1024, 1)}
    finally:
        if envoy is not None:
            envoy.stop()
        stop(server)


async def pipeline_ceiling(workdir: Path, tokens: int, streams: int = 64, per_stream: int = 4) -> dict:
    """Parley's per-token work with no transport: the service pipeline (events, sequence numbers,
    JSON, persistence to SQLite) and the SSE framing the REST servicer applies, in this process on
    the synthetic engine. Its CPU per token bounds what any transport in front of it can reach."""
    from parley.engine.synthetic import SyntheticEngine
    from parley.log import configure
    from parley.service.admission import Admission
    from parley.service.responses import ResponsesService
    from parley.store.sqlite import SqliteStore

    # The very helpers the REST servicer streams through (private to transport/ otherwise).
    from parley.transport.servicers import _coalesced, _sse_messages

    configure(level="warning")
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # as `parley serve` runs
    store = SqliteStore(workdir / "pipeline.sqlite3")
    await store.open()
    service = ResponsesService(SyntheticEngine(MODEL, output_tokens=tokens), store, admission=Admission(streams, 0))

    async def stream() -> None:
        for _ in range(per_stream):
            prepared = await service.prepare("default", {"model": MODEL, "input": "Write a story.", "stream": True})
            async for _message in _sse_messages(_coalesced(service.run(prepared))):
                pass

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(stream() for _ in range(streams)))
    await service.drain()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    await store.close()
    sys.setswitchinterval(switch_interval)
    produced = streams * per_stream * tokens
    return {"streams": streams, "tokens": produced, "tokens_per_second": round(produced / elapsed),
            "cpu_us_per_token": round(cpu / produced * 1e6, 2)}


def start_baseline(port: int, events: Path, rate: float = 0) -> subprocess.Popen:
    """bench/baseline_server.py on `port`, sending the messages in `events` (paced at `rate`
    tokens/s per stream; 0: as fast as it can)."""
    return start([sys.executable, str(Path(__file__).parent / "baseline_server.py"), str(port), str(events), str(rate)],
                 {}, "listening on")


async def side_by_side(workdir: Path, body: bytes, tokens: int, rate: float, levels: list[int],
                       seconds: float) -> tuple[list[dict], list[list[str]]]:
    """Parley on the synthetic engine (paced at `rate` tokens/s per stream; 0: unpaced) and the
    baseline sending Parley's own messages at the same pace, each behind its own Envoy, taking
    turns at every level. Returns the runs and the messages of one Parley response."""
    runs = []
    grpc_port, baseline_port = free_port(), free_port()
    command, env = parley_command(grpc_port, str(workdir / f"bench-{rate:g}.sqlite3"), tokens, rate)
    server = baseline = None
    gateways: list[Envoy] = []
    try:
        server = start(command, env, "listening on")
        batches = await capture_batches(grpc_port, body)
        events = workdir / f"events-{rate:g}.json"
        events.write_text(json.dumps(batches))
        baseline = start_baseline(baseline_port, events, rate)
        targets = [("parley", server, gateway(grpc_port)), ("baseline", baseline, gateway(baseline_port))]
        gateways = [envoy for _, _, envoy in targets]
        for level in levels:
            for target, process, envoy in targets:
                runs.append(await measure(target, process.pid, envoy, body, level, seconds))
    finally:
        for envoy in gateways:
            envoy.stop()
        stop(server)
        stop(baseline)
    return runs, batches


async def message_cost(workdir: Path, body: bytes, batches: list[list[str]], level: int,
                       seconds: float, groupings: tuple[int, ...] = (3, 8, 16, 32)) -> dict:
    """What gRPC and Envoy cost per response and per message, with no Parley logic at all: the
    baseline sends one Parley response's frames regrouped into N messages, and a least-squares
    line through CPU per response against N splits the cost into a fixed part and a part per
    message."""
    frames = [frame for batch in batches for frame in batch]
    points = []
    for count in groupings:
        size = -(-len(frames) // count)
        groups = [frames[start:start + size] for start in range(0, len(frames), size)]
        events = workdir / f"events-{len(groups)}-messages.json"
        events.write_text(json.dumps(groups))
        port = free_port()
        baseline = start_baseline(port, events)
        envoy = None
        try:
            envoy = gateway(port)
            run = await measure(f"baseline, {len(groups)} messages", baseline.pid, envoy, body, level, seconds)
        finally:
            if envoy is not None:
                envoy.stop()
            stop(baseline)
        responses = max(run["requests"], 1)
        points.append((len(groups), run["server_cpu_s"] / responses * 1e6, run["envoy_cpu_s"] / responses * 1e6))

    def line(values: list[float]) -> tuple[float, float]:
        counts = [point[0] for point in points]
        mean_count, mean_value = sum(counts) / len(counts), sum(values) / len(values)
        slope = (sum((c - mean_count) * (v - mean_value) for c, v in zip(counts, values, strict=True))
                 / sum((c - mean_count) ** 2 for c in counts))
        return mean_value - slope * mean_count, slope

    server_fixed, server_per_message = line([point[1] for point in points])
    envoy_fixed, envoy_per_message = line([point[2] for point in points])
    return {"streams": level, "points": [{"messages": n, "server_cpu_us_per_response": round(server, 1),
                                           "envoy_cpu_us_per_response": round(envoy, 1)} for n, server, envoy in points],
            "server_us_per_response": round(server_fixed), "server_us_per_message": round(server_per_message, 1),
            "envoy_us_per_response": round(envoy_fixed), "envoy_us_per_message": round(envoy_per_message, 1)}


async def durability_cost(workdir: Path, body: bytes, tokens: int, levels: list[int], seconds: float) -> list[dict]:
    """Parley acknowledged (the default) and relaxed, each behind its own Envoy, taking turns."""
    runs = []
    servers, gateways = [], []
    try:
        for durability in ("acknowledged", "relaxed"):
            port = free_port()
            command, env = parley_command(port, str(workdir / f"durability-{durability}.sqlite3"), tokens,
                                          durability=durability)
            servers.append((durability, start(command, env, "listening on")))
            gateways.append(gateway(port))
        for level in levels:
            for (durability, server), envoy in zip(servers, gateways, strict=True):
                runs.append(await measure(f"parley, {durability}", server.pid, envoy, body, level, seconds))
    finally:
        for envoy in gateways:
            envoy.stop()
        for _, server in servers:
            stop(server)
    return runs


def gateway(grpc_port: int, *others: int, **overrides) -> Envoy:
    """A started Envoy in front of the server on `grpc_port` (and replicas on `others`)."""
    settings = config.load(environ={}, **{"http_port": free_port(), "envoy_admin_port": free_port(),
                                          "grpc_port": grpc_port, **overrides})
    envoy = Envoy(settings, grpc_port, tuple(f"127.0.0.1:{port}" for port in others))
    envoy.start()
    return envoy


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,16,64,256")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--idle-streams", type=int, default=200)
    parser.add_argument("--paced-rate", type=float, default=100,
                        help="tokens/s per stream of the paced runs (a small model on CPU: ~100)")
    parser.add_argument("--paced-levels", default="1,8")
    parser.add_argument("--message-cost-streams", type=int, default=64)
    parser.add_argument("--durability-levels", default="1,64")
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]
    body = orjson.dumps({"model": MODEL, "input": "Write a story.", "stream": True, "max_output_tokens": args.tokens})
    workdir = Path(tempfile.mkdtemp(prefix="parley-bench-"))
    # First, while this process holds nothing else: the load generator's latency lists would
    # otherwise make every garbage collection here slower.
    ceiling = await pipeline_ceiling(workdir, args.tokens)
    print(json.dumps({"pipeline_ceiling": ceiling}), flush=True)
    # Both servers stay up, each behind its own Envoy, and take turns at every level: the
    # machine's speed drifts over minutes, and a ratio must compare like with like.
    runs, batches = await side_by_side(workdir, body, args.tokens, 0, levels, args.seconds)
    # At a CPU model's pace every token is a message of its own: what the serving path costs
    # then is CPU taken from an engine that needs the same cores.
    paced_levels = [int(level) for level in args.paced_levels.split(",")]
    paced_runs, paced_batches = await side_by_side(workdir, body, args.tokens, args.paced_rate, paced_levels,
                                                   args.seconds)
    grpc_cost = await message_cost(workdir, body, batches, args.message_cost_streams, args.seconds)
    print(json.dumps({"message_cost": grpc_cost}), flush=True)
    memory = await idle_stream_memory(workdir, args.tokens, args.idle_streams)
    print(json.dumps(memory), flush=True)
    durability_levels = [int(level) for level in args.durability_levels.split(",")]
    durability = await durability_cost(workdir, body, args.tokens, durability_levels, args.seconds)
    ratios = {}
    for level in levels:
        parley_run = next(r for r in runs if r["target"] == "parley" and r["concurrency"] == level)
        base_run = next(r for r in runs if r["target"] == "baseline" and r["concurrency"] == level)
        ratios[str(level)] = {
            "tokens_per_second_ratio": round(parley_run["tokens_per_second"] / base_run["tokens_per_second"], 3),
            "added_ttft_p50_ms": round(parley_run["ttft_ms"]["p50"] - base_run["ttft_ms"]["p50"], 3)}
    path = save("serving", {"parameters": {"levels": levels, "seconds": args.seconds, "output_tokens": args.tokens,
                                           "messages_per_response": len(batches),
                                           "events_per_response": sum(len(b) for b in batches)},
                            "runs": runs, "idle_stream_memory": memory, "pipeline_ceiling": ceiling,
                            "parley_vs_baseline": ratios,
                            "message_cost": grpc_cost, "durability": durability,
                            "paced": {"tokens_per_second_per_stream": args.paced_rate,
                                      "messages_per_response": len(paced_batches), "runs": paced_runs}})
    print(f"wrote {path}")


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(main())
