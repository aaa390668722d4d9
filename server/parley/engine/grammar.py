"""GBNF builders for llama.cpp constrained decoding (engine-specific compilation of a Constraint).

The JSON-schema part comes from llama.cpp's own converter (SchemaConverter); this module
composes it into whole-output grammars: tool calls in the family's ToolFormat (its markers and
separators, engine/formats/families.py), free text that can never contain the format's marker,
an optional leading reasoning block. Harmony's channels (gpt-oss) have a whole-output shape of
their own: an optional analysis message, then the final answer or one call.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re

from parley.engine.base import Constraint
from parley.engine.formats import THINK_CLOSE, THINK_OPEN, ToolFormat
from parley.engine.formats import harmony as hm


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


# What an unanchored side of a pattern may hold: any characters but those a JSON string must
# escape (`.` would let the model close the string early).
ANY_JSON_CHARACTERS = '[^"\\\\\\x00-\\x1f]*'


_QUANTIFIER = re.compile(r"\{\d+(,\d*)?\}|\{,\d+\}")


def check_pattern(pattern: str) -> None:
    """Raise ValueError for what the schema converter cannot translate: it rejects some of it
    itself, but loops forever on some (a stray `]`, a POSIX class `[[:alpha:]]`), so only a plain
    subset gets there: literals and escapes, `.`, classes without nested `[`, capturing groups,
    `|`, and the `* + ? {m,n}` quantifiers."""
    i, depth, n = 0, 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n or pattern[i + 1] in "pPkKbBAzZG0123456789":
                raise ValueError(f"pattern {pattern!r}: '\\{pattern[i + 1:i + 2]}' is not supported")
            i += 2
            continue
        if c == "[":
            j = i + 1 + (pattern[i + 1:i + 2] == "^")
            if pattern[j:j + 1] == "]":
                raise ValueError(f"pattern {pattern!r}: escape a ']' that opens a character class")
            while j < n and pattern[j] != "]":
                if pattern[j] == "[":
                    raise ValueError(f"pattern {pattern!r}: nested or POSIX character classes are not supported")
                j += 2 if pattern[j] == "\\" else 1
            if j >= n:
                raise ValueError(f"pattern {pattern!r}: a character class is not closed")
            i = j + 1
            continue
        if c == "{":
            quantifier = _QUANTIFIER.match(pattern, i)
            if quantifier is None:
                raise ValueError(f"pattern {pattern!r}: '{{' must start a quantifier like {{2,5}}; escape it")
            i = quantifier.end()
            continue
        if c in "]}":
            raise ValueError(f"pattern {pattern!r}: escape the '{c}'")
        if c in "^$":
            raise ValueError(f"pattern {pattern!r}: '{c}' is supported only at the pattern's start or end")
        if c == "(":
            if pattern[i + 1:i + 2] == "?":
                raise ValueError(f"pattern {pattern!r}: lookarounds and (?...) groups are not supported")
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"pattern {pattern!r}: unbalanced parentheses")
        i += 1
    if depth:
        raise ValueError(f"pattern {pattern!r}: unbalanced parentheses")


def _anchored(schema):
    """JSON Schema patterns match anywhere in the string; the converter takes only whole-string
    patterns (`^...$`), so an unanchored side gets ANY_JSON_CHARACTERS."""
    if isinstance(schema, list):
        return [_anchored(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: _anchored(value) for key, value in schema.items()}
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        start, end = pattern.startswith("^"), pattern.endswith("$") and not pattern.endswith("\\$")
        core = pattern[1 if start else 0:len(pattern) - 1 if end else len(pattern)]
        check_pattern(core)
        result["pattern"] = f"^{'' if start else ANY_JSON_CHARACTERS}({core}){'' if end else ANY_JSON_CHARACTERS}$"
    return result


# A character of a JSON string. llama-cpp-python's converter writes `[^"\\]`, which lets a raw
# newline or tab into a string: text that no JSON parser reads (the model wrote them, at
# temperature 1, in about one answer in four). llama.cpp's own converter excludes the control
# characters, as JSON does; so does this.
JSON_STRING_CHARACTER = (r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] '
                         r'[0-9a-fA-F])')


class GrammarBuilder:
    def __init__(self) -> None:
        from llama_cpp.llama_grammar import SchemaConverter  # part of llama-cpp-python

        self._converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        self._rules: dict[str, str] = {}

    def schema_rule(self, schema: dict, name: str) -> str:
        """`schema` as a rule: its `$ref`s resolved (against its own `$defs`), its patterns anchored."""
        prepared = self._converter.resolve_refs(_anchored(copy.deepcopy(schema)), name)
        return self._converter.visit(prepared, name)

    def add(self, rules: dict[str, str]) -> None:
        self._rules.update(rules)

    def build(self, root: str) -> str:
        self._rules["root"] = root
        if "char" in self._converter._rules:  # the converter's string character (above)
            self._converter._rules["char"] = JSON_STRING_CHARACTER
        lines = [self._converter.format_grammar().strip()]
        lines += [f"{name} ::= {body}" for name, body in self._rules.items()]
        return "\n".join(lines) + "\n"


MAX_PARALLEL_CALLS = 4  # a small model must not loop on calls until max_output_tokens


def _sequence(*parts: str) -> str:
    """GBNF for consecutive parts; literal text is given as already-quoted literals or rules."""
    return " ".join(part for part in parts if part and part != '""')


def _add_calls(builder: GrammarBuilder, constraint: Constraint, fmt: ToolFormat) -> None:
    """Rules `calls` (the whole call list) and `rest` (the list after its marker was written)."""
    objects = []
    for index, (name, schema) in enumerate(constraint.tools):
        arguments = builder.schema_rule(schema or {"type": "object"}, f"args{index}")
        prefix = _literal(fmt.call_prefix(name))
        objects.append(_sequence("(", prefix, arguments, _literal(fmt.call_suffix), ")"))
    builder.add({"object": " | ".join(objects)})
    builder.add({"call": _sequence(_literal(fmt.call_open), "object", _literal(fmt.call_close))})
    most = min(MAX_PARALLEL_CALLS, constraint.max_calls or MAX_PARALLEL_CALLS, fmt.calls_per_turn or MAX_PARALLEL_CALLS)
    more = f"( {_literal(fmt.separator)} call ){{0,{most - 1}}}" if constraint.parallel and most > 1 else ""
    builder.add({"calls": _sequence(_literal(fmt.calls_open), "call", more, _literal(fmt.calls_close))})
    # After a lazy switch, what follows the marker; whitespace there is optional, since the switch
    # may come just after the marker's token.
    after = _literal(fmt.after_marker)
    if fmt.after_marker and not fmt.after_marker.strip():
        after = f"{after}?"
    builder.add({"rest": _sequence(after, "object", _literal(fmt.call_close), more, _literal(fmt.calls_close))})


def compile_call_continuation(constraint: Constraint, fmt: ToolFormat) -> str:
    """For lazy `auto`: the model already wrote the marker; the rest must be valid calls."""
    builder = GrammarBuilder()
    _add_calls(builder, constraint, fmt)
    return builder.build("rest")


def constraint_key(constraint: Constraint) -> str:
    """A constraint as a cache key (it holds schemas, which are dicts: not hashable)."""
    return json.dumps(dataclasses.asdict(constraint), sort_keys=True)


def lazy(constraint: Constraint | None) -> bool:
    """`auto` with a free-text alternative runs unconstrained until the model opens a call."""
    return constraint is not None and constraint.kind == "tools" and constraint.mode == "auto" \
        and constraint.schema is None


def compile_constraint(constraint: Constraint, fmt: ToolFormat, reasoning: bool = False) -> str:
    """A whole-output GBNF grammar, tool calls in the family's format `fmt`."""
    if fmt.channels:
        return _harmony(constraint, fmt)
    builder = GrammarBuilder()
    if constraint.kind == "json_schema":
        body = builder.schema_rule(constraint.schema, "answer")
    elif constraint.kind == "json_object":
        body = builder.schema_rule({"type": "object"}, "answer")
    elif constraint.kind == "tools" and constraint.mode == "none":
        if constraint.schema is not None:
            body = builder.schema_rule(constraint.schema, "answer")
        else:
            builder.add(text_without(fmt.marker, "free"))
            body = "free"
    elif constraint.kind == "tools":
        _add_calls(builder, constraint, fmt)
        if constraint.schema is not None:  # answering instead of calling follows text.format
            builder.add({"free": builder.schema_rule(constraint.schema, "answer")})
        else:
            builder.add(text_without(fmt.marker, "free"))
        body = "calls" if constraint.mode == "required" else "calls | free"
    else:
        raise ValueError(f"unknown constraint kind {constraint.kind!r}")
    if reasoning:
        builder.add(text_without(THINK_CLOSE, "thought"))
        builder.add({"think": f'{_literal(THINK_OPEN)} thought {_literal(THINK_CLOSE)} "\\n"*'})
        return builder.build(f"think? ( {body} )")
    return builder.build(f"( {body} )")


