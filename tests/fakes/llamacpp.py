"""The real llama.cpp engine, instrumented for tests: what its last generation did, so a test can
prove that a disconnect or a cancel stopped the model within a token or two."""

from __future__ import annotations

import dataclasses
import threading

from parley.engine.llamacpp import LlamaCppEngine


@dataclasses.dataclass
class RunStats:
    prompt: list[int] = dataclasses.field(default_factory=list)
    produced: int = 0
    produced_when_stopped: int | None = None  # None: ran to its end
    # Set once the sequence has left the batch (finished, failed or stopped).
    released: threading.Event = dataclasses.field(default_factory=threading.Event)


class InstrumentedLlamaCppEngine(LlamaCppEngine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_run = RunStats()
        self.recent_runs: list[RunStats] = []  # the last 32, oldest first
        self._runs: dict[int, RunStats] = {}  # by id() of the request's SamplingParams

    def run_with(self, text: str) -> RunStats | None:
        """The latest run whose prompt contains `text` (another request's run may have started
        since: `last_run` is then not this request's)."""
        for stats in reversed(self.recent_runs):
            if text in self._llm.detokenize(stats.prompt).decode("utf-8", "replace"):
                return stats
        return None

    async def generate(self, prompt, params):
        stats = self.last_run = self._runs[id(params)] = RunStats(list(prompt))
        self.recent_runs = [*self.recent_runs[-31:], stats]
        steps = super().generate(prompt, params)
        ended = False
        try:
            async for step in steps:
                yield step
            ended = True
        finally:
            if not ended:
                stats.produced_when_stopped = stats.produced
            await steps.aclose()  # returns once the sequence has left the batch
            self._runs.pop(id(params), None)

    # The two hooks below run on the engine's worker thread.

    def _accept(self, sequence, token, index):
        finished = super()._accept(sequence, token, index)
        stats = self._runs.get(id(sequence.params))
        if stats is not None:
            stats.produced = sequence.produced
        return finished

    def _release(self, sequence, error=None):
        stats = self._runs.get(id(sequence.params))  # before: the release lets generate() forget it
        super()._release(sequence, error)
        if stats is not None:
            stats.released.set()


class EndlessLlamaCppEngine(InstrumentedLlamaCppEngine):
    """The real engine with end-of-generation tokens taken as text: every request runs to its
    budget, as a long generation does, so tests can fill the KV pool on purpose. Counts
    preemptions."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sampling.end_of_generation = frozenset()
        self.preempted_outputs: list[int] = []  # produced tokens of each preempted sequence

    def _preempt(self, sequence, waiting, active):  # on the worker thread
        self.preempted_outputs.append(sequence.produced)
        super()._preempt(sequence, waiting, active)
