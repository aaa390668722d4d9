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


# What an unanchored side of a pattern may hold: any characters a JSON string holds unescaped.
ANY_JSON_CHARACTERS = '[^"\\\\\\x00-\\x1f]*'

_QUANTIFIER = re.compile(r"\{\d+(,\d*)?\}|\{,\d+\}")
_UNSUPPORTED_ESCAPES = "pPkKbBAzZG0123456789"
# Characters JSON writes escaped (a quote, a backslash, the controls): a pattern's grammar writes
# the JSON text of a string, so where a pattern matches one of them the grammar writes its escape
# (a literal), or leaves it out (a class, `.`): what the grammar allows is then a subset of what
# the pattern matches, and always a JSON string.
_ESCAPED_IN_JSON = ((0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C))
_CLASS_ESCAPES = {"d": ((0x30, 0x39),), "w": ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)),
                  "s": ((0x20, 0x20),)}  # \s: a space (tabs and newlines are escapes in JSON)
_SIMPLE_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f", "v": "\v"}
_MAX_CODE_POINT = 0x10FFFF


def _code(point: int) -> str:
    """A code point as a GBNF escape (the converter copies a class into the grammar as it is)."""
    return f"\\x{point:02X}" if point < 0x100 else f"\\u{point:04X}" if point < 0x10000 else f"\\U{point:08X}"


def _class(ranges, negated: bool) -> str:
    """A regular-expression class of code-point ranges, JSON's escaped characters left out."""
    if negated:
        ranges = [*ranges, *_ESCAPED_IN_JSON]
    else:
        kept = []
        for low, high in ranges:
            for forbidden_low, forbidden_high in _ESCAPED_IN_JSON:
                if low <= forbidden_high and forbidden_low <= high:
                    if low < forbidden_low:
                        kept.append((low, forbidden_low - 1))
                    low = max(low, forbidden_high + 1)
                if low > high:
                    break
            else:
                kept.append((low, high))
        if not kept:
            raise ValueError("matches only characters that JSON writes escaped")
        ranges = kept
    members = "".join(_code(low) if low == high else f"{_code(low)}-{_code(high)}" for low, high in ranges)
    return f"[{'^' if negated else ''}{members}]"


def _literal_of(char: str) -> str:
    """The regular expression (as the converter reads it) that writes `char` as JSON does."""
    point = ord(char)
    if char.isalnum() or char in " _" or (point > 0x7F and char.isprintable()):
        return char
    if any(low <= point <= high for low, high in _ESCAPED_IN_JSON):
        escape = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r",
                  "\f": "\\f", "\b": "\\b"}.get(char) or f"\\u{point:04x}"
        return "(" + escape.replace("\\", "\\\\") + ")"  # a backslash the converter writes as text
    return _class([(point, point)], False)


def _hex_escape(pattern: str, i: int) -> tuple[int, int]:
    """The code point of the `\\xHH` or `\\uHHHH` at `i`, and the index after it."""
    digits = 2 if pattern[i + 1] == "x" else 4
    code = pattern[i + 2:i + 2 + digits]
    if len(code) != digits or not all(c in "0123456789abcdefABCDEF" for c in code):
        raise ValueError(f"'\\{pattern[i + 1]}' needs {digits} hex digits")
    return int(code, 16), i + 2 + digits


def _class_at(pattern: str, start: int) -> tuple[str, int]:
    """The class that opens at `start`, as a JSON-safe class, and the index after it."""
    i = start + 1
    negated = pattern[i:i + 1] == "^"
    i += negated
    if pattern[i:i + 1] == "]":
        raise ValueError("escape a ']' that opens a character class")
    ranges, n = [], len(pattern)

    def member(i: int) -> tuple[list[tuple[int, int]] | int, int]:
        char = pattern[i]
        if char == "[":
            raise ValueError("nested or POSIX character classes are not supported")
        if char != "\\":
            return ord(char), i + 1
        escape = pattern[i + 1:i + 2]
        if escape in _CLASS_ESCAPES:
            return list(_CLASS_ESCAPES[escape]), i + 2
        if escape in _SIMPLE_ESCAPES:
            return ord(_SIMPLE_ESCAPES[escape]), i + 2
        if escape in ("x", "u"):
            return _hex_escape(pattern, i)
        if not escape or escape.isalnum():
            raise ValueError(f"'\\{escape}' is not supported in a character class")
        return ord(escape), i + 2

    while i < n and pattern[i] != "]":
        first, i = member(i)
        if isinstance(first, list):
            ranges += first
            continue
        if pattern[i:i + 1] == "-" and i + 1 < n and pattern[i + 1] != "]":
            last, i = member(i + 1)
            if isinstance(last, list) or last < first:
                raise ValueError("a character range's ends are out of order")
            ranges.append((first, last))
        else:
            ranges.append((first, first))
    if i >= n:
        raise ValueError("a character class is not closed")
    return _class(ranges, negated), i + 1


