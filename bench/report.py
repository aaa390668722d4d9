"""Turn the latest results (bench/results/*-latest.json) into bench/results/README.md and PNG charts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402


def _load(kind: str) -> dict | None:
    path = RESULTS / f"{kind}-latest.json"
    return json.loads(path.read_text()) if path.exists() else None


def _machine(result: dict) -> str:
    m = result["machine"]
    return (f"{m['cores']} cores, {m['cpu_model']}, {m['memory_gb']} GiB; Parley {m['parley_commit']}; "
            + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))


def serving_section(result: dict) -> list[str]:
    lines = ["## Serving path: Parley (synthetic engine) vs minimal grpc.aio baseline, both behind Envoy", "",
             f"Machine: {_machine(result)}  ", f"Command: `{result['command']}` ({result['when']})  ",
             f"Each response: {result['parameters']['output_tokens']} tokens, "
             f"{result['parameters']['events_per_response']} SSE events in "
             f"{result['parameters']['messages_per_response']} gRPC messages.", "",
             "| target | streams | tokens/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | server CPU s/1k tok | Envoy CPU s/1k tok | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for run in sorted(result["runs"], key=lambda run: (run["target"] != "parley", run["concurrency"])):
        lines.append(f"| {run['target']} | {run['concurrency']} | {run['tokens_per_second']:,.0f} | "
                     f"{run['ttft_ms']['p50']} / {run['ttft_ms']['p99']} | {run['itl_ms']['p50']} / {run['itl_ms']['p99']} | "
                     f"{run['server_cpu_s_per_1k_tokens']} | {run['envoy_cpu_s_per_1k_tokens']} | {run['errors']} |")
    lines += ["", "| streams | Parley / baseline tokens/s | added TTFT p50 (ms) |", "|---|---|---|"]
    for level, ratio in result["parley_vs_baseline"].items():
        lines.append(f"| {level} | {ratio['tokens_per_second_ratio']} | {ratio['added_ttft_p50_ms']} |")
    memory = result["idle_stream_memory"]
    lines += ["", f"Idle open streams: {memory['streams']} streams grew the server's RSS by "
                  f"{memory['server_rss_growth_mb']} MiB: **{memory['kib_per_idle_stream']} KiB per idle stream**.",
              ""]
    cost = result.get("message_cost")
    if cost:
        lines += [f"gRPC and Envoy alone (the baseline sending one response's frames in "
                  f"{', '.join(str(point['messages']) for point in cost['points'])} messages, {cost['streams']} "
                  f"streams; a least-squares line through CPU per response): the server "
                  f"**{cost['server_us_per_response']} µs per response + {cost['server_us_per_message']} µs per "
                  f"message**, Envoy {cost['envoy_us_per_response']} µs + {cost['envoy_us_per_message']} µs.", ""]
    lines += paced_section(result)
    lines += durability_section(result)
    ceiling = result.get("pipeline_ceiling")
    if ceiling:
        lines += [f"Pipeline alone (no gRPC, no Envoy; in-process, {ceiling['streams']} streams): "
                  f"**{ceiling['cpu_us_per_token']} µs of CPU per token** "
                  f"({ceiling['cpu_us_per_token'] * result['parameters']['output_tokens'] / 1000:.2f} ms per response), "
                  f"{ceiling['tokens_per_second']:,} tokens/s. "
                  "However fast the transport, one core of this per-token work caps Parley there.", ""]
    lines += ["![serving](serving.png)", ""]
    return lines


def durability_section(result: dict) -> list[str]:
    """Acknowledged means durable, against write-behind: same server, same load, taking turns."""
    runs = result.get("durability")
    if not runs:
        return []
    lines = ["What durability costs: `acknowledged` (the default: a response's id and its terminal event leave "
             "only once stored, SQLite synchronous=FULL, group commit) against `relaxed` (write-behind).", "",
             "| durability | streams | tokens/s | TTFT p50 / p99 (ms) | server CPU s/1k tok |", "|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda run: (run["concurrency"], run["target"])):
        lines.append(f"| {run['target'].removeprefix('parley, ')} | {run['concurrency']} | "
                     f"{run['tokens_per_second']:,.0f} | {run['ttft_ms']['p50']} / {run['ttft_ms']['p99']} | "
                     f"{run['server_cpu_s_per_1k_tokens']} |")
    return lines + [""]


def paced_section(result: dict) -> list[str]:
    """CPU per token when tokens come at a model's pace: one message each, no batching to amortize it."""
    paced = result.get("paced")
    if not paced:
        return []
    lines = [f"At a CPU model's pace ({paced['tokens_per_second_per_stream']:g} tokens/s per stream, "
             f"{paced['messages_per_response']} gRPC messages per response): CPU per streamed token, in µs.", "",
             "| streams | Parley server | baseline server | Parley Envoy | baseline Envoy |", "|---|---|---|---|---|"]
    for level in sorted({run["concurrency"] for run in paced["runs"]}):
        ours, base = (next(r for r in paced["runs"] if r["target"] == target and r["concurrency"] == level)
                      for target in ("parley", "baseline"))
        lines.append(f"| {level} | {ours['server_cpu_s_per_1k_tokens'] * 1000:.0f} | "
                     f"{base['server_cpu_s_per_1k_tokens'] * 1000:.0f} | {ours['envoy_cpu_s_per_1k_tokens'] * 1000:.0f} | "
                     f"{base['envoy_cpu_s_per_1k_tokens'] * 1000:.0f} |")
    return lines + [""]


