"""Streaming parsers of model output: tool calls in a family's format, and reasoning blocks.

A parser consumes text deltas (never the finished text only) and yields typed segments: Text,
Reasoning, CallStart, CallArguments, CallEnd. The concatenated CallArguments of a call are
exactly its `arguments` string. Markers come from the family's ToolFormat (families.py), never
from here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

from parley.engine.formats.segments import CALL_END, CallArguments, CallStart, Reasoning, Segment, Text

if TYPE_CHECKING:
    from parley.engine.formats.tool_format import ToolFormat




class _ArgumentScanner:
    """Follows one JSON value character by character; says when it is complete."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.started = False

    def feed(self, char: str) -> bool:
        """Consume `char` (part of the value); True when the value just ended."""
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = False
            return False
        if char == '"':
            self.in_string = True
        elif char in "{[":
            self.depth += 1
            self.started = True
        elif char in "}]":
            self.depth -= 1
            return self.depth == 0
        return False


class MarkedCallsParser:
    """Text, then calls `OPEN {"name": ..., <arguments key>: {...}} CLOSE`, OPEN being the
    format's marker and CLOSE what ends each call."""

    SEPARATORS = " \n\t"

    def __init__(self, fmt: ToolFormat) -> None:
        self.OPEN = fmt.marker
        self.CLOSE = fmt.call_close.strip()
        self.ARGS_KEYS = tuple(dict.fromkeys((fmt.arguments_key, "arguments")))
        self._buffer = ""
        self._state = "text"
        self._scanner: _ArgumentScanner | None = None

    def feed(self, delta: str) -> Iterator[Segment]:
        self._buffer += delta
        while True:
            progressed = yield from self._step()
            if not progressed:
                return

    def finish(self) -> Iterator[Segment]:
        if self._state == "text" and self._buffer:
            yield Text(self._buffer)
        elif self._state == "args":
            yield CALL_END  # cut off (max tokens): the arguments stay as far as they got
        self._buffer = ""

    def _step(self):
        if self._state == "text":
            at = self._buffer.find(self.OPEN)
            if at < 0:
                keep = partial_suffix(self._buffer, self.OPEN)
                emit, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
                if emit:
                    yield Text(emit)
                return False
            if at > 0:
                yield Text(self._buffer[:at])
            self._buffer = self._buffer[at + len(self.OPEN):]
            self._state = "header"
            return True
        if self._state == "header":
            name, rest = _parse_header(self._buffer, self.ARGS_KEYS)
            if name is None:
                return False
            yield CallStart(name)
            self._buffer = rest
            self._state = "args"
            self._scanner = _ArgumentScanner()
            return True
        if self._state == "args":
            out = []
            for index, char in enumerate(self._buffer):
                if not self._scanner.started and char.isspace():
                    continue
                out.append(char)
                if self._scanner.feed(char):
                    if out:
                        yield CallArguments("".join(out))
                    yield CALL_END
                    self._buffer = self._buffer[index + 1:]
                    self._state = "trailer"
                    return True
            if out:
                yield CallArguments("".join(out))
            self._buffer = ""
            return False
        if self._state == "trailer":
            # The call object's own closing brace, then the format's closing marker, if any.
            brace = self._buffer.find("}")
            if brace < 0:
                return False
            rest = self._buffer[brace + 1:]
            if self.CLOSE:
                at = rest.find(self.CLOSE)
                if at < 0:
                    return False
                rest = rest[at + len(self.CLOSE):]
            self._buffer = rest
            self._state = "between"
            return True
        if self._state == "between":
            stripped = self._buffer.lstrip(self.SEPARATORS)
            if not stripped:
                return False
            self._buffer = stripped
            self._state = "text"
            return True
        return False


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def _parse_header(buffer: str, args_keys: tuple[str, ...]) -> tuple[str | None, str]:
    """From `{"name": "f", "arguments": ` return ("f", the rest after the colon), or (None, buffer)."""
    start = buffer.find("{")
    if start < 0:
        return None, buffer
    for key in args_keys:
        marker = f'"{key}"'
        at = buffer.find(marker, start)
        if at < 0:
            continue
        colon = buffer.find(":", at + len(marker))
        if colon < 0:
            return None, buffer
        head = buffer[start:at].rstrip().rstrip(",") + "}"
        try:
            name = json.loads(head).get("name")
        except json.JSONDecodeError:
            return None, buffer
        return (str(name), buffer[colon + 1:]) if name else (None, buffer)
    return None, buffer


class MistralParser(MarkedCallsParser):
    """Mistral: [TOOL_CALLS][{"name": ..., "arguments": {...}}, {...}]."""

    SEPARATORS = " \n\t,[]"

    def _step(self):
        if self._state == "between" and self._buffer.lstrip(self.SEPARATORS).startswith("{"):
            self._buffer = self._buffer.lstrip(self.SEPARATORS)
            self._state = "header"
            return True
        return (yield from super()._step())


