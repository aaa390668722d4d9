"""WebSocket mode against HTTP: the server's own cost per turn of a 50-turn tool loop, memory per
idle WebSocket, and many sessions on one process.

  python bench/websocket_turns.py [--turns 50] [--rounds 3] [--idle 1000] [--busy 500]

Parley (a process of its own, SQLite) with the real Envoy in front, on the scripted engine
scripted to call a tool every turn: there is no model, so what is timed is Parley's and Envoy's
own work. Each turn after the first sends one `function_call_output` (about 120 words, a file's
contents) and `previous_response_id`, as an agent does. Side by side in one run, alternating,
`--rounds` times each:

- `websocket`: every turn on one WebSocket (the connection keeps the chain in memory);
- `websocket_store_false`: the same with `store: false` (nothing written; only the socket has it);
- `http`: each turn a streamed `POST /v1/responses` on one keep-alive HTTP connection (the
  server loads the chain from the store every turn).

Per turn: time to the first output event (`response.output_item.added`, the tool call) and to
`response.completed`, measured at the client. Reported: the median over rounds at turns 1, 2, 10,
25 and 50, and the slope (ms per turn, least squares over turns 2..N).

Then `--idle` WebSockets are opened and left idle: RSS of the Parley process and of Envoy before
and after, per connection. Then `--busy` sessions each run one turn at once.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "server")]
import httpx  # noqa: E402
import orjson  # noqa: E402
from common import free_port, rss_bytes, save  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

MARKS = (1, 2, 10, 25, 50)
TOOLS = [{"type": "function", "name": "read_file", "description": "Read a file of the repository.",
          "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"],
                         "additionalProperties": False}}]
TOOL_CALL = ["<tool_call>", '{"name": "read_file", "arguments": {"path": "src/app.py"}}', "</tool_call>"]
FILE = " ".join(f"line{i} = compute(value_{i}, limit={i * 7})" for i in range(40))  # ~120 words


# -- the server (a child process) ----------------------------------------------------------------

def serve(port: int, store: str) -> None:
    """Parley + Envoy on the scripted engine, until SIGTERM."""
    from parley import config
    from parley.app import App
    from parley.engine.scripted import ScriptedEngine
    from parley.gateway import Envoy
    from parley.log import configure

    async def main() -> None:
        settings = config.load(environ={}, grpc_port=0, metrics_port=0, websocket_port=0, http_port=port,
                               store_path=store, log_level="warning", websocket_max_connections=4096,
                               rate_limit_requests_per_minute=0, max_queued_generations=4096)
        configure(level="warning")
        app = App(settings, engine=ScriptedEngine(model_id="scripted", context_window=1 << 20, script=TOOL_CALL))
        await app.start()
        envoy = Envoy(settings, app.grpc_port, websocket_port=app.websocket_port)
        await asyncio.to_thread(envoy.start)
        stopping = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
        print("serving", flush=True)
        await stopping.wait()
        await asyncio.to_thread(envoy.stop)
        await app.stop(grace=1)

    asyncio.run(main())


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def envoy_pid(server_pid: int) -> int:
    for pid in descendants(server_pid):
        if Path(f"/proc/{pid}/comm").read_text().strip() == "envoy":
            return pid
    raise RuntimeError("no envoy process under the server")


# -- the loops -------------------------------------------------------------------------------------

def turn_body(turn: int, previous: dict | None, **extra) -> dict:
    if previous is None:
        body = {"input": "The tests fail in src/app.py; read it and fix it."}
    else:
        call_id = previous["output"][0]["call_id"]
        body = {"input": [{"type": "function_call_output", "call_id": call_id, "output": f"turn {turn}: {FILE}"}],
                "previous_response_id": previous["id"]}
    return {"model": "scripted", "tools": TOOLS, "max_output_tokens": 64, **body, **extra}


async def websocket_loop(ws_url: str, turns: int, store: bool) -> list[tuple[float, float]]:
    timings = []
    async with connect(ws_url, max_size=None, compression=None) as socket:
        previous = None
        for turn in range(1, turns + 1):
            message = {"type": "response.create", **turn_body(turn, previous, store=store)}
            started = time.perf_counter()
            await socket.send(orjson.dumps(message).decode())
            first = None
            while True:
                event = orjson.loads(await socket.recv())
                if first is None and event["type"] == "response.output_item.added":
                    first = time.perf_counter() - started
                if event["type"] in ("response.completed", "response.failed", "response.incomplete", "error"):
                    break
            assert event["type"] == "response.completed", event
            timings.append((first * 1000, (time.perf_counter() - started) * 1000))
            previous = event["response"]
    return timings


async def http_loop(url: str, turns: int) -> list[tuple[float, float]]:
    timings = []
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=1)) as http:
        previous = None
        for turn in range(1, turns + 1):
            started = time.perf_counter()
            first = None
            async with http.stream("POST", "/responses", json={**turn_body(turn, previous), "stream": True}) as reply:
                async for line in reply.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = orjson.loads(line[6:])
                    if first is None and event["type"] == "response.output_item.added":
                        first = time.perf_counter() - started
                    if event["type"] == "response.completed":
                        previous = event["response"]
            assert previous is not None and first is not None
            timings.append((first * 1000, (time.perf_counter() - started) * 1000))
    return timings


def progress(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


def slope(values: list[float]) -> float:
    """Least-squares ms per turn over turns 2..N (turn 1 has no history)."""
    return statistics.linear_regression(range(2, len(values) + 1), values[1:]).slope


def summarize(rounds: list[list[tuple[float, float]]]) -> dict:
    turns = len(rounds[0])
    first = [statistics.median(r[i][0] for r in rounds) for i in range(turns)]
    whole = [statistics.median(r[i][1] for r in rounds) for i in range(turns)]
    return {"first_event_ms_at_turn": {str(m): round(first[m - 1], 2) for m in MARKS if m <= turns},
            "turn_ms_at_turn": {str(m): round(whole[m - 1], 2) for m in MARKS if m <= turns},
            "first_event_ms_median_turns_2_on": round(statistics.median(first[1:]), 2),
            "first_event_slope_ms_per_turn": round(slope(first), 4),
            "turn_slope_ms_per_turn": round(slope(whole), 4)}


# -- memory and many sessions ----------------------------------------------------------------------

async def close_all(sockets) -> None:
    """At once: each close waits about 1 s for Envoy's TCP close (its delayed_close_timeout)."""
    await asyncio.gather(*(socket.close() for socket in sockets))


