"""The production GPU engine: TensorRT-LLM's LLM API (PyTorch backend, 1.2 to 1.4rc).

This is the one module that imports `tensorrt_llm`, and only when this engine is chosen
(`load_api`); the CPU path never does. Everything the adapter uses goes through a `TrtllmApi`,
so tests hand it a fake that keeps TensorRT-LLM's contract (tests/fakes/tensorrt_llm.py) and
nothing else changes.

What the LLM API demands, and what this adapter does about it (docs/engines.md has the sources):
- `generate_async` is a plain call that must be made on the event-loop thread (its result's
  queue binds to the loop running there); it returns at once, and `async for` yields the same
  mutated RequestOutput each step, its `text_diff`/`token_ids_diff` being what is new.
- SamplingParams is mutated by the engine and defaults to 32 tokens: a fresh one per request,
  every field Parley controls set explicitly (an unset temperature would take the checkpoint's
  generation_config defaults, not OpenAI's).
- Guided decoding is silently ignored unless the LLM was built with a backend: without one,
  constraints are refused (check_constraint) instead.
- Abort is `abort()` on the result; the engine then ends the stream with `cancelled`.
- RequestError (a RuntimeError) fails one request; EngineDeadError (or CppExecutorError) is the
  engine's death: sticky, raised on every pending and new request.
- Iteration stats (the KV cache's used and total blocks) come only from an LLM built with
  `enable_iter_perf_stats`, through `get_stats_async`, whose round ends when the engine has not
  stepped for its timeout; the adapter follows it from `start()` and asks again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from parley.config import Settings
from parley.engine import template_tools
from parley.engine.base import (
    ChatMessage,
    Constraint,
    EngineDead,
    EngineHealth,
    Finished,
    RequestFailed,
    SamplingParams,
    TextDelta,
    TokenLogprob,
)
from parley.engine.formats import formats_of_template, harmony, tool_format
from parley.engine.grammar import compile_constraint, constraint_key, lazy
from parley.engine.segments import TemplateSegments
from parley.log import get_logger

log = get_logger(__name__)

_NOT_THERE = ()  # an exception class a build lacks: `except ()` matches nothing
GUIDE_CACHE_SIZE = 256  # compiled guides kept (an agent's tools and schema repeat turn after turn)


@dataclasses.dataclass(frozen=True)
class TrtllmApi:
    """The names the adapter uses from tensorrt_llm, resolved once."""

    LLM: Any
    SamplingParams: Any
    GuidedDecodingParams: Any
    KvCacheConfig: Any
    RequestError: Any
    fatal_errors: tuple  # EngineDeadError, CppExecutorError: whichever this build has


def load_api() -> TrtllmApi:
    """Import TensorRT-LLM (a GPU machine with NVIDIA's wheel or container)."""
    try:
        import tensorrt_llm
        from tensorrt_llm.llmapi import GuidedDecodingParams, KvCacheConfig
    except ImportError as exc:
        raise RuntimeError("engine tensorrt_llm needs the tensorrt_llm package (NVIDIA's TensorRT-LLM container "
                           f"or wheel, on a machine with an NVIDIA GPU): {exc}") from None
    import importlib

    def exception(module: str, name: str):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return _NOT_THERE

    fatal = tuple(cls for cls in (exception("tensorrt_llm.executor", "EngineDeadError"),
                                  exception("tensorrt_llm.executor.executor", "CppExecutorError"))
                  if cls is not _NOT_THERE)
    return TrtllmApi(LLM=tensorrt_llm.LLM, SamplingParams=tensorrt_llm.SamplingParams,
                     GuidedDecodingParams=GuidedDecodingParams, KvCacheConfig=KvCacheConfig,
                     RequestError=exception("tensorrt_llm.executor.utils", "RequestError"), fatal_errors=fatal)


def llm_arguments(settings: Settings, api: TrtllmApi) -> dict:
    """LLM(...) keyword arguments from Parley's settings, then the operator's extra options
    (which win: they are the escape hatch for what Parley has no setting for)."""
    arguments: dict[str, Any] = {
        "tensor_parallel_size": settings.trtllm_tensor_parallel_size,
        "pipeline_parallel_size": settings.trtllm_pipeline_parallel_size,
        "dtype": settings.trtllm_dtype,
        "max_num_tokens": settings.trtllm_max_num_tokens,
        "max_seq_len": settings.context_window,
        "enable_chunked_prefill": settings.trtllm_enable_chunked_prefill,
        "kv_cache_config": api.KvCacheConfig(
            enable_block_reuse=settings.trtllm_kv_cache_block_reuse,
            free_gpu_memory_fraction=settings.trtllm_kv_cache_free_gpu_memory_fraction),
    }
    if settings.trtllm_max_batch_size:
        arguments["max_batch_size"] = settings.trtllm_max_batch_size
    if settings.trtllm_iteration_stats:  # the PyTorch backend reports no iteration stats without it
        arguments["enable_iter_perf_stats"] = True
    if settings.trtllm_guided_decoding_backend != "none":
        arguments["guided_decoding_backend"] = settings.trtllm_guided_decoding_backend
    if settings.trtllm_extra_options:
        import yaml

        extra = yaml.safe_load(Path(settings.trtllm_extra_options).read_text()) or {}
        if not isinstance(extra, dict):
            raise ValueError(f"trtllm_extra_options {settings.trtllm_extra_options!r} must hold a YAML mapping")
        if isinstance(extra.get("kv_cache_config"), dict):
            extra["kv_cache_config"] = api.KvCacheConfig(**extra["kv_cache_config"])
        arguments.update(extra)
    return arguments


def _clamp(value, low: int, high: int) -> int:
    try:
        return max(low, min(high, int(value)))
    except (TypeError, ValueError):
        return low


class TensorRTLLMEngine:
    renders_off_loop = True  # a Hugging Face tokenizer over a whole conversation takes milliseconds

    # get_stats_async's round ends after this long without an engine step (the engine is idle).
    STATS_TIMEOUT_SECONDS = 2.0
    STATS_RETRY_SECONDS = 1.0

    def __init__(self, llm, api: TrtllmApi, *, model_id: str, context_window: int, guided: bool,
                 tool_format_name: str = "auto", iteration_stats: bool = False, use_template_tools: bool = True):
        self._llm = llm
        self._iteration_stats = iteration_stats
        self._kv_usage: dict[int, float] = {}  # attention-DP rank: used / max KV blocks, its latest step
        self._stats: asyncio.Task | None = None
        self._in_flight = 0
        self._api = api
        self._guided = guided
        self.model_id = model_id
        self.context_window = context_window
        tokenizer = llm.tokenizer
        if tokenizer is None:
            raise RuntimeError("the TensorRT-LLM engine was built without a tokenizer; Parley renders prompts with "
                               "the checkpoint's tokenizer and chat template")
        self._tokenizer = tokenizer
        self._hf = getattr(tokenizer, "tokenizer", tokenizer)  # TransformersTokenizer wraps the HF tokenizer
        template = getattr(self._hf, "chat_template", None)
        if not template:
            raise RuntimeError("the checkpoint's tokenizer has no chat template (tokenizer_config.json "
                               "`chat_template` or chat_template.jinja)")
        detected_tools, self.reasoning_format = formats_of_template(template)
        if tool_format(detected_tools).channels and tool_format_name not in ("auto", detected_tools):
            raise ValueError(f"trtllm_tool_format {tool_format_name!r} does not fit this checkpoint: its chat "
                             f"template writes the {detected_tools} format")
        self.tool_format = detected_tools if tool_format_name == "auto" else tool_format_name
        self._format = tool_format(self.tool_format)
        self._stop_ids: list[int] | None = None
        self.native_tools = False
        if self._format.channels:
            # Harmony: Parley's own renderer, markers kept in the decoded text, stopped on <|return|>
            # and <|call|> (formats/harmony.py). Results are rendered with their calls' names, found
            # in the whole context: the prompt is rendered whole.
            self.reasoning_format = self._format.name
            marker_ids = self._marker_ids(harmony.MARKERS)
            self._stop_ids = [marker_ids[marker] for marker in harmony.STOPS]
            self.message_rendering, why_not = None, "harmony prompts are rendered whole"
            why_native = "harmony is rendered by Parley"
        else:
            self.native_tools, why_native = template_tools.check(template, self._render_chat, self._format,
                                                                 use_template_tools)
        if self.native_tools:
            # Structured tool messages, rendered whole: a template groups consecutive results and
            # writes the tools into the system message, so messages do not render one by one.
            self.message_rendering, why_not = None, "the template renders tools itself"
        elif not self._format.channels:
            # The prompt message by message where the template allows it (engine/segments.py).
            boundaries = self._boundaries()
            self.message_rendering, why_not = TemplateSegments.checked(self._render_text, self._tokenize,
                                                                        boundaries.__contains__)
        log.info("engine.prompt_rendering", by_message=self.message_rendering is not None, reason=why_not)
        log.info("engine.tool_rendering", by_template=self.native_tools, reason=why_native)
        self.reasoning_efforts = template_tools.efforts_of(template, self.reasoning_format,
                                                           self.message_rendering is None)
        self._dead: str | None = None
        self._closed = False
        self._guides: dict[str, tuple[str, str]] = {}
        # `cache_salt` (TensorRT-LLM 1.1 and later): requests with different salts never share KV
        # blocks. Passed only where this build's generate_async names it.
        self._salts = "cache_salt" in _parameters(llm.generate_async)
        log.info("engine.ready", engine="tensorrt_llm", model=model_id, tool_format=self.tool_format,
                 reasoning_format=self.reasoning_format, reasoning_efforts=self._format.efforts + self.reasoning_efforts,
                 guided_decoding=guided)

    @classmethod
    def from_settings(cls, settings: Settings, api: TrtllmApi | None = None) -> "TensorRTLLMEngine":
        api = api or load_api()
        arguments = llm_arguments(settings, api)
        log.info("engine.loading", engine="tensorrt_llm", model_path=settings.model_path,
                 **{key: value for key, value in arguments.items() if key != "kv_cache_config"})
        try:
            llm = api.LLM(model=settings.model_path, **arguments)
        except (TypeError, ValueError) as exc:  # an unknown or invalid argument: a configuration error
            raise ValueError(f"invalid TensorRT-LLM configuration: {exc}") from None
        return cls(llm, api, model_id=settings.model_name, context_window=settings.context_window,
                   guided=settings.trtllm_guided_decoding_backend != "none", tool_format_name=settings.trtllm_tool_format,
                   iteration_stats=bool(arguments.get("enable_iter_perf_stats")),
                   use_template_tools=settings.template_tools)

    async def start(self) -> None:
        """Follow the iteration stats (on the loop, where the LLM was built) for kv_cache_usage()."""
        if self._iteration_stats and self._stats is None:
            self._stats = asyncio.get_running_loop().create_task(self._follow_stats(), name="trtllm-stats")

    # -- prompts --------------------------------------------------------------------------------

    def render_prompt(self, messages: list[ChatMessage]) -> list[int]:
        return self._tokenize(self._render_text(messages, True))

    def _render_text(self, messages: list[ChatMessage], generation: bool) -> str:
        if self._format.channels:
            return harmony.render(messages, generation)
        return template_tools.render(messages, generation, self._render_chat, self._format, self.native_tools)

    def _render_chat(self, chat: list[dict], tools: list[dict] | None, generation: bool, variables: dict) -> str:
        """The checkpoint's own template, as TensorRT-LLM's tokenizer applies it."""
        return self._hf.apply_chat_template(chat, tools=tools, tokenize=False, add_generation_prompt=generation,
                                            **variables)

    def _tokenize(self, text: str) -> list[int]:
        # The template wrote the special tokens (BOS included, where the family has one).
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def _marker_ids(self, markers: tuple[str, ...]) -> dict[str, int]:
        """The token id of each of a format's markers, each one special token of this tokenizer."""
        ids = {}
        for marker in markers:
            encoded = self._tokenize(marker)
            if len(encoded) != 1:
                raise RuntimeError(f"the checkpoint's tokenizer has no special token {marker!r}, which the "
                                   f"{self.tool_format} format needs")
            ids[marker] = encoded[0]
        return ids

    def _boundaries(self) -> frozenset[int]:
        """Added tokens (a Hugging Face tokenizer matches those before anything else) that strip
        no whitespace beside them."""
        added = getattr(self._hf, "added_tokens_decoder", None) or {}
        return frozenset(token for token, spec in added.items()
                         if not getattr(spec, "lstrip", False) and not getattr(spec, "rstrip", False))

    # -- constraints ----------------------------------------------------------------------------

    def check_constraint(self, constraint: Constraint | None) -> None:
        if constraint is None:
            return
        if not self._guided:
            raise ValueError("this server runs TensorRT-LLM without a guided-decoding backend "
                             "(PARLEY_TRTLLM_GUIDED_DECODING_BACKEND=none), so it cannot constrain output")
        self._guide_text(constraint)  # builds the grammar: what it cannot express is refused here

    def _guide(self, constraint: Constraint):
        kind, text = self._guide_text(constraint)
        return self._api.GuidedDecodingParams(**{kind: text})  # fresh per request, as SamplingParams is

    def _guide_text(self, constraint: Constraint) -> tuple[str, str]:
        """The engine-neutral constraint as TensorRT-LLM guided decoding: (GuidedDecodingParams
        field, its text), compiled once per constraint (a request's check and its run share it).
        Free text with optional calls is a structural tag (the call grammar applies from the
        family's marker on); the rest is the same GBNF grammar llama.cpp enforces (xgrammar and
        llguidance read it), so prompt, grammar and parser agree on one format whatever the engine.
        What the grammar compiler cannot express raises ValueError."""
        key = constraint_key(constraint)
        guide = self._guides.get(key)
        if guide is None:
            try:
                guide = self._compile(constraint)
            except ValueError:
                raise
            except Exception as exc:  # the schema converter asserts on what it cannot express
                raise ValueError(str(exc) or type(exc).__name__) from None
            if len(self._guides) >= GUIDE_CACHE_SIZE:
                self._guides.pop(next(iter(self._guides)))
            self._guides[key] = guide
        return guide

    def _compile(self, constraint: Constraint) -> tuple[str, str]:
        if lazy(constraint):
            fmt = self._format
            structures = [{"begin": fmt.calls_open + fmt.call_open + fmt.call_prefix(name),
                           "schema": schema or {"type": "object"},
                           "end": fmt.call_suffix + fmt.call_close + fmt.calls_close} for name, schema in constraint.tools]
            return "structural_tag", json.dumps({"type": "structural_tag", "structures": structures,
                                                 "triggers": [fmt.marker]})
        return "grammar", compile_constraint(constraint, self._format, reasoning=self.reasoning_format == "think")

    def _sampling_params(self, params: SamplingParams, budget: int):
        # Fresh per request (the engine mutates it); every field set, none left to defaults.
        markup = {} if self._stop_ids is None else {
            # Harmony's markers are special tokens the parser must see, written without spaces.
            "skip_special_tokens": False, "spaces_between_special_tokens": False, "stop_token_ids": list(self._stop_ids)}
        return self._api.SamplingParams(
            max_tokens=budget, temperature=params.temperature, top_p=params.top_p,
            presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
            seed=params.seed, logprobs=params.top_logprobs,
            guided_decoding=self._guide(params.constraint) if params.constraint is not None else None, **markup)

    # -- generation -----------------------------------------------------------------------------

    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator:
        if self._dead is not None:
            raise EngineDead(self._dead)
        budget = max(1, min(params.max_tokens, self.context_window - len(prompt)))
        sampling = self._sampling_params(params, budget)
        fatal = self._api.fatal_errors
        result = None
        self._in_flight += 1
        try:
            salt = {"cache_salt": params.cache_scope} if self._salts and params.cache_scope else {}
            result = self._llm.generate_async(list(prompt), sampling, streaming=True, **salt)  # on the loop thread
            async for output in result:
                completion = output.outputs[0]
                ids = completion.token_ids_diff
                text = completion.text_diff
                if ids or text:
                    logprobs = self._logprobs(ids, completion.logprobs_diff) if params.top_logprobs is not None else ()
                    yield TextDelta(text, len(ids), logprobs)
                if output.finished:
                    yield self._finished(output, completion, len(prompt))
                    return
            raise RequestFailed("the engine ended the stream without finishing it")
        except self._api.RequestError as exc:
            raise RequestFailed(str(exc) or type(exc).__name__) from None
        except fatal as exc:
            self._die(exc)
            raise EngineDead(self._dead) from None
        except RuntimeError as exc:
            if "shutting down" in str(exc):
                raise RequestFailed("the engine is shutting down") from None
            raise
        finally:
            self._in_flight -= 1
            if result is not None and not result.finished:
                abort = getattr(result, "abort", None)  # non-committed API: looked up, not assumed
                if abort is not None:
                    abort()

    def _finished(self, output, completion, prompt_tokens: int) -> Finished:
        error = getattr(output, "error", None)
        if error:
            raise RequestFailed(str(error))
        reason = completion.finish_reason
        if reason not in ("stop", "length"):  # cancelled or timed out by the engine, not by us
            raise RequestFailed(f"the engine ended the request ({reason})")
        # Block-rounded, and multimodal placeholders can push it past the prompt: clamped.
        cached = _clamp(getattr(output, "cached_tokens", 0), 0, prompt_tokens)
        return Finished(reason, prompt_tokens, len(completion.token_ids), cached_tokens=cached)

    def _logprobs(self, ids, entries) -> tuple[TokenLogprob, ...]:
        """TensorRT-LLM's per-token {token id: Logprob(logprob, rank)} (the sampled token and the
        top k) in the Responses shape."""
        result = []
        for token, entry in zip(ids, entries or (), strict=False):
            if not isinstance(entry, dict):  # simple format: a float per token
                result.append(self._token_logprob(token, float(entry), ()))
                continue
            chosen = entry.get(token)
            ranked = sorted(((tid, lp) for tid, lp in entry.items()),
                            key=lambda pair: (getattr(pair[1], "rank", None) or 1 << 30, -pair[1].logprob))
            top = tuple((text, lp.logprob, tuple(text.encode())) for text, lp in
                        ((self._tokenizer.decode([tid]), lp) for tid, lp in ranked))
            result.append(self._token_logprob(token, chosen.logprob if chosen is not None else float("nan"), top))
        return tuple(result)

    def _token_logprob(self, token: int, logprob: float, top) -> TokenLogprob:
        text = self._tokenizer.decode([token])
        return TokenLogprob(text, logprob, tuple(text.encode()), top)

    def _die(self, exc: BaseException) -> None:
        if self._dead is None:
            self._dead = f"{type(exc).__name__}: {exc}"
            log.error("engine.dead", engine="tensorrt_llm", detail=self._dead)

    # -- state ----------------------------------------------------------------------------------

    def health(self) -> EngineHealth:
        if self._closed:
            return EngineHealth(False, "the TensorRT-LLM engine is shut down")
        if self._dead is not None:
            return EngineHealth(False, f"the TensorRT-LLM engine died ({self._dead})")
        check = getattr(self._llm, "_check_health", None)  # private, as trtllm-serve's /health uses it
        if check is not None and not check():
            return EngineHealth(False, "the TensorRT-LLM executor reports itself unhealthy")
        return EngineHealth(True)

    def kv_cache_usage(self) -> float | None:
        if not self._iteration_stats:
            return None  # unknown, not zero: the metric is left out
        return max(self._kv_usage.values(), default=0.0)

    async def _follow_stats(self) -> None:
        reported_failure = False
        while not self._closed:
            stepped = False
            try:
                async for snapshot in self._llm.get_stats_async(timeout=self.STATS_TIMEOUT_SECONDS):
                    stepped = True
                    self._note_stats(snapshot)
                reported_failure = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # stats are for metrics: never fatal, logged once per outage
                if not reported_failure:
                    log.warning("engine.stats_failed", engine="tensorrt_llm", error=f"{type(exc).__name__}: {exc}")
                    reported_failure = True
            if not stepped and self._in_flight == 0:
                self._kv_usage.clear()  # no step for a while and nothing running: nothing holds blocks
            await asyncio.sleep(self.STATS_RETRY_SECONDS)

    def _note_stats(self, snapshot) -> None:
        if isinstance(snapshot, str):  # some builds hand out each snapshot as JSON text
            snapshot = json.loads(snapshot)
        kv = snapshot.get("kvCacheStats") if isinstance(snapshot, dict) else None
        if not isinstance(kv, dict):
            return
        used, total = kv.get("usedNumBlocks"), kv.get("maxNumBlocks")
        if isinstance(used, int | float) and isinstance(total, int | float) and total > 0:
            rank = snapshot.get("attentionDpRank", 0)
            self._kv_usage[rank if isinstance(rank, int) else 0] = min(1.0, max(0.0, used / total))

    async def close(self) -> None:
        if self._stats is not None:
            self._stats.cancel()
        if not self._closed:
            self._closed = True
            await asyncio.to_thread(self._llm.shutdown)


def _parameters(function) -> frozenset[str]:
    import inspect

    try:
        return frozenset(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return frozenset()
