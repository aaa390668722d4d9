"""A fake of TensorRT-LLM's LLM API (PyTorch backend, 1.2 to 1.4rc) that keeps its contract.

TensorRT-LLM cannot be installed on these machines (no GPU; its PyPI package only downloads
from NVIDIA's index), so the adapter (server/parley/engine/trtllm.py) is proven against this.
What it reproduces, from the LLM API's source (docs/engines.md cites it):

- LLM(model, **kwargs): an unknown argument is `ValueError("LLM got invalid argument: k")`;
  the removed TensorRT backend, an unknown guided-decoding backend and more GPUs than are
  visible are refused; the tokenizer is the checkpoint's own (a real Hugging Face tokenizer
  loaded from the model directory), wrapped as TransformersTokenizer wraps it.
- generate_async is a plain function. It raises TypeError for bad inputs or sampling params,
  RuntimeError after shutdown, RequestError (a RuntimeError, not a ValueError) for a prompt
  longer than max_num_tokens without chunked prefill, TypeError for an unknown keyword; a None
  SamplingParams means 32 tokens; the SamplingParams passed in is mutated (end_id, pad_id).
- The result binds to the event loop running in the calling thread; without one, iterating it
  raises AssertionError. `async for` yields the same RequestOutput each step, its output
  mutated cumulatively, `*_diff` being what the step added.
- abort() makes the next step end the stream with finish_reason `cancelled`, no exception.
- EOS is `stop` (the EOS token not in token_ids), a stop token id `stop` with stop_reason, a
  stop string truncates the text, `max_tokens` is `length`.
- Guided decoding is recorded and, without a backend set at construction, silently ignored.
- Failure injection: a RequestError after n tokens (`fail_after`), EngineDeadError for every
  pending and new request (`kill`), after which _check_health() is False.
- cached_tokens: the prompt prefix shared with an earlier prompt of the same `cache_salt`, in
  whole KV blocks, when block reuse is on (0 until the first step).

The model itself is scripted: `replies` (a queue of texts for the next generations), then
`default_reply`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

DEFAULT_REPLY = "Hello from the fake TensorRT-LLM engine."


class RequestError(RuntimeError):
    """tensorrt_llm.executor.utils.RequestError: one request failed."""


class EngineDeadError(RuntimeError):
    """tensorrt_llm.executor.EngineDeadError: the engine is gone, for every request."""


class CppExecutorError(RuntimeError):
    """tensorrt_llm.executor.executor.CppExecutorError."""


@dataclasses.dataclass(kw_only=True)
class KvCacheConfig:
    enable_block_reuse: bool = True
    free_gpu_memory_fraction: float = 0.9
    tokens_per_block: int = 32
    max_tokens: int | None = None
    enable_partial_reuse: bool = True

    def __post_init__(self):
        if not 0 <= self.free_gpu_memory_fraction <= 1:
            raise ValueError("free_gpu_memory_fraction must be in [0, 1]")


@dataclasses.dataclass(kw_only=True)
class GuidedDecodingParams:
    json: str | dict | None = None
    regex: str | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: str | None = None

    def _validate(self) -> None:
        guides = sum(bool(value) for value in (self.json, self.regex, self.grammar, self.json_object,
                                               self.structural_tag))
        if guides > 1:
            raise ValueError(f"Only one guide can be used for a request, got {guides}")


@dataclasses.dataclass(slots=True, kw_only=True)
class SamplingParams:
    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logprobs: int | bool | None = None
    guided_decoding: GuidedDecodingParams | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    n: int = 1

    def __post_init__(self):
        if self.logprobs is True:
            self.logprobs = 0
        elif self.logprobs is False:
            self.logprobs = None
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            raise ValueError(f"require 0 <= top_p <= 1, got top_p={self.top_p}")
        if self.temperature is not None and (self.temperature != self.temperature or self.temperature < 0):
            raise ValueError(f"require temperature >= 0, got temperature={self.temperature}")
        if self.logprobs is not None and self.logprobs > 100:
            raise ValueError("logprobs must be <= 100")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.guided_decoding is not None:
            self.guided_decoding._validate()


@dataclasses.dataclass(frozen=True)
class Logprob:
    logprob: float
    rank: int | None = None


@dataclasses.dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    _last_text_len: int = 0
    _last_token_ids_len: int = 0
    _last_logprobs_len: int = 0

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def text_diff(self) -> str:
        return self.text[self._last_text_len:]

    @property
    def token_ids_diff(self) -> list[int]:
        return self.token_ids[self._last_token_ids_len:]

    @property
    def logprobs_diff(self) -> list:
        return self.logprobs[self._last_logprobs_len:]


class TransformersTokenizer:
    """What `llm.tokenizer` is: the Hugging Face tokenizer, wrapped."""

    def __init__(self, hf):
        self.tokenizer = hf

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    def encode(self, text: str, *args, **kwargs) -> list[int]:
        return self.tokenizer.encode(text, *args, **kwargs)

    def decode(self, token_ids: list[int], *args, **kwargs) -> str:
        return self.tokenizer.decode(token_ids, *args, **kwargs)


@dataclasses.dataclass
class Submitted:
    """One generate_async call, as the fake saw it."""

    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    streaming: bool
    keywords: dict
    output: "RequestOutput"
    guide_enforced: bool


OPTIONAL_KEYWORDS = frozenset({
    "kv_cache_retention_config", "disaggregated_params", "trace_headers", "scheduling_params", "conversation_params",
    "priority", "_postproc_params"})

ARGUMENTS = frozenset({
    "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code", "tensor_parallel_size", "dtype",
    "revision", "tokenizer_revision", "pipeline_parallel_size", "context_parallel_size", "moe_expert_parallel_size",
    "moe_tensor_parallel_size", "enable_attention_dp", "gpus_per_node", "backend", "kv_cache_config",
    "guided_decoding_backend", "max_batch_size", "max_num_tokens", "max_seq_len", "max_input_len", "max_beam_width",
    "enable_chunked_prefill", "stream_interval", "return_perf_metrics", "reasoning_parser", "orchestrator_type",
    "speculative_config", "lora_config", "enable_lora", "num_postprocess_workers", "postprocess_tokenizer_dir",
    "otlp_traces_endpoint", "cuda_graph_config", "attn_backend", "sampler_type", "print_iter_log",
    "enable_iter_perf_stats", "iter_stats_max_iterations"})


class LLM:
    """tensorrt_llm.LLM, with the model scripted."""

    visible_gpus = 8
    _ids = itertools.count(1)

    def __init__(self, model: str | Path, tokenizer=None, tensor_parallel_size: int = 1, dtype: str = "auto",
                 **kwargs):
        for key in kwargs:
            if key not in ARGUMENTS:
                raise ValueError(f"LLM got invalid argument: {key}")
        backend = kwargs.get("backend", "pytorch")
        if backend not in ("pytorch", "_autodeploy"):
            raise ValueError(f"backend {backend!r} is not supported (the TensorRT backend was removed)")
        guided = kwargs.get("guided_decoding_backend")
        if guided not in (None, "xgrammar", "llguidance"):
            raise ValueError(f"guided_decoding_backend must be xgrammar or llguidance, got {guided!r}")
        kv_cache_config = kwargs.get("kv_cache_config", KvCacheConfig())
        if not isinstance(kv_cache_config, KvCacheConfig):
            raise ValueError("kv_cache_config must be a KvCacheConfig")
        world_size = tensor_parallel_size * kwargs.get("pipeline_parallel_size", 1)
        if world_size > self.visible_gpus:
            raise RuntimeError(f"only {self.visible_gpus} GPUs are visible, world size {world_size} requested")
        if dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise ValueError(f"dtype {dtype!r} is not supported")
        from transformers import AutoTokenizer

        self.args = dict(model=str(model), tensor_parallel_size=tensor_parallel_size, dtype=dtype, **kwargs)
        self.tokenizer = TransformersTokenizer(AutoTokenizer.from_pretrained(str(model)))
        self.guided_decoding_backend = guided
        self.kv_cache_config = kv_cache_config
        self.max_num_tokens = kwargs.get("max_num_tokens", 8192)
        self.chunked_prefill = kwargs.get("enable_chunked_prefill", False)
        # The scripted model and the knobs tests turn.
        self.replies: list[str] = []
        self.default_reply = DEFAULT_REPLY
        self.step_seconds = 0.0
        self.fail_after: tuple[int, str] | None = None  # (tokens, message): a RequestError then
        self.cached_override: int | None = None  # what cached_tokens reports, whatever the prompts
        self.submitted: list[Submitted] = []
        self.fatal: str | None = None
        self.stats_error: str | None = None
        self._iterations = itertools.count()
        self.shut_down = False
        self._prompts: list[list[int]] = []
        self._running: set[RequestOutput] = set()

    # -- the LLM API ----------------------------------------------------------------------------

    def generate_async(self, inputs, sampling_params: SamplingParams | None = None, lora_request=None,
                       prompt_adapter_request=None, streaming: bool = False, cache_salt: str | None = None,
                       **keywords) -> "RequestOutput":
        unknown = set(keywords) - OPTIONAL_KEYWORDS
        if unknown:
            raise TypeError(f"generate_async() got an unexpected keyword argument {sorted(unknown)[0]!r}")
        if self.shut_down:
            raise RuntimeError("LLM is shutting down")
        if self.fatal is not None:
            raise EngineDeadError(self.fatal)
        if sampling_params is None:
            sampling_params = SamplingParams()
        elif not isinstance(sampling_params, SamplingParams):
            raise TypeError("sampling_params must be a SamplingParams")
        if sampling_params.end_id is None:  # _setup: the same object is mutated
            sampling_params.end_id = self.tokenizer.eos_token_id
            sampling_params.pad_id = sampling_params.pad_id if sampling_params.pad_id is not None \
                else sampling_params.end_id
        if isinstance(inputs, str):
            prompt, ids = inputs, self.tokenizer.encode(inputs)
        elif isinstance(inputs, list) and all(isinstance(token, int) for token in inputs):
            prompt, ids = None, list(inputs)
        elif isinstance(inputs, dict) and "prompt_token_ids" in inputs:
            prompt, ids = None, list(inputs["prompt_token_ids"])
        elif isinstance(inputs, dict) and "prompt" in inputs:
            prompt, ids = inputs["prompt"], self.tokenizer.encode(inputs["prompt"])
        else:
            raise TypeError(f"The inputs must be type str or list of int, but got {type(inputs)}")
        if len(ids) > self.max_num_tokens and not self.chunked_prefill:
            raise RequestError(f"The sum of prompt length ({len(ids)}), query length (0) should not exceed "
                               f"max_num_tokens ({self.max_num_tokens})")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        reply = self.replies.pop(0) if self.replies else self.default_reply
        enforced = sampling_params.guided_decoding is not None and self.guided_decoding_backend is not None
        if enforced:
            _check_guide(sampling_params.guided_decoding, reply)
        output = RequestOutput(self, next(self._ids), prompt, ids, sampling_params, reply, streaming, loop,
                               cached=self.cached_for(ids, cache_salt))
        self.submitted.append(Submitted(ids, sampling_params, streaming, {**keywords, "cache_salt": cache_salt},
                                        output, enforced))
        self._prompts = [*self._prompts[-63:], (cache_salt, ids)]
        return output

    def shutdown(self) -> None:
        self.shut_down = True

    def _check_health(self) -> bool:
        return self.fatal is None and not self.shut_down

    def get_kv_cache_capacity(self) -> dict:
        return {"maxNumBlocks": 1024, "tokensPerBlock": self.kv_cache_config.tokens_per_block,
                "maxNumTokens": 1024 * self.kv_cache_config.tokens_per_block}

    KV_BLOCKS = 1024

    async def get_stats_async(self, timeout: float = 2):
        """Iteration stats, one snapshot per engine step while requests run; the iteration ends
        once `timeout` passes without a step. Nothing at all without enable_iter_perf_stats (the
        PyTorch backend's default). `stats_error`: raised instead, as a broken stats queue would."""
        if self.stats_error is not None:
            raise RuntimeError(self.stats_error)
        loop = asyncio.get_running_loop()
        idle_since = loop.time()
        while loop.time() - idle_since < timeout:
            if self._running and self.args.get("enable_iter_perf_stats"):
                idle_since = loop.time()
                yield {"iter": next(self._iterations), "numActiveRequests": len(self._running),
                       "kvCacheStats": {"usedNumBlocks": self._used_blocks(), "maxNumBlocks": self.KV_BLOCKS,
                                        "tokensPerBlock": self.kv_cache_config.tokens_per_block}}
            await asyncio.sleep(max(self.step_seconds, 0.005))

    def _used_blocks(self) -> int:
        size = self.kv_cache_config.tokens_per_block
        return sum(-(-(len(output.prompt_token_ids) + len(output.outputs[0].token_ids)) // size)
                   for output in self._running)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- test controls --------------------------------------------------------------------------

    def kill(self, message: str = "a worker rank died") -> None:
        """The engine dies: every pending and new request gets EngineDeadError."""
        self.fatal = message

    def cached_for(self, ids: list[int], salt: str | None) -> int:
        """What block reuse would find for `ids` among the prompts submitted before it."""
        if self.cached_override is not None:
            return self.cached_override
        if not self.kv_cache_config.enable_block_reuse:
            return 0
        best = 0
        for earlier_salt, earlier in self._prompts:
            if earlier_salt != salt:  # blocks are never shared across salts
                continue
            shared = 0
            for a, b in zip(earlier, ids, strict=False):
                if a != b:
                    break
                shared += 1
            best = max(best, shared)
        block = self.kv_cache_config.tokens_per_block
        return best // block * block


def _check_guide(guide: GuidedDecodingParams, reply: str) -> None:
    """A guide the real backend would have to compile, and a scripted reply it would allow: a
    test whose reply breaks its own guide is a broken test, said loudly."""
    if guide.json is not None:
        import jsonschema

        schema = json.loads(guide.json) if isinstance(guide.json, str) else guide.json
        jsonschema.validate(json.loads(reply), schema)
    if guide.grammar is not None:
        assert "root ::=" in guide.grammar, "an EBNF grammar needs a root rule"
    if guide.structural_tag is not None:
        tag = json.loads(guide.structural_tag)
        assert tag["triggers"] and all(s["begin"].startswith(tuple(tag["triggers"])) for s in tag["structures"]), \
            "every structure must begin with a trigger"


class RequestOutput:
    """tensorrt_llm.RequestOutput: the same object each step, mutated."""

    def __init__(self, llm: LLM, request_id: int, prompt, prompt_token_ids: list[int], params: SamplingParams,
                 reply: str, streaming: bool, loop, cached: int = 0):
        self._llm = llm
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.outputs = [CompletionOutput(index=0)]
        self.finished = False
        self.cached_tokens = 0
        self.error: str | None = None
        self.sampling_params = params
        self._loop = loop
        self._streaming = streaming
        self._aborted = False
        self._done = False
        eos = llm.tokenizer.eos_token_id
        self._script = [*llm.tokenizer.encode(reply, add_special_tokens=False), eos]
        self._position = 0
        self._cached = cached  # reported from the first step on, as the engine's is

    def abort(self) -> None:
        if not self.finished:
            self._aborted = True

    def aborted(self) -> bool:
        return self._aborted

    def __aiter__(self):
        return self

    async def __anext__(self) -> "RequestOutput":
        if self._done:
            raise StopAsyncIteration
        assert self._loop is not None, ("The asyncio event loop was not present during initialization, so async "
                                        "operations are not available.")
        await self._step()
        return self

    async def aresult(self) -> "RequestOutput":
        while not self._done:
            await self._step()
        return self

    def __await__(self):
        return self.aresult().__await__()

    async def _step(self) -> None:
        llm = self._llm
        completion = self.outputs[0]
        completion._last_text_len = len(completion.text)
        completion._last_token_ids_len = len(completion.token_ids)
        completion._last_logprobs_len = len(completion.logprobs)
        llm._running.add(self)
        try:
            await self._wait(llm.step_seconds)
            if self._aborted:
                self._finish("cancelled")
                return
            if self._position == 0:
                self.cached_tokens = self._cached
            for _ in range(len(self._script) if not self._streaming else 1):
                if self._emit_one():
                    return
        finally:
            if self._done:
                llm._running.discard(self)

    async def _wait(self, seconds: float) -> None:
        """A step's time, cut short by the engine's death (raised on every pending step)."""
        deadline = asyncio.get_running_loop().time() + seconds
        while True:
            if self._llm.fatal is not None:
                self._done = True
                raise EngineDeadError(self._llm.fatal)
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            await asyncio.sleep(min(0.005, remaining))

    def _emit_one(self) -> bool:
        """One token; True when the request finished."""
        llm, params, completion = self._llm, self.sampling_params, self.outputs[0]
        if llm.fail_after is not None and len(completion.token_ids) >= llm.fail_after[0]:
            self._done = True
            raise RequestError(llm.fail_after[1])
        token = self._script[self._position]
        self._position += 1
        if token == params.end_id:
            self._finish("stop")
            return True
        if params.stop_token_ids and token in params.stop_token_ids:
            self._finish("stop", token)
            return True
        completion.token_ids.append(token)
        if params.logprobs is not None:
            entry = {token: Logprob(-0.25, 1)}
            for rank, other in enumerate(range(params.logprobs), start=2):
                entry.setdefault((token + other + 1) % 1000, Logprob(-1.0 - other, rank))
            completion.logprobs.append(entry)
        completion.text = llm.tokenizer.decode(completion.token_ids, skip_special_tokens=params.skip_special_tokens)
        for stop in ([params.stop] if isinstance(params.stop, str) else params.stop or []):
            at = completion.text.find(stop)
            if at >= 0:  # truncated before it, and the request aborted internally
                completion.text = completion.text[:at + (len(stop) if params.include_stop_str_in_output else 0)]
                self._finish("stop", stop)
                return True
        if len(completion.token_ids) >= params.max_tokens:
            self._finish("length")
            return True
        return False

    def _finish(self, reason: str, stop_reason: Any = None) -> None:
        completion = self.outputs[0]
        completion.finish_reason = reason
        completion.stop_reason = stop_reason
        self.finished = self._done = True


def install_api():
    """The adapter's TrtllmApi over this fake: what load_api() returns over the real package."""
    from parley.engine.trtllm import TrtllmApi

    return TrtllmApi(LLM=LLM, SamplingParams=SamplingParams, GuidedDecodingParams=GuidedDecodingParams,
                     KvCacheConfig=KvCacheConfig, RequestError=RequestError,
                     fatal_errors=(EngineDeadError, CppExecutorError))
