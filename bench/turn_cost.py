"""Turn cost: the server's own time per turn of a long conversation, at turns 1, 2, 10, 100 and
1,000, on SQLite and PostgreSQL, with and without truncation; and the bytes stored per turn.

  python bench/turn_cost.py [--turns 1000] [--stores sqlite,postgres] [--states kept,off] [--label NAME]

In-process: ResponsesService on a fresh store and the scripted engine (no model), so what is
timed is Parley's own work for a non-streamed create: validate, load the context, render and
fit the prompt, store, and the durable acknowledgement. Each turn sends one new user message
(about 12 words) and gets a 3-token answer. A chain goes on with `previous_response_id`; a
conversation with `conversation`, side by side in the same run. With truncation, the scripted
window (1,500 words) is passed at about turn 80, so that from then on every turn drops its oldest
items. The figure at turn k is the median of turns k..k+4 (turn 1 alone), in milliseconds.
Side by side in the same run: `kept`, the server as shipped (a turn starts from the state its
previous response left, service/turn_state.py), and `off` (PARLEY_CONTEXT_CACHE_MB=0: every
turn reads its whole context from the store and renders it whole).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "server")]
from common import save  # noqa: E402
from parley.engine.scripted import ScriptedEngine  # noqa: E402
from parley.log import configure  # noqa: E402
from parley.service.responses import ResponsesService  # noqa: E402
from parley.store.postgres import PostgresStore  # noqa: E402
from parley.store.sqlite import SqliteStore  # noqa: E402

from tests.support import postgres  # noqa: E402

MARKS = (1, 2, 10, 100, 1000)
WINDOW_WORDS = {"disabled": 1 << 24, "auto": 1500}


async def stored_bytes(store) -> int:
    tables = {"responses": "document", "input_items": "document", "event_batches": "events",
              "conversation_items": "document"}
    total = 0
    for table, column in tables.items():
        sql = f"SELECT coalesce(sum(length({column})), 0) FROM {table}"
        if isinstance(store, SqliteStore):
            total += await store._call(lambda sql=sql: store._db.execute(sql).fetchone()[0])
        else:
            total += (await store._fetchone(sql))[0]
    return total


async def one_run(store, mode: str, truncation: str, turns: int, states: str) -> dict:
    engine = ScriptedEngine(model_id="scripted", context_window=WINDOW_WORDS[truncation], script=["Noted", ",", " ok."])
    service = ResponsesService(engine, store, **({"context_cache_bytes": 0} if states == "off" else {}))
    times = []
    previous = None
    conversation = (await service.conversations.create("default", {}))["id"] if mode == "conversation" else None
    before = await stored_bytes(store)
    for turn in range(1, turns + 5):  # a mark is the median of its turn and the four after it
        body = {"model": "scripted", "truncation": truncation, "max_output_tokens": 16,
                "input": f"Turn {turn}: here is one more short message for the running conversation."}
        if mode == "chain" and previous is not None:
            body["previous_response_id"] = previous
        if conversation is not None:
            body["conversation"] = conversation
        started = time.perf_counter()
        response = await service.create("default", body)
        times.append((time.perf_counter() - started) * 1000)
        previous = response["id"]
    await service.drain()
    per_turn = (await stored_bytes(store) - before) / len(times)
    at = {str(mark): round(statistics.median(times[mark - 1:mark + 4] if mark > 1 else times[:1]), 3)
          for mark in MARKS if mark <= turns}
    return {"ms_at_turn": at, "stored_bytes_per_turn": round(per_turn),
            "ratio_last_to_turn_2": round(at[str(max(m for m in MARKS if m <= turns))] / at["2"], 2)}


async def main(turns: int, stores: list[str], variants: list[str]) -> dict:
    results = {}
    for kind in stores:
        for mode, truncation, states in itertools.product(("chain", "conversation"), ("disabled", "auto"), variants):
            if kind == "sqlite":
                folder = tempfile.TemporaryDirectory()
                store = SqliteStore(Path(folder.name) / "turns.sqlite3")
                await store.open()
                try:
                    result = await one_run(store, mode, truncation, turns, states)
                finally:
                    await store.close()
                    folder.cleanup()
            else:
                with postgres.fresh_schema() as dsn:
                    store = PostgresStore(dsn)
                    await store.open()
                    try:
                        result = await one_run(store, mode, truncation, turns, states)
                    finally:
                        await store.close()
            name = f"{kind} {mode} truncation={truncation} states={states}"
            results[name] = result
            print(f"{name:45s} {result}", flush=True)
    return {"turns": turns, "cases": results}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--states", default="kept,off", help="kept (as shipped), off (no kept states), or both")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    configure(level="warning")  # a line per turn would be timed too
    payload = asyncio.run(main(args.turns, args.stores.split(","), args.states.split(",")))
    payload["label"] = args.label
    print(save("turn_cost", payload))
