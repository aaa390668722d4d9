"""Test doubles of engines: the scripted engine with the hooks tests observe and steer."""

from __future__ import annotations

from parley.engine import scripted
from parley.engine.base import ChatMessage, EngineHealth, Finished, SamplingParams


class ScriptedEngine(scripted.ScriptedEngine):
    """Records prompts and sampling parameters, counts emitted tokens and aborted generations,
    fails on demand (`fail_after` tokens), can be declared dead (`dead`), and takes the scripts
    of its next generations from `upcoming` (one each, then `script` again). Every prompt is
    rendered whole (so that `prompts` sees each one) unless `by_message`."""

    message_rendering = None

    def __init__(self, *args, by_message: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if by_message:
            self.message_rendering = self
        self.prompts: list[list[ChatMessage]] = []
        self.last_params: SamplingParams | None = None
        self.last_prompt: list[int] | None = None  # the tokens of the last generation
        self.emitted_tokens = 0
        self.aborted = 0
        self.fail_after: int | None = None
        self.dead: str | None = None
        self.upcoming: list[list[str]] = []

    def render_prompt(self, messages: list[ChatMessage]) -> list[int]:
        self.prompts.append(list(messages))
        return super().render_prompt(messages)

    async def generate(self, prompt, params):
        self.last_params = params
        self.last_prompt = list(prompt)
        if self.upcoming:
            self.script = self.upcoming.pop(0)
        produced = 0
        finished = False
        steps = super().generate(prompt, params)
        try:
            async for step in steps:
                if isinstance(step, Finished):
                    finished = True
                else:
                    if self.fail_after is not None and produced >= self.fail_after:
                        raise RuntimeError("scripted engine failure")
                    produced += 1
                    self.emitted_tokens += 1
                yield step
        finally:
            await steps.aclose()
            if not finished:
                self.aborted += 1

    def health(self) -> EngineHealth:
        return EngineHealth(False, self.dead) if self.dead else super().health()
