"""The engine process (engine/host.py) and the remote engine that serving processes use
(engine/remote.py), over a real Unix socket: the TensorRT-LLM adapter on its fake in the engine
process, as on a GPU node, and the scripted engine where a test steers it.

Both ends run on one event loop here, so the remote engine's blocking calls (render_prompt,
check_constraint) go through a worker thread, as the service makes them."""

import asyncio
import contextlib
import tempfile
from pathlib import Path

import pytest
from parley import config
from parley.engine import wire
from parley.engine.base import (
    ChatMessage,
    Constraint,
    EngineDead,
    Finished,
    RequestFailed,
    SamplingParams,
    TextDelta,
    TokenLogprob,
)
from parley.engine.host import EngineHost
from parley.engine.remote import RemoteEngine
from parley.engine.trtllm import TensorRTLLMEngine

from tests.fakes import tensorrt_llm as fake
from tests.fakes.engines import ScriptedEngine
from tests.support.generations import collect, eventually


@pytest.fixture
def socket_path():
    with tempfile.TemporaryDirectory(prefix="parley-engine-") as directory:  # short: AF_UNIX paths are
        yield str(Path(directory) / "engine.sock")                          # at most 107 bytes


@pytest.fixture
def trtllm(smollm2_checkpoint_dir):
    settings = config.load(environ={}, engine="tensorrt_llm", model_path=str(smollm2_checkpoint_dir),
                           context_window=4096)
    return TensorRTLLMEngine.from_settings(settings, api=fake.install_api())


@contextlib.asynccontextmanager
async def connected(engine, socket_path):
    """`engine` in an engine host, and a remote engine connected to it."""
    host = EngineHost(engine, socket_path)
    await host.start()
    remote = RemoteEngine(socket_path)
    try:
        await remote.start()
        yield host, remote
    finally:
        await remote.close()
        await host.stop()


# -- the wire --------------------------------------------------------------------------------------


def test_sampling_params_constraints_and_deltas_cross_the_wire_unchanged():
    import orjson

    constraint = Constraint(kind="tools", tools=(("get_weather", {"type": "object"}), ("noop", None)), mode="required",
                            parallel=False, max_calls=2)
    params = SamplingParams(max_tokens=9, temperature=0.2, top_p=0.9, presence_penalty=0.1, frequency_penalty=0.3,
                            seed=5, constraint=constraint, top_logprobs=2, cache_scope="proj")
    assert wire.decode_params(orjson.loads(orjson.dumps(wire.encode_params(params)))) == params
    delta = TextDelta("hé", 1, (TokenLogprob("hé", -0.25, (104, 195, 169), (("hé", -0.25, (104, 195, 169)),
                                                                             ("ha", -1.5, (104, 97)))),))
    for sent in (delta, TextDelta(" x", 0)):
        assert wire.decode_delta(orjson.loads(orjson.dumps(wire.encode_delta(sent)))) == sent
    finished = Finished("length", 12, 9, 8, 4)
    assert wire.decode_finished(orjson.loads(orjson.dumps(wire.encode_finished(finished)))) == finished


def test_structured_messages_cross_the_wire_unchanged_and_plain_ones_stay_short():
    import orjson

    messages = [ChatMessage("developer", "Be brief.", tools='[{"name": "f"}]'), ChatMessage("user", "Hi"),
                ChatMessage("assistant", "", calls=(("c1", "f", "{}"), ("c2", "g", '{"a": 1}'))),
                ChatMessage("tool", "ok", call=("c1", "f")), ChatMessage("tool", "?", call=("c9", None)),
                ChatMessage("developer", "", effort="high")]
    assert wire.decode_messages(orjson.loads(orjson.dumps(wire.encode_messages(messages)))) == messages
    assert wire.encode_messages([messages[1]]) == [["user", "Hi"]]


async def test_a_template_that_renders_tools_does_so_in_the_engine_process(thinking_checkpoint_dir, socket_path):
    settings = config.load(environ={}, engine="tensorrt_llm", model_path=str(thinking_checkpoint_dir),
                           context_window=4096)
    engine = TensorRTLLMEngine.from_settings(settings, api=fake.install_api())
    async with connected(engine, socket_path) as (host, remote):
        assert remote.native_tools and remote.reasoning_efforts == engine.reasoning_efforts == ("none",)
        messages = [ChatMessage("developer", "", tools='[{"name": "f", "description": "F.", "parameters": {}}]'),
                    ChatMessage("user", "Hi"), ChatMessage("assistant", "", calls=(("c1", "f", "{}"),)),
                    ChatMessage("tool", "ok", call=("c1", "f"))]
        assert await asyncio.to_thread(remote.render_prompt, messages) == engine.render_prompt(messages)
        off = [ChatMessage("developer", "", effort="none"), ChatMessage("user", "Hi")]
        assert await asyncio.to_thread(remote.render_prompt, off) == engine.render_prompt(off)


