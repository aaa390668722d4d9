"""KV fairness: how long a short request waits beside a long generation in the shared KV pool.

  python bench/kv_fairness.py [--context 8192] [--long-tokens 8149] [--shorts 5] [--label NAME]

The real llama.cpp engine (SmolLM2, shared KV pool, 4 sequences), in-process, with end-of-
generation tokens taken as text so that the long request really runs to its budget (as the
background request of issue 13 did). Once the long request has produced 100 tokens, short
requests (16 output tokens) are sent one after another; each one's time to first token and
total time are recorded, with the long request's tokens/s before and while they run. A second
part fills a small pool (1,024 cells) with two requests that outgrow it together and records the
preemptions and what the preempted one lost in time.

Run it on two commits (a worktree of the earlier one) to compare; bench/results/ keeps both.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from common import save  # noqa: E402
from parley.engine.base import ChatMessage, Finished, SamplingParams, TextDelta  # noqa: E402
from parley.engine.llamacpp import default_model_path  # noqa: E402

from tests.fakes.llamacpp import EndlessLlamaCppEngine  # noqa: E402


async def run(engine, prompt: list[int], max_tokens: int, progress: list | None = None) -> dict:
    start = time.perf_counter()
    first = None
    produced = 0
    async for step in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0)):
        for event in step if isinstance(step, list) else [step]:
            if isinstance(event, TextDelta) and event.tokens:
                produced += event.tokens
                if first is None:
                    first = time.perf_counter() - start
                if progress is not None:
                    progress.append((time.perf_counter(), produced))
            elif isinstance(event, Finished):
                pass
    return {"ttft_s": round(first, 4) if first is not None else None, "total_s": round(time.perf_counter() - start, 3),
            "output_tokens": produced}


def rate(progress: list, since: float, until: float) -> float:
    inside = [(t, n) for t, n in progress if since <= t <= until]
    if len(inside) < 2:
        return 0.0
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


async def beside_a_long_generation(context: int, long_tokens: int, shorts: int) -> dict:
    engine = EndlessLlamaCppEngine(default_model_path(), "SmolLM2-135M-Instruct", context_window=context, threads=0,
                                   sequences=4)
    try:
        prompt = engine.render_prompt([ChatMessage("user", "Count.")])
        short_prompt = engine.render_prompt([ChatMessage("user", "Say hello.")])
        await run(engine, short_prompt, 4)  # warm-up
        progress: list = []
        long_run = asyncio.create_task(run(engine, prompt, min(long_tokens, context - len(prompt)), progress))
        while not progress or progress[-1][1] < 100:
            await asyncio.sleep(0.01)
        alone_from = time.perf_counter()
        await asyncio.sleep(2)
        shorts_from = time.perf_counter()
        results = []
        for _ in range(shorts):
            # A short request that waits for the long one to end is measured as such; the bench
            # stops waiting after 120 s and records the short as not served.
            try:
                results.append(await asyncio.wait_for(run(engine, short_prompt, 16), 120))
            except TimeoutError:
                results.append({"ttft_s": None, "total_s": None, "output_tokens": 0, "timed_out_s": 120})
                break
        shorts_until = time.perf_counter()
        long_run.cancel()
        try:
            await long_run
        except asyncio.CancelledError:
            pass
        return {"context": context, "long_max_tokens": long_tokens, "shorts": results,
                "long_tokens_per_s_alone": round(rate(progress, alone_from, shorts_from), 1),
                "long_tokens_per_s_beside_shorts": round(rate(progress, shorts_from, shorts_until), 1),
                "preemptions": len(engine.preempted_outputs)}
    finally:
        await engine.close()


async def outgrowing_the_pool() -> dict:
    engine = EndlessLlamaCppEngine(default_model_path(), "SmolLM2-135M-Instruct", context_window=1024, threads=0,
                                   sequences=2)
    try:
        prompt = engine.render_prompt([ChatMessage("user", "Count.")])
        alone = await run(engine, prompt, 1024 - len(prompt))
        large, small = await asyncio.gather(run(engine, prompt, 1024 - len(prompt)), run(engine, prompt, 600))
        return {"context": 1024, "large_alone": alone, "large": large, "small": small,
                "preempted_at_tokens": list(engine.preempted_outputs)}
    finally:
        await engine.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--long-tokens", type=int, default=8149)
    parser.add_argument("--shorts", type=int, default=5)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    result = {"commit": commit, "label": args.label,
              "beside_a_long_generation": await beside_a_long_generation(args.context, args.long_tokens, args.shorts),
              "outgrowing_the_pool": await outgrowing_the_pool()}
    print(result)
    save("kv_fairness", result)


if __name__ == "__main__":
    asyncio.run(main())
