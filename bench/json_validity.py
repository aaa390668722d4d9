"""Sampled json_schema answers: how many parse, under the grammar Parley compiles beside
llama-cpp-python's converter as it is (its string rule lets raw control characters into
strings, and it copies a pattern's `.` and classes into the grammar, raw quotes included), in
one run on the real llama.cpp engine (SmolLM2, temperature 1, four sequences at once).

  python bench/json_validity.py [--answers 100] [--tokens 128] [--label NAME]

Two schemas: the shape the SDK's `responses.parse` sends (two required strings), and one string
with a `pattern` written with classes (a contact address; `[.]`, since the converter's grammar
for `\\.` does not parse). Each answer's seed is its index, so both grammars see the same seeds;
what a grammar refuses changes the draws from there on. Counted per grammar and schema: answers
that finished (`stop`) and parse, that finished and do not parse, that reached `--tokens` (an
`incomplete` response), and answers with a raw control character anywhere in their JSON.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from common import run_and_save  # noqa: E402
from llama_cpp.llama_grammar import PRIMITIVE_RULES  # noqa: E402
from parley.engine import grammar  # noqa: E402
from parley.engine.base import ChatMessage, Constraint, Finished, SamplingParams, TextDelta  # noqa: E402
from parley.engine.llamacpp import LlamaCppEngine, default_model_path  # noqa: E402

SCHEMAS = {
    "two strings": ("Which city is the capital of France?", {
        "type": "object", "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
        "required": ["country", "capital"], "additionalProperties": False}),
    "pattern": ("Give me a contact e-mail address for a bakery.", {
        "type": "object", "properties": {"email": {"type": "string", "pattern": "^[^@ ]+@[^@ ]+[.][a-z]{2,6}$"}},
        "required": ["email"], "additionalProperties": False}),
}
# (string character rule, pattern translation) of each grammar
GRAMMARS = {"parley": (grammar.JSON_STRING_CHARACTER, grammar.json_pattern),
            "llama-cpp-python": (PRIMITIVE_RULES["char"].content, lambda pattern: pattern)}
CONTROL = re.compile(r"[\x00-\x1f]")


async def answer(engine, prompt: list[int], schema: dict, seed: int, tokens: int) -> tuple[str, str]:
    text, reason = "", ""
    params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=seed,
                            constraint=Constraint("json_schema", schema=schema))
    async for step in engine.generate(prompt, params):
        for event in step if isinstance(step, list) else [step]:
            if isinstance(event, TextDelta):
                text += event.text
            elif isinstance(event, Finished):
                reason = event.reason
    return text, reason


def parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


async def main(answers: int, tokens: int) -> dict:
    engine = LlamaCppEngine(default_model_path(), "SmolLM2-135M-Instruct", context_window=2048, threads=0,
                            sequences=4)
    results: dict[str, dict] = {}
    try:
        for schema_name, (question, schema) in SCHEMAS.items():
            prompt = engine.render_prompt([ChatMessage("user", question)])
            for name, (character, translate) in GRAMMARS.items():
                grammar.JSON_STRING_CHARACTER, grammar.json_pattern = character, translate
                engine._sampling._grammars.clear()  # compiled under the other grammar
                done = await asyncio.gather(*(answer(engine, prompt, schema, seed, tokens) for seed in range(answers)))
                result = {
                    "stop, parses": sum(reason == "stop" and parses(text) for text, reason in done),
                    "stop, does not parse": sum(reason == "stop" and not parses(text) for text, reason in done),
                    "length (incomplete)": sum(reason == "length" for _, reason in done),
                    "raw control character in the JSON": sum(bool(CONTROL.search(text.strip())) for text, _ in done)}
                results.setdefault(schema_name, {})[name] = result
                print(f"{schema_name:12s} {name:17s} {result}", flush=True)
    finally:
        grammar.JSON_STRING_CHARACTER, grammar.json_pattern = GRAMMARS["parley"]
        await engine.close()
    return {"answers": answers, "tokens": tokens, "schemas": results}


if __name__ == "__main__":
    run_and_save("json_validity", __doc__, main, answers=100, tokens=128)
