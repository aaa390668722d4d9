"""The lazy `auto` switch of the llama.cpp engine, driven by a scripted stand-in for llama.cpp."""

from llama_cpp import LlamaGrammar
from parley.engine.base import Constraint, SamplingParams
from parley.engine.grammar import compile_call_continuation, compile_constraint
from parley.engine.llamacpp import LlamaCppEngine

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
          "additionalProperties": False}
AUTO = Constraint("tools", tools=(("get_weather", SCHEMA),), mode="auto")


class ScriptedLlama:
    """Yields scripted token ids; records each generate() call's prompt and grammar."""

    def __init__(self, pieces: list[str], after_switch: list[str]):
        self.vocab = pieces + after_switch
        self.phases = [list(range(len(pieces))), list(range(len(pieces), len(self.vocab)))]
        self.calls = []

    def generate(self, prompt, reset=True, grammar=None, **sampling):
        self.calls.append((list(prompt), grammar))
        yield from self.phases[len(self.calls) - 1]

    def detokenize(self, tokens):
        return "".join(self.vocab[t] for t in tokens).encode()


def engine_with(llm) -> LlamaCppEngine:
    engine = object.__new__(LlamaCppEngine)  # no model file: only the token loop is under test
    engine._llm, engine._grammars, engine.reasoning_format = llm, {}, "none"
    return engine


def test_auto_runs_free_until_the_opener_then_continues_under_the_call_grammar():
    llm = ScriptedLlama(["Let me", " check.", "<tool", "_call>"], ['\n{"name": "get_weather", ...'])
    tokens = list(engine_with(llm)._tokens([101, 102], SamplingParams(max_tokens=64, constraint=AUTO)))
    assert tokens == [0, 1, 2, 3, 4]
    (first_prompt, first_grammar), (second_prompt, second_grammar) = llm.calls
    assert first_grammar is None and first_prompt == [101, 102]
    assert second_prompt == [101, 102, 0, 1, 2, 3]  # resumes right after the opener, from the KV cache
    assert isinstance(second_grammar, LlamaGrammar)


def test_auto_without_a_call_never_constrains():
    llm = ScriptedLlama(["Just", " text", " <b>tags</b>"], [])
    tokens = list(engine_with(llm)._tokens([1], SamplingParams(max_tokens=64, constraint=AUTO)))
    assert tokens == [0, 1, 2] and len(llm.calls) == 1 and llm.calls[0][1] is None


def test_required_and_schema_answers_are_constrained_from_the_first_token():
    for constraint in (Constraint("tools", tools=AUTO.tools, mode="required"),
                       Constraint("tools", tools=AUTO.tools, mode="auto", schema={"type": "object"}),
                       Constraint("json_object")):
        llm = ScriptedLlama(["{}"], [])
        list(engine_with(llm)._tokens([1], SamplingParams(max_tokens=8, constraint=constraint)))
        assert isinstance(llm.calls[0][1], LlamaGrammar)


def test_every_grammar_shape_compiles():
    for constraint in (AUTO, Constraint("tools", tools=AUTO.tools + (("noop", None),), mode="required",
                                        parallel=False), Constraint("json_schema", schema=SCHEMA)):
        LlamaGrammar.from_string(compile_constraint(constraint), verbose=False)
        LlamaGrammar.from_string(compile_constraint(constraint, reasoning=True), verbose=False)
    LlamaGrammar.from_string(compile_call_continuation(AUTO), verbose=False)
