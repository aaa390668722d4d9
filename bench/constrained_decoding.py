"""Constrained decoding speed: the grammar checking the chain's draws, beside the grammar
filtering every token first, in one run on the real llama.cpp engine (SmolLM2, one sequence).

  python bench/constrained_decoding.py [--tokens 128] [--repeats 3] [--label NAME]

For each constraint, greedy decoding of `--tokens` tokens is timed `--repeats` times with each
strategy, alternating, and the median tokens/s kept, with how many draws the grammar refused.
Greedy decoding picks the same tokens under both (tests/unit/engine/test_llamacpp.py checks it);
only the time differs.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from common import run_and_save  # noqa: E402
from parley.engine.base import ChatMessage, Constraint, Finished, SamplingParams  # noqa: E402
from parley.engine.llamacpp import LlamaCppEngine, default_model_path  # noqa: E402
from parley.engine.llamacpp_sampling import Sampling  # noqa: E402

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "city": {"type": "string"}},
          "required": ["name", "age", "city"], "additionalProperties": False}
CASES = {
    "free text": (None, "Write a long story about a lighthouse keeper."),
    "tool_choice none (no call may open)": (Constraint("tools", mode="none"),
                                            "Write a long story about a lighthouse keeper."),
    "json_object": (Constraint("json_object"), "Describe three people as a JSON object."),
    "json_schema": (Constraint("json_schema", schema=PERSON), "Describe a person as JSON."),
    "tool call required": (Constraint("tools", mode="required", tools=(("get_weather", PERSON),)),
                           "What is the weather?"),
}


async def tokens_per_second(engine, constraint, text: str, tokens: int) -> tuple[float, int]:
    prompt = engine.render_prompt([ChatMessage("user", text)])
    start, produced = time.perf_counter(), 0
    async for step in engine.generate(prompt, SamplingParams(max_tokens=tokens, temperature=0, constraint=constraint)):
        for event in step if isinstance(step, list) else [step]:
            if isinstance(event, Finished):
                produced = event.output_tokens
    return produced / (time.perf_counter() - start), produced


async def main(tokens: int, repeats: int) -> dict:
    engine = LlamaCppEngine(default_model_path(), "SmolLM2-135M-Instruct", context_window=2048, threads=0,
                            sequences=1)
    checked_first = Sampling.__dict__["grammar_first"]  # the staticmethod itself
    strategies = {"checks draws": checked_first, "filters first": staticmethod(lambda params: True)}
    results = {}
    try:
        await tokens_per_second(engine, None, "Hi", 8)  # warm-up
        for name, (constraint, text) in CASES.items():
            rates = {strategy: [] for strategy in strategies}
            refused = produced = 0
            for _ in range(repeats):
                for strategy, rule in strategies.items():
                    Sampling.grammar_first = rule
                    before = engine._sampling.refused
                    rate, produced = await tokens_per_second(engine, constraint, text, tokens)
                    rates[strategy].append(rate)
                    if strategy == "checks draws":
                        refused = engine._sampling.refused - before
            results[name] = {**{strategy: round(statistics.median(values), 1) for strategy, values in rates.items()},
                             "tokens": produced, "refused draws": refused}
            print(f"{name:40s} {results[name]}", flush=True)
    finally:
        Sampling.grammar_first = checked_first
        await engine.close()
    return {"tokens": tokens, "repeats": repeats, "cases": results}


if __name__ == "__main__":
    run_and_save("constrained_decoding", __doc__, main, tokens=128, repeats=3)