# -- the TensorRT-LLM adapter in an engine process -------------------------------------------------


async def test_the_engine_process_serves_what_the_engine_serves_in_process(trtllm, socket_path):
    async with connected(trtllm, socket_path) as (host, remote):
        assert (remote.model_id, remote.context_window, remote.tool_format, remote.reasoning_format) == (
            trtllm.model_id, trtllm.context_window, trtllm.tool_format, trtllm.reasoning_format)
        messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "Say hello.")]
        prompt = await asyncio.to_thread(remote.render_prompt, messages)
        assert prompt == trtllm.render_prompt(messages)  # the checkpoint's template, in the engine process
        params = SamplingParams(max_tokens=64, temperature=0.0, seed=3, top_logprobs=1, cache_scope="p")
        remote_deltas, remote_finished = await collect(remote, prompt, params)
        local_deltas, local_finished = await collect(trtllm, prompt, params)
        assert "".join(d.text for d in remote_deltas) == "".join(d.text for d in local_deltas) == trtllm._llm.default_reply
        assert [d.logprobs for d in remote_deltas] == [d.logprobs for d in local_deltas]
        assert remote_finished == local_finished
        first, second = (s.sampling_params for s in trtllm._llm.submitted[-2:])
        assert (first.max_tokens, first.temperature, first.seed) == (second.max_tokens, second.temperature, 3)


async def test_closing_the_remote_stream_aborts_the_request_in_the_engine_process(trtllm, socket_path):
    async with connected(trtllm, socket_path) as (host, remote):
        trtllm._llm.step_seconds = 0.01
        steps = remote.generate([1, 2, 3], SamplingParams(max_tokens=64))
        assert isinstance((await anext(steps))[0], TextDelta)
        await steps.aclose()
        output = trtllm._llm.submitted[-1].output
        await eventually(output.aborted)
        await output.aresult()
        assert output.outputs[0].finish_reason == "cancelled"
        assert not host.connections or not next(iter(host.connections)).tasks  # nothing left running there


async def test_a_request_error_fails_that_request_only_and_a_dead_engine_fails_all(trtllm, socket_path):
    async with connected(trtllm, socket_path) as (host, remote):
        trtllm._llm.fail_after = (2, "Encountered an error in forward step")
        with pytest.raises(RequestFailed, match="forward step"):
            await collect(remote, [1, 2], SamplingParams(max_tokens=64))
        trtllm._llm.fail_after = None
        assert (await collect(remote, [1, 2], SamplingParams(max_tokens=64)))[1].reason == "stop"

        trtllm._llm.step_seconds = 0.05
        running = [asyncio.create_task(collect(remote, [1, 2], SamplingParams(max_tokens=64))) for _ in range(3)]
        await asyncio.sleep(0.05)
        trtllm._llm.kill("rank 1 exited")
        results = await asyncio.gather(*running, return_exceptions=True)
        assert all(isinstance(result, EngineDead) and "rank 1 exited" in str(result) for result in results)
        await eventually(lambda: not remote.health().ok)  # the engine process's status says so
        assert "EngineDeadError" in remote.health().detail


async def test_a_constraint_the_engine_cannot_enforce_is_refused_and_the_verdict_kept(trtllm, socket_path):
    async with connected(trtllm, socket_path) as (host, remote):
        lookahead = Constraint(kind="json_schema", schema={"type": "string", "pattern": "^(?=a)b$"})
        with pytest.raises(ValueError, match="lookarounds"):
            await asyncio.to_thread(remote.check_constraint, lookahead)
        await asyncio.to_thread(remote.check_constraint, Constraint(kind="json_object"))
        remote.check_constraint(None)
        await host.stop()  # the verdicts stay: no round trip for a constraint seen before
        with pytest.raises(ValueError, match="lookarounds"):
            remote.check_constraint(lookahead)
        remote.check_constraint(Constraint(kind="json_object"))


# -- a steered engine: health, aborts, and the engine process going away ----------------------------


