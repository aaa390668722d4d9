"""The llama.cpp engine's sampler: what turns one sequence's logits into its next token.

Per request: a llama.cpp sampler chain (greedy, or top-p, temperature and a seeded draw) and the
grammar compiled from the engine-neutral Constraint through a GBNF cache, replaced once a lazy
`auto` tool constraint sees the call opener. Per token: its text piece and, when asked, its
logprobs. The slot scheduler (llamacpp.py) decides which sequences decode; this decides what
they sample.

The grammar checks the token the chain drew, as llama.cpp's own common sampler does: only a
refused draw pays for the grammar over the whole vocabulary (then the chain draws again from
what it allows). A grammar that rarely refuses (free text that must not open a tool call, JSON a
model is writing well) then costs about nothing; applying it to every token first halved the
decoding speed of SmolLM2's 49k-token vocabulary. Greedy decoding picks the same tokens either
way. With presence/frequency penalties the chain has state that a refused draw would corrupt,
so there the grammar runs first, as before.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import random

from parley.engine.base import Constraint, SamplingParams, TokenLogprob
from parley.engine.formats import ToolFormat
from parley.engine.grammar import compile_call_continuation, compile_constraint, constraint_key, lazy

GRAMMAR_CACHE_SIZE = 64


class CallOpenerWatch:
    """Spots the tool format's marker in streamed text, for the lazy `auto` constraint: the model
    runs free until it writes the marker, then the rest of the calls is constrained, because a
    grammar over free text costs more than half of decoding speed here."""

    def __init__(self, marker: str) -> None:
        self._marker = marker
        self._window = ""

    def opened(self, text: str) -> bool:
        self._window = (self._window + text)[-4 * len(self._marker):]
        return self._window.rstrip().endswith(self._marker)


def grammar_text(constraint: Constraint | None, fmt: ToolFormat, reasoning: bool, opened: bool = False) -> str | None:
    """The GBNF a sequence samples under: none for a lazy `auto` until its calls are opened, then
    the rest of the calls; the whole-output grammar for every other constraint."""
    if constraint is None:
        return None
    if lazy(constraint):
        return compile_call_continuation(constraint, fmt) if opened else None
    return compile_constraint(constraint, fmt, reasoning=reasoning)


def _grammar_key(constraint: Constraint, opened: bool) -> str:
    return f"{opened}:{constraint_key(constraint)}"


@dataclasses.dataclass
class SequenceSampler:
    """A sequence's chain, and its grammar when that checks the chain's draws (else the grammar,
    if any, is inside the chain)."""

    chain: object
    grammar: object | None = None


class Sampling:
    """Owned by the engine's worker thread; not thread-safe."""

    def __init__(self, llama_cpp, llm, tool_format: ToolFormat, reasoning: bool):
        self._lib = llama_cpp
        self._llm = llm
        self.tool_format = tool_format
        self._reasoning = reasoning
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.n_vocab = llm.n_vocab()
        self.end_of_generation = frozenset(t for t in range(self.n_vocab)
                                           if llama_cpp.llama_vocab_is_eog(self._vocab, t))
        self._pieces: dict[int, bytes] = {}
        self._grammars: dict[str, str | None] = {}
        self._checked: set[str] = set()  # constraints check() passed (on the event loop)
        # The arrays a draw is checked on (one token), and resampled on (every token, on refusal).
        self._one = (llama_cpp.llama_token_data * 1)()
        self._one_array = llama_cpp.llama_token_data_array(self._one, 1, -1, False)
        self._all = (llama_cpp.llama_token_data * self.n_vocab)()
        self._all_array = llama_cpp.llama_token_data_array(self._all, self.n_vocab, -1, False)
        self.refused = 0  # draws the grammar refused (then resampled): for tests and tuning

    def chain(self, params: SamplingParams, opened: bool = False) -> SequenceSampler:
        """A new sampler for `params`; `opened`: a lazy tool constraint saw its opener."""
        text = self._grammar(params.constraint, opened)
        grammar = None
        if text is not None:
            grammar = self._lib.llama_sampler_init_grammar(self._vocab, text.encode(), b"root")
            if not grammar:
                raise RuntimeError("llama.cpp rejected the constraint grammar")
        chain = self._lib.llama_sampler_chain_init(self._lib.llama_sampler_chain_default_params())
        if grammar is not None and self.grammar_first(params):  # the chain takes ownership of it
            self._lib.llama_sampler_chain_add(chain, grammar)
            grammar = None
        self._add_draw(chain, params)
        return SequenceSampler(chain, grammar)

    @staticmethod
    def grammar_first(params: SamplingParams) -> bool:
        """Whether the grammar filters every token before the draw: when the chain has state
        (penalties) that a refused draw would have changed."""
        return bool(params.presence_penalty or params.frequency_penalty)

    def _add_draw(self, chain, params: SamplingParams) -> None:
        if params.presence_penalty or params.frequency_penalty:
            # OpenAI's penalties count the output so far: the chain sees only sampled tokens, and
            # its window is the whole output budget. Only when asked: it costs a pass over the vocabulary.
            self._lib.llama_sampler_chain_add(chain, self._lib.llama_sampler_init_penalties(
                self.n_vocab, max(params.max_tokens, 1), 1.0, params.frequency_penalty, params.presence_penalty))
        if params.temperature <= 0:
            self._lib.llama_sampler_chain_add(chain, self._lib.llama_sampler_init_greedy())
            return
        if params.top_p < 1.0:
            self._lib.llama_sampler_chain_add(chain, self._lib.llama_sampler_init_top_p(params.top_p, 1))
        self._lib.llama_sampler_chain_add(chain, self._lib.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        self._lib.llama_sampler_chain_add(chain, self._lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def sample(self, sampler: SequenceSampler, ctx, index: int) -> int:
        """The next token of a sequence whose logits are at output `index` of the last decode."""
        token = self._lib.llama_sampler_sample(sampler.chain, ctx, index)
        if sampler.grammar is None:
            return token
        if not self._allows(sampler.grammar, token):
            self.refused += 1
            token = self._resample(sampler, ctx, index)
        self._lib.llama_sampler_accept(sampler.grammar, token)
        return token

    def _allows(self, grammar, token: int) -> bool:
        entry = self._one[0]
        entry.id, entry.logit, entry.p = token, 0.0, 0.0
        self._one_array.size, self._one_array.selected, self._one_array.sorted = 1, -1, False
        self._lib.llama_sampler_apply(grammar, ctypes.byref(self._one_array))
        return not math.isinf(self._one[0].logit)

    def _resample(self, sampler: SequenceSampler, ctx, index: int) -> int:
        """The grammar over every token's logit, then the chain's draw from what it allows."""
        import numpy as np

        logits = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(ctx, index), shape=(self.n_vocab,))
        entries = np.ctypeslib.as_array(self._all)
        entries["id"] = np.arange(self.n_vocab, dtype=np.int32)
        entries["logit"] = logits
        entries["p"] = 0.0
        self._all_array.size, self._all_array.selected, self._all_array.sorted = self.n_vocab, -1, False
        self._lib.llama_sampler_apply(sampler.grammar, ctypes.byref(self._all_array))
        self._lib.llama_sampler_apply(sampler.chain, ctypes.byref(self._all_array))
        return self._all[self._all_array.selected].id

    def check(self, constraint: Constraint | None) -> None:
        """Raise ValueError if `constraint` cannot be enforced: its grammar does not compile, or
        llama.cpp cannot parse it. Called on the event loop before a request is stored; a
        constraint that passed once is not compiled here again."""
        if constraint is None:
            return
        for opened in (False, True) if lazy(constraint) else (False,):
            key = _grammar_key(constraint, opened)
            if key in self._checked:
                continue
            try:
                text = grammar_text(constraint, self.tool_format, self._reasoning, opened)
            except Exception as exc:  # the schema converter asserts on what it cannot express
                raise ValueError(str(exc) or type(exc).__name__) from None
            if text is not None:
                sampler = self._lib.llama_sampler_init_grammar(self._vocab, text.encode(), b"root")
                if not sampler:
                    raise ValueError("llama.cpp could not parse the grammar the schema compiles to")
                self._lib.llama_sampler_free(sampler)
            if len(self._checked) >= GRAMMAR_CACHE_SIZE:
                self._checked.clear()
            self._checked.add(key)

    def free(self, sampler: SequenceSampler | None) -> None:
        if sampler is not None:
            self._lib.llama_sampler_free(sampler.chain)
            if sampler.grammar is not None:
                self._lib.llama_sampler_free(sampler.grammar)

    def _grammar(self, constraint: Constraint | None, opened: bool) -> str | None:
        """grammar_text, cached: compiling a JSON schema to GBNF costs more than parsing it."""
        if constraint is None:
            return None
        key = _grammar_key(constraint, opened)
        if key not in self._grammars:
            if len(self._grammars) >= GRAMMAR_CACHE_SIZE:
                self._grammars.pop(next(iter(self._grammars)))
            self._grammars[key] = grammar_text(constraint, self.tool_format, self._reasoning, opened)
        return self._grammars[key]

    def piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._llm.detokenize([token])
        return piece

    def logprobs(self, ctx, index: int, token: int, top: int) -> TokenLogprob:
        """Log-softmax of the logits the token was sampled from (before any grammar)."""
        import numpy as np

        logits = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(ctx, index), shape=(self.n_vocab,))
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
        raw = self.piece(token)
        return raw.decode("utf-8", errors="replace"), logprob, tuple(raw)
