"""Fair admission across projects: one project's flood against another's time to first token.

  python bench/fairness.py [--flood 500] [--probes 10] [--slots 4] [--tokens 64] [--rate 400]

`parley run` on the synthetic engine, paced like a model (each stream `--rate` tokens/s,
`--tokens` per response, `--slots` generations at once), with two API keys. Project A submits
`--flood` background requests at once; then B sends `--probes` streaming requests one after
another and records each one's time to first token. Three cases in one run, in turns:
B alone (no flood); B in its own project during A's flood; B sending with A's key during the
flood (what a single shared queue did to everyone, and still does within one project).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from common import free_port, save  # noqa: E402


def create_key(store_path: str, project: str) -> str:
    output = subprocess.run([sys.executable, "-m", "parley", "keys", "create", "--project", project],
                            env={**os.environ, "PARLEY_STORE_PATH": store_path}, capture_output=True, text=True,
                            check=True).stdout
    return next(line.split()[-1] for line in output.splitlines() if line.strip().startswith("key:"))


async def first_token_seconds(http: httpx.AsyncClient, url: str, key: str) -> float:
    start = time.perf_counter()
    async with http.stream("POST", f"{url}/responses", headers={"authorization": f"Bearer {key}"},
                           json={"model": "synthetic", "input": "hi", "stream": True}) as reply:
        reply.raise_for_status()
        elapsed = None
        async for line in reply.aiter_lines():  # read to the end: the next probe starts after this one
            if elapsed is None and line.startswith("event: response.output_text.delta"):
                elapsed = time.perf_counter() - start
    return elapsed


async def flood(http: httpx.AsyncClient, url: str, key: str, count: int) -> list[str]:
    """Ids of the background requests accepted (the rest got 429)."""
    async def one() -> str | None:
        reply = await http.post(f"{url}/responses", headers={"authorization": f"Bearer {key}"},
                                json={"model": "synthetic", "input": "hi", "background": True})
        return reply.json()["id"] if reply.status_code == 200 else None
    return [i for i in await asyncio.gather(*(one() for _ in range(count))) if i]


async def drained(http: httpx.AsyncClient, url: str, key: str, ids: list[str]) -> None:
    """Until the flood's last request has finished (a project's requests start in order)."""
    while True:
        reply = await http.get(f"{url}/responses/{ids[-1]}", headers={"authorization": f"Bearer {key}"})
        if reply.json()["status"] not in ("queued", "in_progress"):
            return
        await asyncio.sleep(0.2)


async def probes(http, url, key, count) -> list[float]:
    return [await first_token_seconds(http, url, key) for _ in range(count)]


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    # The first probe meets the flood at its fullest: behind a shared queue it waits for all of it,
    # and the probes after it find the queue drained.
    return {"probes": len(times), "ttft_first_ms": round(times[0] * 1000, 1),
            "ttft_p50_ms": round(statistics.median(ordered) * 1000, 1), "ttft_max_ms": round(ordered[-1] * 1000, 1)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flood", type=int, default=500)
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rate", type=float, default=400.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        store = str(Path(workdir) / "fair.sqlite3")
        keys = {project: create_key(store, project) for project in ("a", "b")}
        port = free_port()
        env = {**os.environ, "PARLEY_ENGINE": "synthetic", "PARLEY_MODEL_NAME": "synthetic",
               "PARLEY_STORE_PATH": store, "PARLEY_HTTP_PORT": str(port), "PARLEY_GRPC_PORT": "0", "PARLEY_METRICS_PORT": "0", "PARLEY_WEBSOCKET_PORT": "0",
               "PARLEY_SYNTHETIC_OUTPUT_TOKENS": str(args.tokens),
               "PARLEY_SYNTHETIC_TOKENS_PER_SECOND": str(args.rate),
               "PARLEY_MAX_CONCURRENT_GENERATIONS": str(args.slots),
               "PARLEY_MAX_QUEUED_GENERATIONS": str(args.flood + args.probes), "PARLEY_LOG_LEVEL": "warning"}
        server = subprocess.Popen([sys.executable, "-m", "parley", "run"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        try:
            while "serving" not in server.stdout.readline():
                if server.poll() is not None:
                    raise SystemExit("parley run exited during start-up")
            url = f"http://127.0.0.1:{port}/v1"
            results = {}
            async with httpx.AsyncClient(timeout=600) as http:
                results["b_alone"] = summary(await probes(http, url, keys["b"], args.probes))
                for case, key in (("b_own_project_during_flood", keys["b"]), ("b_with_a_key_during_flood", keys["a"])):
                    ids = await flood(http, url, keys["a"], args.flood)
                    await asyncio.sleep(0.5)
                    results[case] = {**summary(await probes(http, url, key, args.probes)), "flood_accepted": len(ids)}
                    await drained(http, url, keys["a"], ids)
        finally:
            server.terminate()
            server.wait(timeout=60)
    payload = {"slots": args.slots, "tokens_per_response": args.tokens, "tokens_per_second_per_stream": args.rate,
               "slot_turn_ms": round(args.tokens / args.rate * 1000, 1), "flood": args.flood, **results}
    print(json.dumps(payload, indent=2))
    save("fairness", payload)



if __name__ == "__main__":
    asyncio.run(main())
