"""The llama.cpp engine's sampler: the lazy tool constraint and the grammars it samples under."""

import pytest
from llama_cpp import LlamaGrammar
from parley.engine.base import Constraint
from parley.engine.formats import HERMES, TOOL_FORMATS
from parley.engine.grammar import compile_call_continuation, compile_constraint
from parley.engine.llamacpp_sampling import CallOpenerWatch, grammar_text

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
          "additionalProperties": False}
AUTO = Constraint("tools", tools=(("get_weather", SCHEMA),), mode="auto")


def test_the_opener_watch_fires_once_the_call_opener_is_written_across_pieces():
    watch = CallOpenerWatch(HERMES.marker)
    assert [watch.opened(piece) for piece in ["Let me", " check.", "<tool", "_call>"]] == [False, False, False, True]


def test_the_opener_watch_ignores_text_without_a_call():
    watch = CallOpenerWatch(HERMES.marker)
    assert not any(watch.opened(piece) for piece in ["Just", " text", " <b>tags</b>", " <tool", " use"])


def test_auto_runs_free_until_the_opener_then_under_the_call_grammar():
    assert grammar_text(AUTO, HERMES, reasoning=False) is None
    assert grammar_text(AUTO, HERMES, reasoning=False, opened=True) == compile_call_continuation(AUTO, HERMES)
    assert grammar_text(None, HERMES, reasoning=False) is None


def test_required_and_schema_answers_are_constrained_from_the_first_token():
    for constraint in (Constraint("tools", tools=AUTO.tools, mode="required"),
                       Constraint("tools", tools=AUTO.tools, mode="auto", schema={"type": "object"}),
                       Constraint("json_object")):
        assert grammar_text(constraint, HERMES, reasoning=False) == compile_constraint(constraint, HERMES)


@pytest.mark.parametrize("family", sorted(TOOL_FORMATS))
def test_every_grammar_shape_compiles_in_every_family(family):
    fmt = TOOL_FORMATS[family]
    for constraint in (AUTO, Constraint("tools", tools=AUTO.tools + (("noop", None),), mode="required",
                                        parallel=False), Constraint("json_schema", schema=SCHEMA),
                       Constraint("tools", tools=AUTO.tools, mode="none")):
        LlamaGrammar.from_string(compile_constraint(constraint, fmt), verbose=False)
        LlamaGrammar.from_string(compile_constraint(constraint, fmt, reasoning=True), verbose=False)
    LlamaGrammar.from_string(compile_call_continuation(AUTO, fmt), verbose=False)


@pytest.mark.parametrize("family", sorted(TOOL_FORMATS))
def test_the_watch_fires_on_each_familys_own_marker(family):
    fmt = TOOL_FORMATS[family]
    watch = CallOpenerWatch(fmt.marker)
    pieces = ["Sure.", " ", fmt.marker[:3], fmt.marker[3:]]
    assert [watch.opened(piece) for piece in pieces] == [False, False, False, True]


NESTED = {"type": "object", "additionalProperties": False, "required": ["origin", "code"],
          "properties": {"origin": {"$ref": "#/$defs/Place"}, "code": {"type": "string", "pattern": "[A-Z]{3}"}},
          "$defs": {"Place": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
                              "additionalProperties": False}}}


def test_refs_and_unanchored_patterns_compile_and_the_schema_is_left_as_it_was():
    before = repr(NESTED)
    grammar = compile_constraint(Constraint("json_schema", schema=NESTED), HERMES)
    LlamaGrammar.from_string(grammar, verbose=False)
    assert "Place" in grammar and repr(NESTED) == before  # resolved on a copy


def test_patterns_are_anchored_without_letting_the_string_close_early():
    from parley.engine.grammar import ANY_JSON_CHARACTERS, _anchored

    assert _anchored({"pattern": "^a$"}) == {"pattern": "^(a)$"}
    assert _anchored({"pattern": "a|b"}) == {"pattern": f"^{ANY_JSON_CHARACTERS}(a|b){ANY_JSON_CHARACTERS}$"}
    assert _anchored({"pattern": "^a\\$"})["pattern"].endswith(f"(a[\\x24]){ANY_JSON_CHARACTERS}$")
    assert _anchored({"properties": {"pattern": {"type": "string"}}}) == {"properties": {"pattern": {"type": "string"}}}


@pytest.fixture(scope="module")
def smollm2_vocab():
    import llama_cpp
    from parley.engine.llamacpp import default_model_path

    return llama_cpp.Llama(model_path=str(default_model_path()), vocab_only=True, verbose=False)


