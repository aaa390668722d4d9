"""GBNF builders for llama.cpp constrained decoding (engine-specific compilation of a Constraint).

The JSON-schema part comes from llama.cpp's own converter (SchemaConverter); this module
composes it into whole-output grammars: tool calls in the generic format, free text that can
never contain a tool-call opener, an optional leading reasoning block.
"""

from __future__ import annotations

import json

from parley.engine.base import Constraint


def _literal(text: str) -> str:
    return json.dumps(text)  # GBNF string literals use JSON escaping


def _char_class_without(chars: str) -> str:
    escaped = "".join("\\" + c if c in "]\\^-" else c for c in chars)
    return f"[^{escaped}]"


def text_without(literal: str, name: str) -> dict[str, str]:
    """Rules for any text that never contains `literal` (whose first character occurs only once).

    A small automaton over the literal's prefixes: after matching k characters, the next
    character either continues the match, restarts it (the first character), or resets it.
    """
    first = literal[0]
    assert first not in literal[1:], "the opener character must not repeat inside the literal"
    rules = {}
    n = len(literal)
    # state k: the text so far ends with literal[:k] (k >= 1)
    for k in range(1, n):
        options = [f"{_literal(first)} {name}-s1", f"{_char_class_without(literal[k] + first)} {name}-body"]
        if k + 1 < n:
            options.append(f"{_literal(literal[k])} {name}-s{k + 1}")
        options.append('""')  # the text may end on a partial match
        rules[f"{name}-s{k}"] = " | ".join(options)
    rules[f"{name}-body"] = f'{_char_class_without(first)} {name}-body | {_literal(first)} {name}-s1 | ""'
    rules[name] = f"{name}-body"
    return rules


class GrammarBuilder:
    def __init__(self) -> None:
        from llama_cpp.llama_grammar import SchemaConverter  # part of llama-cpp-python

        self._converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        self._rules: dict[str, str] = {}

    def schema_rule(self, schema: dict, name: str) -> str:
        return self._converter.visit(schema, name)

    def add(self, rules: dict[str, str]) -> None:
        self._rules.update(rules)

    def build(self, root: str) -> str:
        self._rules["root"] = root
        lines = [self._converter.format_grammar().strip()]
        lines += [f"{name} ::= {body}" for name, body in self._rules.items()]
        return "\n".join(lines) + "\n"


TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
MAX_PARALLEL_CALLS = 4  # a small model must not loop on calls until max_output_tokens
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _add_calls(builder: GrammarBuilder, constraint: Constraint) -> None:
    """Rules `tail` (a call after its opener), `call` and `calls` (one, or up to the cap)."""
    tails = []
    for index, (name, schema) in enumerate(constraint.tools):
        arguments = builder.schema_rule(schema or {"type": "object"}, f"args{index}")
        prefix = _literal(f'{{"name": {json.dumps(name)}, "arguments": ')
        # The newline after the opener is optional: a lazy switch may happen just after it.
        tails.append(f'"\\n"? {prefix} {arguments} {_literal(chr(125) + chr(10) + TOOL_CLOSE)}')
    builder.add({"tail": " | ".join(f"( {t} )" for t in tails)})
    builder.add({"call": f"{_literal(TOOL_OPEN)} tail"})
    more = f'( "\\n" call ){{0,{MAX_PARALLEL_CALLS - 1}}}' if constraint.parallel else ""
    builder.add({"calls": f"call {more}".strip(), "rest": f"tail {more}".strip()})


def compile_call_continuation(constraint: Constraint) -> str:
    """For lazy `auto`: the model already wrote the opener; the rest must be valid calls."""
    builder = GrammarBuilder()
    _add_calls(builder, constraint)
    return builder.build("rest")


def lazy(constraint: Constraint | None) -> bool:
    """`auto` with a free-text alternative runs unconstrained until the model opens a call."""
    return constraint is not None and constraint.kind == "tools" and constraint.mode == "auto" \
        and constraint.schema is None


def compile_constraint(constraint: Constraint, reasoning: bool = False) -> str:
    """A whole-output GBNF grammar for the generic (Hermes-style) tool format."""
    builder = GrammarBuilder()
    if constraint.kind == "json_schema":
        body = builder.schema_rule(constraint.schema, "answer")
    elif constraint.kind == "json_object":
        body = builder.schema_rule({"type": "object"}, "answer")
    elif constraint.kind == "tools" and constraint.mode == "none":
        if constraint.schema is not None:
            body = builder.schema_rule(constraint.schema, "answer")
        else:
            builder.add(text_without(TOOL_OPEN, "free"))
            body = "free"
    elif constraint.kind == "tools":
        _add_calls(builder, constraint)
        if constraint.schema is not None:  # answering instead of calling follows text.format
            builder.add({"free": builder.schema_rule(constraint.schema, "answer")})
        else:
            builder.add(text_without(TOOL_OPEN, "free"))
        body = "calls" if constraint.mode == "required" else "calls | free"
    else:
        raise ValueError(f"unknown constraint kind {constraint.kind!r}")
    if reasoning:
        builder.add(text_without(THINK_CLOSE, "thought"))
        builder.add({"think": f'{_literal(THINK_OPEN)} thought {_literal(THINK_CLOSE)} "\\n"*'})
        return builder.build(f"think? ( {body} )")
    return builder.build(f"( {body} )")
