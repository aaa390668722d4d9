"""GPU smoke test: one Parley (any engine) checked through its REST port with the official SDK.

Runs streaming, a tool call (and the turn after its result), structured output, and prints time to first token and output
tokens per second. Meant for the TensorRT-LLM image on a GPU (deploy/gpu/smoke.sh starts the
server); it runs against the CPU default too (`make run`, then this script), which is how it
was checked on a machine without a GPU. Exits non-zero when a check fails.

    python deploy/gpu/smoke.py --base-url http://127.0.0.1:8080/v1 --model MODEL
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from openai import AsyncOpenAI
from pydantic import BaseModel

WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Current weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                               "additionalProperties": False}, "strict": True}


class Capital(BaseModel):
    country: str
    capital: str


async def streaming(client: AsyncOpenAI, model: str, max_tokens: int) -> dict:
    started = time.perf_counter()
    first = None
    stream = await client.responses.create(model=model, input="Write a short paragraph about the sea.", stream=True,
                                           max_output_tokens=max_tokens, temperature=0)
    final = None
    async for event in stream:
        if event.type == "response.output_text.delta" and first is None:
            first = time.perf_counter()
        if event.type in ("response.completed", "response.incomplete", "response.failed"):
            final = event.response
    ended = time.perf_counter()
    assert final is not None and final.status in ("completed", "incomplete"), final
    tokens = final.usage.output_tokens
    return {"ttft_ms": round((first - started) * 1000, 1), "output_tokens": tokens,
            "tokens_per_second": round((tokens - 1) / (ended - first), 1) if tokens > 1 else None,
            "status": final.status}


async def tool_call(client: AsyncOpenAI, model: str) -> dict:
    response = await client.responses.create(model=model, input="What is the weather in Oslo?", tools=[WEATHER_TOOL],
                                             tool_choice="required", max_output_tokens=128)
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather", response.output
    arguments = json.loads(calls[0].arguments)
    assert isinstance(arguments.get("city"), str), arguments
    # The result sent back: the checkpoint's template renders the call and its result (or Parley's
    # family format, where the template has no tools: the server's log line engine.tool_rendering).
    answer = await client.responses.create(
        model=model, previous_response_id=response.id, tools=[WEATHER_TOOL], max_output_tokens=128,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"celsius": 4, "sky": "clear"}'}])
    assert answer.status in ("completed", "incomplete"), answer
    return {"name": calls[0].name, "arguments": arguments, "answer_after_result": answer.output_text[:200]}


async def structured(client: AsyncOpenAI, model: str) -> dict:
    parsed = await client.responses.parse(model=model, input="Which city is the capital of France?",
                                          text_format=Capital, max_output_tokens=128)
    assert isinstance(parsed.output_parsed, Capital), parsed.output_text
    return parsed.output_parsed.model_dump()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--model", default=None, help="default: the first model /v1/models lists")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    failures = 0
    async with AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=300) as client:
        model = args.model or (await client.models.list()).data[0].id
        report = {"model": model}
        for name, check in (("streaming", lambda: streaming(client, model, args.max_tokens)),
                            ("tool_call", lambda: tool_call(client, model)),
                            ("structured_output", lambda: structured(client, model))):
            try:
                report[name] = await check()
            except Exception as exc:  # report every check, then fail
                failures += 1
                report[name] = {"failed": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(report, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