async def idle_memory(ws_url: str, server: int, envoy: int, count: int) -> dict:
    await asyncio.sleep(1)
    before = rss_bytes(server), rss_bytes(envoy)
    sockets = [await connect(ws_url, compression=None) for _ in range(count)]
    await asyncio.sleep(2)
    after = rss_bytes(server), rss_bytes(envoy)
    await close_all(sockets)
    return {"connections": count,
            "parley_rss_mb_before": round(before[0] / 2**20, 1), "parley_rss_mb_after": round(after[0] / 2**20, 1),
            "parley_bytes_per_connection": round((after[0] - before[0]) / count),
            "envoy_rss_mb_before": round(before[1] / 2**20, 1), "envoy_rss_mb_after": round(after[1] / 2**20, 1),
            "envoy_bytes_per_connection": round((after[1] - before[1]) / count)}


async def busy_sessions(ws_url: str, server: int, count: int) -> dict:
    sockets = [await connect(ws_url, compression=None) for _ in range(count)]
    started = time.perf_counter()

    async def one(socket) -> str:
        await socket.send(orjson.dumps({"type": "response.create", **turn_body(1, None)}).decode())
        while True:
            event = orjson.loads(await socket.recv())
            if event["type"] == "error":
                return event["error"]["code"] or "error"
            if event["type"] in ("response.completed", "response.failed"):
                return event["type"]

    outcomes = await asyncio.gather(*(one(socket) for socket in sockets))
    seconds = time.perf_counter() - started
    rss = rss_bytes(server)
    await close_all(sockets)
    return {"sessions": count, "outcomes": dict(collections.Counter(outcomes)), "seconds": round(seconds, 2),
            "turns_per_second": round(count / seconds, 1), "parley_rss_mb": round(rss / 2**20, 1)}


async def measure(args) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        port = free_port()
        server = subprocess.Popen([sys.executable, __file__, "serve", str(port), str(Path(workdir) / "ws.sqlite3")],
                                  stdout=subprocess.PIPE, text=True)
        try:
            while "serving" not in server.stdout.readline():
                if server.poll() is not None:
                    raise SystemExit("the server exited during start-up")
            # Whatever it logs from now on is read and dropped: a full pipe would stall the server.
            threading.Thread(target=lambda: [None for _ in server.stdout], daemon=True).start()
            url, ws_url = f"http://127.0.0.1:{port}/v1", f"ws://127.0.0.1:{port}/v1/responses"
            await http_loop(url, 3)  # warm both paths (first connections, SQLite pages)
            await websocket_loop(ws_url, 3, True)
            runs: dict[str, list] = {"websocket": [], "websocket_store_false": [], "http": []}
            for round_ in range(args.rounds):
                runs["websocket"].append(await websocket_loop(ws_url, args.turns, True))
                runs["websocket_store_false"].append(await websocket_loop(ws_url, args.turns, False))
                runs["http"].append(await http_loop(url, args.turns))
                progress(f"round {round_ + 1} of {args.rounds} done")
            results = {name: summarize(rounds) for name, rounds in runs.items()}
            http_first = results["http"]["first_event_ms_median_turns_2_on"]
            for name in ("websocket", "websocket_store_false"):
                results[name]["first_event_vs_http"] = round(results[name]["first_event_ms_median_turns_2_on"]
                                                              / http_first, 3)
            envoy = envoy_pid(server.pid)
            results["idle"] = await idle_memory(ws_url, server.pid, envoy, args.idle)
            progress(f"{args.idle} idle connections measured")
            results["busy"] = await busy_sessions(ws_url, server.pid, args.busy)
            progress(f"{args.busy} busy sessions measured")
        finally:
            server.terminate()
            server.wait(timeout=60)
    return {"turns": args.turns, "rounds": args.rounds, "function_call_output_words": len(FILE.split()),
            **results}


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        serve(int(sys.argv[2]), sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--busy", type=int, default=500)
    args = parser.parse_args()
    payload = asyncio.run(measure(args))
    print(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode())
    print(save("websocket_turns", payload))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