def _harmony(constraint: Constraint, fmt: ToolFormat) -> str:
    """Harmony output (the generation prompt opened the assistant's first message): an optional
    analysis message, then the final answer (ended by <|return|>) or one call (ended by <|call|>).
    Reasoning and free text never contain `<|`, so they cannot open markup of their own."""
    builder = GrammarBuilder()
    builder.add(text_without("<|", "thought"))
    builder.add({"analysis": _sequence(_literal(f"{hm.CHANNEL}analysis{hm.MESSAGE}"), "thought",
                                       _literal(hm.END + hm.GENERATION_PROMPT))})

    def final(body: str) -> str:
        return _sequence(_literal(f"{hm.CHANNEL}final{hm.MESSAGE}"), body, _literal(hm.RETURN))

    schema = constraint.schema if constraint.kind != "json_object" else {"type": "object"}
    if schema is not None:
        builder.add({"answer": builder.schema_rule(schema, "answer")})
    else:
        builder.add(text_without("<|", "answer"))
    if constraint.kind == "tools" and constraint.mode != "none":
        _add_calls(builder, constraint, fmt)
        body = "calls" if constraint.mode == "required" else f"calls | {final('answer')}"
    elif constraint.kind in ("tools", "json_schema", "json_object"):
        body = final("answer")
    else:
        raise ValueError(f"unknown constraint kind {constraint.kind!r}")
    return builder.build(f"analysis? ( {body} )")
