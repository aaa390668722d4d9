"""The reliability run (`make reliability`; never part of `make test`): Parley as a hostile user
and an operator pulling the plug would try it. Each part prints its figure and whether its rule
holds; the run exits non-zero when any rule is broken, and writes
tests/reliability/results/<when>.json.

  fuzz          requests generated from OpenAI's spec for /responses and /conversations
                (../shared/reference; skipped without it)
                through Envoy: no 5xx, every error OpenAI-shaped
  kills         SIGKILL right after `response.created` and after the terminal event, on SQLite
                and PostgreSQL: nothing a client saw lost or changed
  slow_readers  32 clients reading a byte a second: server RSS stays within 2x idle
  big_bodies    12 concurrent 15 MB bodies: server RSS within 2x idle, during and after
  soak          64 streams for a minute: no errors, RSS flat

  python tests/reliability/run.py [--parts fuzz,kills,...] [--fuzz-examples N] [--kill-cycles N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from loadgen import run_load  # noqa: E402

from tests.support.openapi import SPEC_PATH  # noqa: E402
from tests.support.stack import free_port  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "scripted"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) / 1024


class Server:
    """`parley run` (server and Envoy) on the scripted engine, on free ports."""

    def __init__(self, workdir: Path, **settings):
        self.port = free_port()
        env = {**os.environ, "PARLEY_HTTP_PORT": str(self.port), "PARLEY_GRPC_PORT": "0", "PARLEY_METRICS_PORT": "0", "PARLEY_ENGINE": "scripted",
               "PARLEY_MODEL_NAME": MODEL, "PARLEY_STORE_PATH": str(workdir / f"r{self.port}.sqlite3"),
               "PARLEY_LOG_LEVEL": "warning", **{f"PARLEY_{k.upper()}": str(v) for k, v in settings.items()}}
        self.process = subprocess.Popen([sys.executable, "-m", "parley", "run"], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True)
        while "serving" not in (line := self.process.stdout.readline()):
            if not line and self.process.poll() is not None:
                raise RuntimeError("parley run exited during start-up")
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)

    @property
    def rss_mb(self) -> float:
        return rss_mb(self.process.pid)


def fuzz(workdir: Path, examples: int) -> dict:
    if not SPEC_PATH.is_file():
        return {"skipped": f"OpenAI's spec not found at {SPEC_PATH} (it lives in the developers' shared/ folder)"}
    with Server(workdir) as server:
        command = [str(Path(sys.executable).parent / "st"), "run", str(SPEC_PATH), "-u", server.url,
                   "--include-path-regex", "^/(responses|conversations)", "-c", "not_a_server_error,openai_shaped_errors",
                   "-n", str(examples), "--phases", "examples,coverage,fuzzing", "--suppress-health-check", "all",
                   "--max-time", "300",
                   "--report", "ndjson", "--report-ndjson-path", str(workdir / "fuzz.ndjson")]
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.reliability.fuzz_hooks"}, cwd=ROOT)
    summary = [line for line in done.stdout.splitlines() if "generated" in line or "failures" in line.lower()]
    generated = next((int(line.split()[0]) for line in summary if line.strip().split()[0].isdigit()), 0)
    return {"requests": generated, "ok": done.returncode == 0, "summary": [line.strip() for line in summary][-4:]}


def kills(cycles: int) -> dict:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/integration/test_durability.py"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PARLEY_KILL_CYCLES": str(cycles)})
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    failures = [line for line in done.stdout.splitlines() if line.startswith("E ") and "lost" in line]
    return {"kills_per_store": cycles, "stores": ["sqlite", "postgres"], "ok": done.returncode == 0,
            "pytest": last, "failures": failures[:2]}


async def _slow_reader(port: int, seconds: float) -> None:
    body = json.dumps({"model": MODEL, "input": "go", "stream": True, "max_output_tokens": 4000}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/responses HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await reader.read(1)
        await asyncio.sleep(1)
    writer.close()


async def slow_readers(workdir: Path, clients: int = 32, seconds: float = 40) -> dict:
    with Server(workdir, scripted_output_tokens=4000, scripted_token_delay_ms=2) as server:
        await asyncio.sleep(1)
        idle = server.rss_mb
        readers = asyncio.gather(*(_slow_reader(server.port, seconds) for _ in range(clients)))
        peak = idle
        while not readers.done():
            peak = max(peak, server.rss_mb)
            await asyncio.sleep(0.5)
        await readers
        await asyncio.sleep(3)
        after = server.rss_mb
    return {"clients": clients, "idle_mb": round(idle, 1), "peak_mb": round(peak, 1), "after_mb": round(after, 1),
            "ok": peak <= 2 * idle and after <= 2 * idle}


async def big_bodies(workdir: Path, count: int = 12, size: int = 15_000_000) -> dict:
    with Server(workdir) as server:
        await asyncio.sleep(1)
        idle = server.rss_mb
        body = b'{"model": "scripted", "input": "' + b"a" * size + b'", "unknown_field": 1}'
        async with httpx.AsyncClient(timeout=120) as client:
            sending = asyncio.gather(*(client.post(f"{server.url}/responses", content=body,
                                                   headers={"content-type": "application/json"}) for _ in range(count)))
            peak = idle
            while not sending.done():
                peak = max(peak, server.rss_mb)
                await asyncio.sleep(0.05)
            statuses = sorted({reply.status_code for reply in await sending})
        await asyncio.sleep(3)
        after = server.rss_mb
    return {"bodies": count, "bytes_each": size, "statuses": statuses, "idle_mb": round(idle, 1),
            "peak_mb": round(peak, 1), "after_mb": round(after, 1),
            "ok": statuses == [400] and peak <= 2 * idle and after <= 2 * idle}


async def soak(workdir: Path, streams: int = 64, seconds: float = 60) -> dict:
    with Server(workdir, scripted_output_tokens=200) as server:
        body = json.dumps({"model": MODEL, "input": "go", "stream": True}).encode()
        await run_load("127.0.0.1", server.port, body, streams, seconds=2, warmup=0)
        start = server.rss_mb
        result = await run_load("127.0.0.1", server.port, body, streams, seconds=seconds, warmup=0)
        end = server.rss_mb
    return {"streams": streams, "seconds": seconds, "requests": result["requests"], "errors": result["errors"],
            "rss_start_mb": round(start, 1), "rss_end_mb": round(end, 1),
            "ok": result["errors"] == 0 and end <= start * 1.2}


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="fuzz,kills,slow_readers,big_bodies,soak")
    parser.add_argument("--fuzz-examples", type=int, default=100)
    parser.add_argument("--kill-cycles", type=int, default=100)
    args = parser.parse_args()
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"parley-reliability-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    parts = {
        "fuzz": lambda: asyncio.to_thread(fuzz, workdir, args.fuzz_examples),
        "kills": lambda: asyncio.to_thread(kills, args.kill_cycles),
        "slow_readers": lambda: slow_readers(workdir),
        "big_bodies": lambda: big_bodies(workdir),
        "soak": lambda: soak(workdir),
    }
    results = {}
    for name in args.parts.split(","):
        results[name] = await parts[name]()
        print(json.dumps({name: results[name]}), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    when = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{when}.json"
    path.write_text(json.dumps({"when": when, "commit": commit.strip(), "results": results}, indent=1) + "\n")
    broken = [name for name, result in results.items() if result.get("ok") is False]
    print(f"wrote {path}; " + (f"rules broken: {', '.join(broken)}" if broken else "every rule held"))
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