class Llama3JsonParser(MarkedCallsParser):
    """Llama 3.1/3.2 JSON tool calls: optional <|python_tag|>, then {"name", "parameters"} objects
    separated by ';'. A reply that starts with '{' is read as a call, as Meta's format does."""

    SEPARATORS = " \n\t;"

    def __init__(self, fmt: ToolFormat) -> None:
        super().__init__(fmt)
        self._seen_text = False

    def _step(self):
        if self._state == "text" and not self._seen_text:
            stripped = self._buffer.lstrip()
            if stripped.startswith("{"):
                self._buffer = stripped
                self._state = "header"
                return True
            if stripped:
                self._seen_text = True
        if self._state == "between" and self._buffer.lstrip(self.SEPARATORS).startswith("{"):
            self._buffer = self._buffer.lstrip(self.SEPARATORS)
            self._state = "header"
            return True
        return (yield from super()._step())


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ThinkParser:
    """<think>reasoning</think>answer. `starts_inside`: the template already opened <think>
    (DeepSeek-R1 style), so the output begins with reasoning."""

    OPEN, CLOSE = THINK_OPEN, THINK_CLOSE

    def __init__(self, starts_inside: bool = False):
        self._buffer = ""
        self._state = "reasoning" if starts_inside else "start"

    @property
    def inside(self) -> bool:
        return self._state == "reasoning"

    def feed(self, delta: str) -> Iterator[Segment]:
        self._buffer += delta
        if self._state == "start":
            stripped = self._buffer.lstrip()
            if len(stripped) < len(self.OPEN) and self.OPEN.startswith(stripped):
                return
            if stripped.startswith(self.OPEN):
                self._buffer = stripped[len(self.OPEN):]
                self._state = "reasoning"
            else:
                self._state = "answer"
        if self._state == "reasoning":
            at = self._buffer.find(self.CLOSE)
            if at < 0:
                keep = partial_suffix(self._buffer, self.CLOSE)
                emit = self._buffer[: len(self._buffer) - keep]
                self._buffer = self._buffer[len(self._buffer) - keep:]
                if emit:
                    yield Reasoning(emit)
                return
            if at:
                yield Reasoning(self._buffer[:at])
            self._buffer = self._buffer[at + len(self.CLOSE):]
            self._state = "after"
        if self._state == "after":  # newlines right after </think> separate, they are not answer
            self._buffer = self._buffer.lstrip("\n")
            if self._buffer:
                self._state = "answer"
        if self._state == "answer" and self._buffer:
            yield Text(self._buffer)
            self._buffer = ""

    def finish(self) -> Iterator[Segment]:
        if self._buffer and self._state != "after":
            yield Reasoning(self._buffer) if self._state == "reasoning" else Text(self._buffer)
        self._buffer = ""


class OutputParser:
    """Reasoning first (if the family reasons), then the tool-call format over the answer text;
    a format of channels (Harmony) parses the whole output itself."""

    def __init__(self, tool_format: ToolFormat, reasoning_format: str, tools: bool):
        if tool_format.channels:
            self._reasoning = self._tools = None
            self._channels = tool_format.parser(tool_format, tools)
            return
        self._channels = None
        self._reasoning = ThinkParser() if reasoning_format == "think" else None
        self._tools = tool_format.parser(tool_format) if tools else None

    @property
    def plain(self) -> bool:
        """Whether every delta is answer text as it is (no reasoning block, no tool calls)."""
        return self._reasoning is None and self._tools is None and self._channels is None

    @property
    def reasoning(self) -> bool:
        """Whether the model is inside its reasoning block right now."""
        if self._channels is not None:
            return self._channels.inside
        return self._reasoning is not None and self._reasoning.inside

    def _answer(self, segments: Iterator[Segment]) -> Iterator[Segment]:
        for segment in segments:
            if isinstance(segment, Text) and self._tools is not None:
                yield from self._tools.feed(segment.text)
            else:
                yield segment

    def feed(self, delta: str) -> Iterator[Segment] | list[Segment]:
        if self.plain:
            return [Text(delta)]
        if self._channels is not None:
            return self._channels.feed(delta)
        if self._reasoning is None:
            return self._tools.feed(delta)
        return self._answer(self._reasoning.feed(delta))

    def finish(self) -> Iterator[Segment]:
        if self._channels is not None:
            yield from self._channels.finish()
        if self._reasoning is not None:
            yield from self._answer(self._reasoning.finish())
        if self._tools is not None:
            yield from self._tools.finish()
