"""Cache affinity across replicas: two Parley replicas (real SmolLM2 on the CPU, one thread each)
on one PostgreSQL, behind one Envoy with affinity on and off, side by side in one run.

A multi-turn workload of 20 conversations (4 in flight at a time), each turn continuing the
last with previous_response_id: once as a plain chain (its first turn has no key yet, so it
lands anywhere; its id's tag routes every later turn), once with a prompt_cache_key per
conversation (keyed from the first turn). Reported per mode: the share of prompt tokens served
from the KV cache (`cached_tokens / input_tokens`, from turn 2 on), and time to first token.

    python bench/affinity.py [--conversations 20] [--turns 6] [--in-flight 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from common import save  # noqa: E402
from openai import AsyncOpenAI  # noqa: E402
from serving import gateway  # noqa: E402

from tests.support import postgres  # noqa: E402
from tests.support.processes import ServerProcess  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
TOPICS = ["lighthouses", "bees", "glaciers", "trains", "volcanoes", "owls", "tides", "comets", "forests", "rivers",
          "deserts", "whales", "bridges", "clocks", "maps", "kites", "caves", "storms", "gardens", "harbours"]


async def turn(client: AsyncOpenAI, text: str, previous: str | None, key: str | None) -> dict:
    started = time.perf_counter()
    first = None
    final = None
    stream = await client.responses.create(model=MODEL, input=text, previous_response_id=previous, stream=True,
                                           max_output_tokens=16, temperature=0,
                                           **({"prompt_cache_key": key} if key else {}))
    async for event in stream:
        if first is None and event.type == "response.output_text.delta":
            first = time.perf_counter()
        if event.type in ("response.completed", "response.incomplete"):
            final = event.response
    usage = final.usage
    return {"id": final.id, "ttft_ms": ((first or time.perf_counter()) - started) * 1000,
            "input_tokens": usage.input_tokens, "cached_tokens": usage.input_tokens_details.cached_tokens}


async def conversation(client: AsyncOpenAI, topic: str, turns: int, keyed: bool, run: int) -> list[dict]:
    previous, results = None, []
    for number in range(turns):
        # Each run's conversations are its own: nothing cached by an earlier run matches them.
        text = (f"[run {run}] Tell me one more short fact about {topic}, number {number + 1}. Keep it to one "
                "sentence, and do not repeat an earlier fact.")
        result = await turn(client, text, previous, f"user-{topic}" if keyed else None)
        results.append({**result, "turn": number + 1})
        previous = result["id"]
    return results


async def workload(base_url: str, conversations: int, turns: int, in_flight: int, keyed: bool,
                   run: int) -> list[dict]:
    gate = asyncio.Semaphore(in_flight)

    async def one(topic: str) -> list[dict]:
        async with gate:
            return await conversation(client, topic, turns, keyed, run)

    async with AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300) as client:
        done = await asyncio.gather(*(one(topic) for topic in (TOPICS * 2)[:conversations]))
    return [result for results in done for result in results]


def summary(results: list[dict]) -> dict:
    later = [r for r in results if r["turn"] >= 2]
    ttfts = sorted(r["ttft_ms"] for r in later)
    return {"turns": len(results),
            "cached_share_from_turn_2": round(sum(r["cached_tokens"] for r in later)
                                              / max(1, sum(r["input_tokens"] for r in later)), 3),
            "cached_share_from_turn_3": round(sum(r["cached_tokens"] for r in later if r["turn"] >= 3)
                                              / max(1, sum(r["input_tokens"] for r in later if r["turn"] >= 3)), 3),
            "ttft_ms_p50": round(statistics.median(ttfts), 1),
            "ttft_ms_p90": round(ttfts[int(0.9 * (len(ttfts) - 1))], 1),
            "mean_input_tokens": round(statistics.mean(r["input_tokens"] for r in later), 1)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=20)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--in-flight", type=int, default=4)
    args = parser.parse_args()
    runs = {}
    with postgres.fresh_schema() as dsn:
        replicas = [ServerProcess(engine="llamacpp", model_name=MODEL, engine_threads=1, store_dsn=dsn,
                                  log_level="warning", max_concurrent_generations=4, replica_id=name).start()
                    for name in ("replica-a", "replica-b")]
        gateways = {}
        try:
            for affinity in (True, False):
                gateways[affinity] = await asyncio.to_thread(gateway, replicas[0].port, replicas[1].port,
                                                             http_affinity=affinity)
            for keyed in (False, True):
                for affinity in (True, False):  # side by side, on the same replicas
                    name = f"{'prompt_cache_key' if keyed else 'chain'}, affinity {'on' if affinity else 'off'}"
                    results = await workload(gateways[affinity].url, args.conversations, args.turns,
                                             args.in_flight, keyed, len(runs))
                    runs[name] = summary(results)
                    print(json.dumps({name: runs[name]}), flush=True)
        finally:
            for envoy in gateways.values():
                await asyncio.to_thread(envoy.stop)
            for replica in replicas:
                replica.stop()
    path = save("affinity", {"parameters": vars(args), "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    asyncio.run(main())
