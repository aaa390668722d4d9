"""Can one Parley process front a batching GPU? The synthetic engine in lockstep mode.

A GPU engine steps on its own clock and gives every running sequence one token per step. The
synthetic engine's lockstep mode (PARLEY_SYNTHETIC_STEP_MS) does the same without a model, so
this measures the serving path (Parley's pipeline, gRPC, Envoy's transcoder, SSE) at the rhythm
an H200 would feed it: 256, 1,024 and 2,048 streams at once, 20 ms and 10 ms steps, through
Envoy, on this machine's cores. Per run: delivered tokens/s against what the engine produced,
time to first token, inter-token latency p50/p99 (as the client sees it), server and Envoy CPU
per 1,000 tokens, and memory per stream. The target (issue 16): 1,024 streams at 50,000 tokens/s
or more with p99 inter-token latency at most 40 ms (two steps).

    python bench/lockstep.py [--steps 20,10] [--levels 256,1024,2048] [--seconds 10]
        [--processes 1,2] [--shared-engine 1,2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import cpu_seconds, free_port, rss_bytes, save, start, stop  # noqa: E402
from loadgen import run_load  # noqa: E402
from serving import MODEL, capture_batches, gateway, parley_command, start_baseline  # noqa: E402

TARGET = {"streams": 1024, "tokens_per_second": 50_000, "itl_p99_ms": 40}


def client_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def peak_rss(pids: list[int], stop_at: float) -> int:
    peak = 0
    while time.perf_counter() < stop_at:
        peak = max(peak, sum(map(rss_bytes, pids)))
        await asyncio.sleep(0.5)
    return peak


def start_parley(step_ms: float, level: int, tokens: int, workdir: Path, durability: str, dsn: str | None = None,
                 engine_socket: str | None = None):
    """One serving process; with `engine_socket`, one that generates through the engine process
    listening there (engine `remote`) instead of its own synthetic engine."""
    port = free_port()
    command, env = parley_command(port, str(workdir / f"lockstep-{step_ms}-{level}-{durability}.sqlite3"), tokens,
                                  durability=durability)
    env.update(PARLEY_SYNTHETIC_STEP_MS=str(step_ms), PARLEY_MAX_CONCURRENT_GENERATIONS=str(level * 2),
               PARLEY_MAX_QUEUED_GENERATIONS=str(level * 2))
    if engine_socket:
        env = {name: value for name, value in env.items() if not name.startswith("PARLEY_SYNTHETIC_")}
        env.update(PARLEY_ENGINE="remote", PARLEY_ENGINE_SOCKET=engine_socket)
    if dsn:
        env["PARLEY_STORE_DSN"] = dsn
    return port, start(command, env, "listening on")


def start_engine_process(step_ms: float, tokens: int, socket_path: str):
    """`parley engine`: the lockstep synthetic engine alone in its process, as a GPU engine would
    be, for the serving processes to share."""
    _, env = parley_command(0, "", tokens)
    env = {name: value for name, value in env.items() if name.startswith(("PARLEY_SYNTHETIC_", "PARLEY_LOG_"))}
    env.update(PARLEY_ENGINE="synthetic", PARLEY_MODEL_NAME=MODEL, PARLEY_SYNTHETIC_STEP_MS=str(step_ms),
               PARLEY_ENGINE_SOCKET=socket_path)
    return start([sys.executable, "-m", "parley", "engine"], env, "listening on")


async def lockstep_messages(tokens: int, workdir: Path) -> Path:
    """The SSE messages of one lockstep response as Parley sends them (one token each), for
    the baseline server to replay."""
    port, server = start_parley(20, 1, tokens, workdir, "relaxed")
    try:
        body = orjson.dumps({"model": MODEL, "input": "Write a story.", "stream": True, "max_output_tokens": tokens})
        batches = await capture_batches(port, body)
    finally:
        stop(server)
    path = workdir / "lockstep-events.json"
    path.write_text(json.dumps(batches))
    return path


async def measure(step_ms: float, level: int, tokens: int, seconds: float, workdir: Path,
                  durability: str = "acknowledged", baseline_events: Path | None = None, processes: int = 1,
                  dsn: str | None = None, shared_engine: bool = False) -> dict:
    """One run: Parley (lockstep synthetic engine), or with `baseline_events` the minimal
    grpc.aio server replaying the same messages at the same pace, behind the same Envoy. With
    `processes` > 1, that many Parley processes on one PostgreSQL (`dsn`) behind the one Envoy:
    the serving path spread over processes (each with its own event loop and GIL). With
    `shared_engine`, those processes generate through one engine process (`parley engine`) as
    they would share one GPU, instead of each running an engine of its own."""
    servers = []
    engine = None
    if shared_engine:
        socket_path = str(Path(tempfile.mkdtemp(prefix="parley-engine-", dir="/tmp")) / "engine.sock")
        engine = start_engine_process(step_ms, tokens, socket_path)
    if baseline_events is not None:
        port = free_port()
        servers.append(start_baseline(port, baseline_events, 1000 / step_ms))
        ports = [port]
    else:
        ports = []
        for _ in range(processes):
            port, server = start_parley(step_ms, level, tokens, workdir, durability, dsn,
                                        engine_socket=socket_path if shared_engine else None)
            ports.append(port)
            servers.append(server)
    envoy = None
    try:
        envoy = gateway(*ports)
        body = orjson.dumps({"model": MODEL, "input": "Write a story.", "stream": True, "max_output_tokens": tokens})
        await asyncio.sleep(0.5)
        pids = [server.pid for server in servers]
        engine_pid = engine.pid if engine is not None else None
        engine_before = cpu_seconds(engine_pid) if engine_pid else 0.0
        idle_rss = sum(map(rss_bytes, pids))
        # The warm-up lets every client's first response start (they all arrive at once), so the
        # measured window holds steady state: streams at every stage of their responses.
        warmup = 2 + tokens * step_ms / 1000 / 2
        before = (sum(map(cpu_seconds, pids)), cpu_seconds(envoy.process.pid), client_cpu_seconds())
        sampler = asyncio.create_task(peak_rss(pids, time.perf_counter() + warmup + seconds))
        result = await run_load("127.0.0.1", envoy.settings.http_port, body, level, seconds=seconds, warmup=warmup)
        peak = await sampler
        server_cpu = sum(map(cpu_seconds, pids)) - before[0]
        envoy_cpu = cpu_seconds(envoy.process.pid) - before[1]
        client_cpu = client_cpu_seconds() - before[2]
        engine_cpu = cpu_seconds(engine_pid) - engine_before if engine_pid else 0.0
        elapsed = warmup + result["seconds"]  # CPU was counted over the warm-up too
        # What the engine hands out at this many streams: one token per stream per step.
        produced = level * 1000 / step_ms
        delivered = result["tokens_per_second"]
        run = {"target": "baseline" if baseline_events is not None else "parley", "step_ms": step_ms,
               "streams": level, "durability": durability if baseline_events is None else None,
               "processes": len(servers), "engine": "shared process" if shared_engine else "in each process",
               "store": "postgresql" if dsn and baseline_events is None else "sqlite",
               "engine_tokens_per_second": round(produced),
               "tokens_per_second": round(delivered), "delivered_share": round(delivered / produced, 3),
               "ttft_ms": result["ttft_ms"], "itl_ms": result["itl_ms"], "requests": result["requests"],
               "errors": result["errors"],
               "server_cores": round(server_cpu / elapsed, 2), "envoy_cores": round(envoy_cpu / elapsed, 2),
               "client_cores": round(client_cpu / elapsed, 2),
               "engine_process_cores": round(engine_cpu / elapsed, 2) if shared_engine else None,
               "server_cpu_ms_per_1k_tokens": round(server_cpu / elapsed / max(delivered, 1) * 1e6, 2),
               "envoy_cpu_ms_per_1k_tokens": round(envoy_cpu / elapsed / max(delivered, 1) * 1e6, 2),
               "server_rss_idle_mb": round(idle_rss / 2**20, 1), "server_rss_peak_mb": round(peak / 2**20, 1),
               "server_kib_per_stream": round((peak - idle_rss) / level / 1024, 1)}
        print(json.dumps(run), flush=True)
        return run
    finally:
        if envoy is not None:
            envoy.stop()
        for server in servers:
            stop(server)
        stop(engine)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="20,10", help="engine step times, ms")
    parser.add_argument("--levels", default="256,1024,2048", help="concurrent streams")
    parser.add_argument("--tokens", type=int, default=256, help="output tokens per response")
    parser.add_argument("--seconds", type=float, default=10, help="measured seconds per run (after a warm-up)")
    parser.add_argument("--durability", default="acknowledged,relaxed",
                        help="PARLEY_DURABILITY of each run; relaxed (writes behind, not for production) shows "
                             "what storing the stream costs")
    parser.add_argument("--processes", default="",
                        help="also run Parley as this many processes on one PostgreSQL behind one Envoy (e.g. 1,2), "
                             "at 20 ms steps: the serving path scaled out")
    parser.add_argument("--shared-engine", default="",
                        help="also run this many serving processes (e.g. 1,2) sharing one engine process "
                             "(`parley engine`, engine remote) on one PostgreSQL, at 20 ms steps")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="parley-lockstep-"))
    events = await lockstep_messages(args.tokens, workdir)
    runs = []
    for step_ms in [float(step) for step in args.steps.split(",")]:
        for level in [int(level) for level in args.levels.split(",")]:
            # Side by side, level by level: Parley as it ships, Parley writing behind, and the
            # machine's floor (the same messages from a server that does nothing else).
            for durability in args.durability.split(","):
                runs.append(await measure(step_ms, level, args.tokens, args.seconds, workdir, durability))
            runs.append(await measure(step_ms, level, args.tokens, args.seconds, workdir, baseline_events=events))
    if args.processes:
        from tests.support import postgres

        for level in [int(level) for level in args.levels.split(",")]:
            for processes in [int(count) for count in args.processes.split(",")]:
                with postgres.fresh_schema() as dsn:
                    runs.append(await measure(20, level, args.tokens, args.seconds, workdir, "acknowledged",
                                              processes=processes, dsn=dsn))
    if args.shared_engine:
        from tests.support import postgres

        for level in [int(level) for level in args.levels.split(",")]:
            for processes in [int(count) for count in args.shared_engine.split(",")]:
                with postgres.fresh_schema() as dsn:
                    runs.append(await measure(20, level, args.tokens, args.seconds, workdir, "acknowledged",
                                              processes=processes, dsn=dsn, shared_engine=True))
    at_target = [run for run in runs if run["streams"] == TARGET["streams"] and run["step_ms"] == 20
                 and run["target"] == "parley" and run["durability"] == "acknowledged"]
    verdict = {"target": TARGET, "met": bool(at_target) and all(
        run["tokens_per_second"] >= TARGET["tokens_per_second"] and run["itl_ms"]["p99"] is not None
        and run["itl_ms"]["p99"] <= TARGET["itl_p99_ms"] for run in at_target)}
    path = save("lockstep", {"parameters": {"steps_ms": args.steps, "levels": args.levels, "tokens": args.tokens,
                                            "seconds": args.seconds, "durability": args.durability,
                                            "processes": args.processes, "shared_engine": args.shared_engine},
                             "runs": runs, "verdict": verdict})
    print(json.dumps(verdict))
    print(f"wrote {path}")


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(main())