def grammar_takes(llm, grammar: str, text: str) -> bool:
    """Whether llama.cpp's sampler under `grammar` lets SmolLM2's tokens of `text` through, in turn."""
    import math

    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(llama_cpp.llama_model_get_vocab(llm.model), grammar.encode(),
                                                   b"root")
    assert sampler, "llama.cpp could not parse the grammar"
    entry = (llama_cpp.llama_token_data * 1)()
    try:
        for token in llm.tokenize(text.encode(), add_bos=False, special=False):
            entry[0].id, entry[0].logit, entry[0].p = token, 0.0, 0.0
            llama_cpp.llama_sampler_apply(sampler, llama_cpp.byref(llama_cpp.llama_token_data_array(entry, 1, -1,
                                                                                                   False)))
            if math.isinf(entry[0].logit):
                return False
            llama_cpp.llama_sampler_accept(sampler, token)
        return True
    finally:
        llama_cpp.llama_sampler_free(sampler)


def test_a_json_string_holds_no_raw_control_character_as_json_allows_none(smollm2_vocab):
    # SmolLM2 at temperature 1 wrote raw newlines into strings under llama-cpp-python's own
    # string rule, and answers that no JSON parser reads were marked completed.
    grammar = compile_constraint(Constraint("json_schema", schema=SCHEMA), HERMES)
    assert grammar_takes(smollm2_vocab, grammar, '{"city": "Oslo\\nBergen \\u00e9\\t/"}')
    for control in ("\n", "\t", "\x01"):
        assert not grammar_takes(smollm2_vocab, grammar, f'{{"city": "Oslo{control}Bergen"}}'), repr(control)
    assert not grammar_takes(smollm2_vocab, grammar, '{"city": "Oslo" "Bergen"}')


def string_grammar(pattern: str) -> str:
    return compile_constraint(Constraint("json_schema", schema={
        "type": "object", "properties": {"a": {"type": "string", "pattern": pattern}}, "required": ["a"],
        "additionalProperties": False}), HERMES)


@pytest.mark.parametrize(("pattern", "matching", "other"), [
    ("^\\d{3}$", ["123"], ["12a", "ddd"]),
    ("^[^@]+@[^@]+\\.[a-z]{2,}$", ["x@y.io"], ["x@y.i", "x@y_io", "x\ny@z.io"]),
    ("^a.b$", ["axb", "a-b"], ["a\nb", "ab"]),
    ("^\\S+ \\w+\\s\\D$", ["a.b c_1 x"], ["a b c d"]),
    ('^say "hi"$', ['say "hi"'], ["say hi"]),
    ("^C:\\\\dir\\ttab$", ["C:\\dir\ttab"], ["C:dir"]),
    ("^[ -~]+$", ["hello world!"], ["tab\there"]),
    ("^\\u00e9t\\x41|(ab|cd){2}$", ["étA", "abcd"], ["abc"]),
])
def test_a_pattern_s_grammar_writes_json_text_of_matching_strings_only(smollm2_vocab, pattern, matching, other):
    """The grammar writes a string's JSON text: `\\d`, `\\.`, `\\S` compile (llama.cpp cannot parse
    the converter's own `\\d`), a quote or a newline the pattern matches is written escaped, and
    `.` and classes never let a raw quote or control character in (then the string would end, or
    not be JSON)."""
    import json

    grammar = string_grammar(pattern)
    for value in matching:
        assert grammar_takes(smollm2_vocab, grammar, json.dumps({"a": value}, ensure_ascii=False)), value
    for value in other:
        assert not grammar_takes(smollm2_vocab, grammar, json.dumps({"a": value}, ensure_ascii=False)), value
    for raw in ('{"a": "a"b', '{"a": "a\nb', '{"a": "a\tb'):
        assert not grammar_takes(smollm2_vocab, grammar, raw), raw


@pytest.mark.parametrize(("pattern", "why"), [
    ("^(?=a)b$", "lookarounds"), ("^a\\1$", "'\\1' is not supported"), ("^[[:alpha:]]$", "nested or POSIX"),
    ("^a]$", "escape the ']'"), ("^a{x}$", "must start a quantifier"), ("^(a$", "unbalanced"),
    ("^a^b$", "only at the pattern's start or end"), ("^[\\t]$", "only characters that JSON writes escaped"),
    ("^[z-a]$", "out of order"), ("^[\\D]$", "not supported in a character class"), ("^\\xZ1$", "hex digits"),
])
def test_what_a_pattern_s_grammar_cannot_hold_is_refused_saying_why(pattern, why):
    with pytest.raises(ValueError, match=__import__("re").escape(why)):
        string_grammar(pattern)

