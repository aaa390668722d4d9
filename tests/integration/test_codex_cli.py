"""The real Codex CLI (npm `@openai/codex`) against Parley through Envoy, unchanged: a custom
model provider with `wire_api = "responses"`. Skipped, with a message, where npm or the
package cannot be had."""

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.stack import running_stack

pytestmark = [pytest.mark.integration]

CODEX_VERSION = "0.171.0"
CODEX_DIR = Path(__file__).resolve().parents[2] / ".tools" / "codex"
CODEX = CODEX_DIR / "node_modules" / ".bin" / "codex"


@pytest.fixture(scope="module")
def codex() -> Path:
    if not CODEX.exists():
        if shutil.which("npm") is None:
            unavailable("npm is not installed here, so the Codex CLI test did not run")
        installed = subprocess.run(["npm", "install", "--prefix", str(CODEX_DIR), "--no-audit", "--no-fund",
                                    "--loglevel=error", f"@openai/codex@{CODEX_VERSION}"],
                                   capture_output=True, text=True, timeout=600)
        if installed.returncode != 0 or not CODEX.exists():
            unavailable(f"npm could not install @openai/codex@{CODEX_VERSION}, so the Codex CLI test did not run: "
                        f"{installed.stderr.strip()[-300:]}")
    return CODEX


def unavailable(message: str) -> None:
    """Skipped where the CLI cannot be had; under CI, which reaches npm's registry, a failure."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


async def run_codex(codex: Path, base_url: str, model: str, prompt: str, folder: Path,
                    timeout: float = 300, resume: bool = False, options: tuple[str, ...] = ()
                    ) -> subprocess.CompletedProcess:
    """`codex exec` with its defaults (read-only sandbox, no approvals), Parley as the provider,
    in `folder`/work with its state in `folder`/home; `resume`: the next turn of the last
    session; `options`: more `-c key=value` settings."""
    home, workdir = folder / "home", folder / "work"
    provider = f'{{name="Parley", base_url="{base_url}", wire_api="responses", env_key="PARLEY_TEST_KEY"}}'
    command = [str(codex), "exec", *(["resume", "--last"] if resume else []), "--skip-git-repo-check", "--json",
               "-c", "model_provider=parley", "-c", f"model_providers.parley={provider}", "-c", f"model={model}",
               *(f"-c{option}" for option in options), prompt]
    home.mkdir(exist_ok=True)
    workdir.mkdir(exist_ok=True)
    environment = {**os.environ, "CODEX_HOME": str(home), "PARLEY_TEST_KEY": "unused", "NO_COLOR": "1"}
    return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=timeout,
                                   env=environment, stdin=subprocess.DEVNULL, cwd=workdir)


RUN_A_COMMAND = '<tool_call>\n{"name": "exec_command", "arguments": {"cmd": "echo parley-$((6*7))"}}\n</tool_call>'


def scripted(*replies: str):
    """A scripted engine whose next generations answer with `replies`, one each; a window that
    holds Codex's prompt (its instructions and tools are about 10k words)."""
    from tests.fakes.engines import ScriptedEngine

    engine = ScriptedEngine(model_id="scripted", context_window=1 << 20)
    engine.upcoming = [[reply] for reply in replies]
    return engine


def events_of(result: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


async def test_a_codex_session_calls_a_tool_and_answers_with_its_output(codex, tmp_path):
    engine = scripted(RUN_A_COMMAND, "The command printed parley-42.",
                      "You asked me to run a command; it printed parley-42.")
    async with running_stack(tmp_path / "codex.sqlite3", engine=engine) as stack:
        first = await run_codex(codex, stack.base_url, "scripted", "Run a command for me.", tmp_path)
        assert first.returncode == 0, (first.stdout[-3000:], first.stderr[-2000:])
        completed = [e["item"] for e in events_of(first) if e.get("type") == "item.completed"]
        commands = [item for item in completed if item.get("type") == "command_execution"]
        assert commands and "parley-42" in commands[0]["aggregated_output"]
        assert [item["text"] for item in completed if item.get("type") == "agent_message"] == [
            "The command printed parley-42."]
        # The model's call came back to it as a function_call_output, rendered in its format.
        assert any("<tool_response>" in m.content and "parley-42" in m.content for m in engine.prompts[-1])

        second = await run_codex(codex, stack.base_url, "scripted", "What did you do?", tmp_path, resume=True)
        assert second.returncode == 0, (second.stdout[-3000:], second.stderr[-2000:])
        assert any(e.get("type") == "turn.completed" for e in events_of(second))
        # Turn two of the session (store: false, so Codex sends the history again) held turn one.
        history = [m.content for m in engine.prompts[-1]]
        assert "Run a command for me." in "".join(history) and "What did you do?" in history[-1]


@pytest.mark.model
async def test_a_codex_session_runs_on_the_cpu_default(codex, tmp_path):
    """The real SmolLM2, with a context window that holds Codex's prompt (about 10k tokens of
    instructions and tools). The tiny model writes no good code and may ramble to its token
    limit (Codex then reports the turn incomplete); the protocol must hold all the same: every
    request Codex sends is served, and Codex reads every reply."""
    from parley import config
    from parley.engine.registry import build_engine

    settings = config.load(environ={}, context_window=32768, max_concurrent_generations=1)
    engine = await asyncio.to_thread(build_engine, settings)
    async with running_stack(tmp_path / "codex-model.sqlite3", engine=engine, context_window=32768,
                             default_max_output_tokens=256) as stack:
        result = await run_codex(codex, stack.base_url, "SmolLM2-135M-Instruct", "Reply with one word: ok.",
                                 tmp_path, timeout=600)
    events = events_of(result)
    failures = [e["error"]["message"] for e in events if e.get("type") == "turn.failed"]
    assert failures in ([], ["Incomplete response returned, reason: max_output_tokens"]), events[-5:]
    assert not [e for e in events if e.get("type") == "error" and "max_output_tokens" not in e["message"]], events
    assert failures or any(e.get("type") == "turn.completed" for e in events)
    assert result.returncode == (1 if failures else 0), result.stderr[-2000:]


async def test_a_codex_session_that_outgrows_its_limit_is_compacted_and_goes_on(codex, tmp_path):
    """Past `model_auto_compact_token_limit` Codex compacts. With a custom provider it asks the
    model for a handoff summary in an ordinary request, then goes on from that summary."""
    engine = scripted(RUN_A_COMMAND, "Summary: the user asked for a command; it printed parley-42.",
                      "The command printed parley-42.")
    async with running_stack(tmp_path / "codex-compact.sqlite3", engine=engine) as stack:
        result = await run_codex(codex, stack.base_url, "scripted", "Run a command for me.", tmp_path,
                                 options=("model_auto_compact_token_limit=3000",))
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-2000:])
    asked, continued = engine.prompts[-2:]
    assert "CONTEXT CHECKPOINT COMPACTION" in asked[-1].content
    assert "Summary: the user asked for a command; it printed parley-42." in continued[-1].content
    messages = [e["item"]["text"] for e in events_of(result)
                if e.get("type") == "item.completed" and e["item"].get("type") == "agent_message"]
    assert messages[-1] == "The command printed parley-42."