async def test_health_and_kv_cache_usage_follow_the_engine_process(socket_path):
    engine = ScriptedEngine()
    engine.kv_cache_usage = lambda: 0.25
    async with connected(engine, socket_path) as (host, remote):
        assert remote.health().ok and remote.kv_cache_usage() == 0.25
        engine.dead = "the GPU fell off the bus"
        await eventually(lambda: not remote.health().ok)
        assert remote.health().detail == "the GPU fell off the bus"
        engine.dead = None
        await eventually(lambda: remote.health().ok)


async def test_an_engine_process_that_goes_away_fails_running_work_and_is_reconnected(socket_path):
    engine = ScriptedEngine(script=["tok "] * 200, delay=0.01)
    async with connected(engine, socket_path) as (host, remote):
        running = asyncio.create_task(collect(remote, [1], SamplingParams(max_tokens=200)))
        await eventually(lambda: engine.emitted_tokens > 2)
        await host.stop()
        with pytest.raises(EngineDead, match="went away"):
            await running
        assert not remote.health().ok
        with pytest.raises(EngineDead):
            await collect(remote, [1], SamplingParams(max_tokens=4))
        with pytest.raises(EngineDead):
            await asyncio.to_thread(remote.render_prompt, [ChatMessage("user", "hi")])

        engine.script = None
        host = EngineHost(engine, socket_path)  # the engine container restarted
        await host.start()
        await eventually(lambda: remote.health().ok)  # reconnected within a second or so
        deltas, finished = await collect(remote, [1], SamplingParams(max_tokens=64))
        assert "".join(d.text for d in deltas) == "Hello from Parley's scripted engine."
        prompt = await asyncio.to_thread(remote.render_prompt, [ChatMessage("user", "hi")])
        assert prompt == engine.render_prompt([ChatMessage("user", "hi")])


async def test_many_streams_share_one_connection_and_each_gets_its_own_tokens(socket_path):
    engine = ScriptedEngine(script=[f" w{i}" for i in range(30)], delay=0.001)
    async with connected(engine, socket_path) as (host, remote):
        results = await asyncio.gather(*(collect(remote, [1], SamplingParams(max_tokens=limit))
                                         for limit in range(1, 41)))
        for limit, (deltas, finished) in zip(range(1, 41), results, strict=True):
            expected = min(limit, 30)
            assert "".join(d.text for d in deltas) == "".join(f" w{i}" for i in range(expected))
            assert (finished.output_tokens, finished.reason) == (expected, "length" if limit < 30 else "stop")
        assert len(host.connections) == 1


async def test_a_bug_in_the_engine_process_stays_generic(socket_path):
    engine = ScriptedEngine()
    engine.fail_after = 1
    async with connected(engine, socket_path) as (host, remote):
        with pytest.raises(RuntimeError, match="the engine process failed") as failure:
            await collect(remote, [1], SamplingParams(max_tokens=8))
        assert not isinstance(failure.value, (EngineDead, RequestFailed))  # not shown to clients as the engine's


# -- settings ----------------------------------------------------------------------------------------


def test_remote_needs_a_socket_and_refuses_the_engine_process_settings():
    with pytest.raises(ValueError, match="engine remote needs engine_socket"):
        config.load(environ={}, engine="remote")
    with pytest.raises(ValueError, match="synthetic_step_ms is a setting of the engine process"):
        config.load(environ={}, engine="remote", engine_socket="/tmp/e.sock", synthetic_step_ms=20)
    with pytest.raises(ValueError, match="trtllm_tensor_parallel_size is a setting of the engine process"):
        config.load(environ={}, engine="remote", engine_socket="/tmp/e.sock", trtllm_tensor_parallel_size=2)
    with pytest.raises(ValueError, match="template_tools is a setting of the engine process"):
        config.load(environ={"PARLEY_TEMPLATE_TOOLS": "false"}, engine="remote", engine_socket="/tmp/e.sock")
    assert config.load(environ={}, engine="remote", engine_socket="/tmp/e.sock").engine_socket == "/tmp/e.sock"


@pytest.mark.parametrize(("argv", "message"), [
    (["engine"], "parley engine needs engine_socket"),
    (["engine", "--engine", "remote", "--engine-socket", "/tmp/e.sock"], "not remote"),
    (["serve", "--engine", "synthetic", "--engine-socket", "/tmp/e.sock"], "engine synthetic does not use it"),
])
def test_the_cli_refuses_a_socket_that_would_be_ignored(argv, message, capsys):
    from parley.cli import main

    with pytest.raises(SystemExit) as exit_status:
        main(argv)
    assert exit_status.value.code == 2
    assert message in capsys.readouterr().err