def _kv_cache(result: dict) -> str:
    """Parley's KV layout in a CPU engine run; runs before the setting existed used the shared pool."""
    return result["parameters"].get("parley_kv_cache", "shared")


KV_CACHE_TITLES = {"per_sequence": "Parley with a KV cache per sequence, as llama-server's slots",
                   "shared": "Parley with its default shared KV pool"}


def latest_cpu_runs() -> dict[str, dict]:
    """The latest CPU engine run of each Parley KV layout, llama-server's own layout first."""
    latest = {}
    for path in sorted(RESULTS.glob("cpu_engine-2*.json")):
        result = json.loads(path.read_text())
        latest[_kv_cache(result)] = result
    return {layout: latest[layout] for layout in KV_CACHE_TITLES if layout in latest}


def cpu_section(result: dict, image: str) -> list[str]:
    lines = ["## CPU engine: Parley (llama.cpp in-process) vs llama.cpp's llama-server, same GGUF: "
             + KV_CACHE_TITLES[_kv_cache(result)], "",
             f"Machine: {_machine(result)}  ", f"Command: `{result['command']}` ({result['when']})  ",
             f"{result['parameters']['description']}", "",
             "| server | concurrency | output tokens/s | every round's tokens/s | TTFT p50 / p99 (ms) | requests "
             "| errors |",
             "|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        each = ", ".join(f"{value:.1f}" for value in run.get("rounds_tokens_per_second", [run["tokens_per_second"]]))
        lines.append(f"| {run['target']} | {run['concurrency']} | {run['tokens_per_second']:.1f} | {each} | "
                     f"{run['ttft_ms']['p50']} / {run['ttft_ms']['p99']} | {run['requests']} | {run['errors']} |")
    lines += ["", "| concurrency | Parley / llama-server tokens/s | TTFT p50 Parley / llama-server (ms) |",
              "|---|---|---|"]
    for level, ratio in result["parley_vs_llama_server"].items():
        lines.append(f"| {level} | {ratio['tokens_per_second_ratio']} | {ratio['ttft_p50_ms']} |")
    lines += ["", f"![cpu engine]({image})", ""]
    return lines


def chart(result: dict, path: Path, title: str, key: str = "tokens_per_second") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    targets = sorted({run["target"] for run in result["runs"]})
    levels = sorted({run["concurrency"] for run in result["runs"]})
    width = 0.8 / len(targets)
    for index, target in enumerate(targets):
        values = [next((r[key] for r in result["runs"] if r["target"] == target and r["concurrency"] == level), 0)
                  for level in levels]
        positions = [i + index * width for i in range(len(levels))]
        axis.bar(positions, values, width, label=target)
        for x, value in zip(positions, values, strict=True):
            axis.text(x, value, f"{value:,.0f}", ha="center", va="bottom", fontsize=7)
    axis.set_xticks([i + width * (len(targets) - 1) / 2 for i in range(len(levels))], [str(v) for v in levels])
    axis.set_xlabel("concurrent streams")
    axis.set_ylabel("streamed tokens per second")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _run(result: dict, target: str, level: int) -> dict | None:
    return next((r for r in result["runs"] if r["target"] == target and r["concurrency"] == level), None)


def history_section() -> list[str]:
    """Every committed run, oldest first: this machine's speed drifts, so one run is not the truth."""
    lines = ["## Every committed run", "",
             "The machine is shared and its speed drifts by tens of percent over minutes. The pipeline's "
             "in-process CPU per token (same code, no transport) and llama-server's own tokens/s are "
             "yardsticks of how fast the machine was during each run.", "",
             "| serving run | CPU | Parley commit | pipeline µs/token | Parley tok/s at 64 | baseline tok/s at 64 "
             "| ratio at 64 | added TTFT p50 at 1 (ms) | idle stream KiB |", "|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(RESULTS.glob("serving-2*.json")):
        result = json.loads(path.read_text())
        parley, base = _run(result, "parley", 64), _run(result, "baseline", 64)
        ceiling = result.get("pipeline_ceiling", {}).get("cpu_us_per_token", "")
        ratio = result["parley_vs_baseline"].get("64", {}).get("tokens_per_second_ratio", "")
        ttft = result["parley_vs_baseline"].get("1", {}).get("added_ttft_p50_ms", "")
        lines.append(f"| {result['when']} | {_measured(result)} | {ceiling} | "
                     f"{parley['tokens_per_second']:,.0f} | {base['tokens_per_second']:,.0f} | {ratio} | {ttft} | "
                     f"{result['idle_stream_memory']['kib_per_idle_stream']} |" if parley and base else
                     f"| {result['when']} | {_measured(result)} | {ceiling} | | | | | |")
    lines += ["", "| CPU engine run | CPU | Parley commit | Parley KV cache | llama-server tok/s at 1 | ratio at 1 "
              "| ratio at 4 | ratio at 8 |", "|---|---|---|---|---|---|---|---|"]
    for path in sorted(RESULTS.glob("cpu_engine-2*.json")):
        result = json.loads(path.read_text())
        ratios = result["parley_vs_llama_server"]
        peer = _run(result, "llama-server", 1)
        lines.append(f"| {result['when']} | {_measured(result)} | {_kv_cache(result)} | "
                     f"{peer['tokens_per_second'] if peer else ''} | "
                     + " | ".join(str(ratios.get(str(level), {}).get("tokens_per_second_ratio", "")) for level in (1, 4, 8))
                     + " |")
    return lines + [""]


def lockstep_section(result: dict) -> list[str]:
    lines = ["## Lockstep: a batching GPU's rhythm (bench/lockstep.py)", "",
             f"Machine: {_machine(result)}  ", f"Command: `{result['command']}` ({result['when']})  ",
             f"Each response: {result['parameters']['tokens']} tokens, one per engine step per stream. "
             "`baseline`: the minimal grpc.aio server replaying the same messages at the same pace.", "",
             "| step ms | streams | target | engine tokens/s | delivered tokens/s | share | TTFT p50 / p99 (ms) | "
             "ITL p50 / p99 (ms) | server / Envoy / client cores | server / Envoy CPU ms per 1k tokens | "
             "server KiB per stream | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        target = run["target"] + (f", {run['durability']}" if run.get("durability") else "")
        if run.get("processes", 1) > 1 or run.get("store") == "postgresql":
            target += f", {run['processes']} × {run['store']}"
        if run.get("engine") == "shared process":
            target += f", sharing one engine process ({run['engine_process_cores']} cores)"
        lines.append(
            f"| {run['step_ms']:g} | {run['streams']} | {target} | {run['engine_tokens_per_second']:,} | "
            f"{run['tokens_per_second']:,} | {run['delivered_share']} | {run['ttft_ms']['p50']} / "
            f"{run['ttft_ms']['p99']} | {run['itl_ms']['p50']} / {run['itl_ms']['p99']} | {run['server_cores']} / "
            f"{run['envoy_cores']} / {run['client_cores']} | {run['server_cpu_ms_per_1k_tokens']} / "
            f"{run['envoy_cpu_ms_per_1k_tokens']} | {run['server_kib_per_stream']} | {run['errors']} |")
    verdict = result["verdict"]
    lines += ["", f"Target ({verdict['target']['streams']} streams, ≥ {verdict['target']['tokens_per_second']:,} "
              f"tokens/s, ITL p99 ≤ {verdict['target']['itl_p99_ms']} ms): {'met' if verdict['met'] else 'not met'}.",
              ""]
    return lines


def _measured(result: dict) -> str:
    """The CPU and the code of a run: runs on different CPUs do not compare, and a run of
    uncommitted code says so."""
    machine = result["machine"]
    code = machine["parley_commit"] + (" (modified)" if machine.get("parley_code_modified") else "")
    return f"{machine['cpu_model']} | {code}"


# The page's first part is written by hand (what the figures say); only what follows this line is
# regenerated.
MARKER = "<!-- everything below is generated by bench/report.py -->"


def main() -> None:
    page = RESULTS / "README.md"
    written = page.read_text() if page.exists() else "# Benchmark results\n"
    lines = [written.split(MARKER)[0].rstrip(), "", MARKER, ""]
    serving = _load("serving")
    if serving:
        lines += serving_section(serving)
        chart(serving, RESULTS / "serving.png", "Streamed tokens/s through Envoy (synthetic engine)")
    lockstep = _load("lockstep")
    if lockstep:
        lines += lockstep_section(lockstep)
    for layout, cpu in latest_cpu_runs().items():
        image = "cpu_engine.png" if layout == "per_sequence" else f"cpu_engine-{layout}.png"
        lines += cpu_section(cpu, image)
        chart(cpu, RESULTS / image, f"SmolLM2-135M Q4_1 on 2 cores, Parley KV {layout}: output tokens/s")
    lines += history_section()
    (RESULTS / "README.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'README.md'}")


if __name__ == "__main__":
    main()