def json_pattern(pattern: str) -> str:
    """A JSON Schema pattern (without its anchors) as the pattern the schema converter turns into
    the grammar of a JSON string's text: every character it lets the model write is one JSON
    writes unescaped, or a whole escape. The converter takes only a plain subset (it rejects some
    of the rest and loops forever on some, such as a stray `]`), and writes `\\d` and `\\.` into
    the grammar as escapes llama.cpp cannot parse; so this reads literals and escapes (`\\d \\w \\s`
    and their negations, `\\t \\n`, `\\xHH \\uHHHH`, escaped punctuation), `.`, classes without
    nested `[`, capturing groups, `|`, and the `* + ? {m,n}` quantifiers, and raises ValueError
    for anything else."""
    out, i, depth, n = [], 0, 0, len(pattern)
    try:
        while i < n:
            char = pattern[i]
            if char == "\\":
                escape = pattern[i + 1:i + 2]
                if not escape or escape in _UNSUPPORTED_ESCAPES:
                    raise ValueError(f"'\\{escape}' is not supported")
                if escape.lower() in _CLASS_ESCAPES:
                    out.append(_class(_CLASS_ESCAPES[escape.lower()], negated=escape.isupper()))
                    i += 2
                elif escape in ("x", "u"):
                    point, i = _hex_escape(pattern, i)
                    out.append(_literal_of(chr(point)))
                elif escape in _SIMPLE_ESCAPES:
                    out.append(_literal_of(_SIMPLE_ESCAPES[escape]))
                    i += 2
                elif escape.isalnum():
                    raise ValueError(f"'\\{escape}' is not supported")
                else:
                    out.append(_literal_of(escape))
                    i += 2
            elif char == "[":
                cls, i = _class_at(pattern, i)
                out.append(cls)
            elif char == ".":
                out.append(_class([(0, _MAX_CODE_POINT)], False))
                i += 1
            elif char == "{":
                quantifier = _QUANTIFIER.match(pattern, i)
                if quantifier is None:
                    raise ValueError("'{' must start a quantifier like {2,5}; escape it")
                out.append(quantifier.group())
                i = quantifier.end()
            elif char in "]}":
                raise ValueError(f"escape the '{char}'")
            elif char in "^$":
                raise ValueError(f"'{char}' is supported only at the pattern's start or end")
            elif char in "*+?|":
                out.append(char)
                i += 1
            elif char == "(":
                if pattern[i + 1:i + 2] == "?":
                    raise ValueError("lookarounds and (?...) groups are not supported")
                depth += 1
                out.append(char)
                i += 1
            elif char == ")":
                depth -= 1
                if depth < 0:
                    raise ValueError("unbalanced parentheses")
                out.append(char)
                i += 1
            else:
                out.append(_literal_of(char))
                i += 1
        if depth:
            raise ValueError("unbalanced parentheses")
    except ValueError as exc:
        raise ValueError(f"pattern {pattern!r}: {exc}") from None
    return "".join(out)


def _anchored(schema):
    """JSON Schema patterns match anywhere in the string; the converter takes only whole-string
    patterns (`^...$`), so an unanchored side gets ANY_JSON_CHARACTERS. Each pattern is made
    JSON-safe (json_pattern) on the way."""
    if isinstance(schema, list):
        return [_anchored(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: _anchored(value) for key, value in schema.items()}
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        start, end = pattern.startswith("^"), pattern.endswith("$") and not pattern.endswith("\\$")
        core = json_pattern(pattern[1 if start else 0:len(pattern) - 1 if end else len(pattern)])
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
