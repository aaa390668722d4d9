import asyncio

from parley.engine import synthetic
from parley.engine.base import Finished, SamplingParams
from parley.engine.synthetic import BURST, SyntheticEngine


async def steps(engine: SyntheticEngine, max_tokens: int = 1000) -> list:
    return [step async for step in engine.generate([1, 2, 3], SamplingParams(max_tokens=max_tokens))]


async def test_paced_tokens_come_one_per_step_at_the_rate(monkeypatch):
    # A paced engine stands in for a model that emits a token at a time: one token per step,
    # the k-th (from 0) at k / rate, never two at once (the pace of a CPU model in benchmarks),
    # and one timer per token: the serving path's cost per token is measured beside it.
    sleeps = []

    class CountingAsyncio:  # the engine module's own asyncio: other tasks' sleeps do not count
        def __getattr__(self, name):
            return getattr(asyncio, name)

        @staticmethod
        def sleep(delay):
            sleeps.append(delay)
            return asyncio.sleep(delay)

    monkeypatch.setattr(synthetic, "asyncio", CountingAsyncio())
    engine = SyntheticEngine(output_tokens=4, tokens_per_second=10)
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await steps(engine)
    elapsed = loop.time() - started
    assert [len(step) for step in result[:-1]] == [1, 1, 1, 1]
    assert len(sleeps) == 3  # the first token is due at once
    assert result[-1] == Finished("stop", 3, 4)
    assert elapsed >= 0.29  # the 4th token is due at 0.3 s (timers may fire up to a ms early)


async def test_unpaced_tokens_come_in_bursts_and_max_tokens_cuts_with_length():
    engine = SyntheticEngine(output_tokens=40)
    result = await steps(engine)
    assert [len(step) for step in result[:-1]] == [BURST, BURST, 40 - 2 * BURST]
    assert result[-1] == Finished("stop", 3, 40)
    cut = await steps(engine, max_tokens=5)
    assert [len(step) for step in cut[:-1]] == [5]
    assert cut[-1] == Finished("length", 3, 5)


async def test_lockstep_streams_share_the_engine_clock_and_a_slow_reader_gets_tokens_together():
    engine = SyntheticEngine(output_tokens=6, step_seconds=0.01)
    fast = asyncio.create_task(steps(engine))
    slow_steps = []

    async def slow():
        async for step in engine.generate([1], SamplingParams(max_tokens=1000)):
            slow_steps.append(step)
            await asyncio.sleep(0.035)  # several steps pass while this reader is busy

    await asyncio.gather(fast, slow())
    fast_steps = fast.result()
    assert sum(len(step) for step in fast_steps[:-1]) == 6 and fast_steps[-1] == Finished("stop", 3, 6)
    assert sum(len(step) for step in slow_steps[:-1]) == 6 and slow_steps[-1] == Finished("stop", 1, 6)
    assert any(len(step) > 1 for step in slow_steps[:-1])  # due tokens piled up and went together
    assert engine._clock._waiting == []  # nobody left waiting on a step


async def test_lockstep_cancelling_one_stream_leaves_the_others_running():
    engine = SyntheticEngine(output_tokens=5, step_seconds=0.01)
    doomed = asyncio.create_task(steps(engine))
    survivor = asyncio.create_task(steps(engine))
    await asyncio.sleep(0.015)
    doomed.cancel()
    result = await survivor
    assert result[-1] == Finished("stop", 3, 5)
