"""What a streaming parser yields: typed segments of a model's output."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class Text:
    """Visible answer text."""

    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class Reasoning:
    """Reasoning text."""

    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class CallStart:
    """A tool call of function `name` starts."""

    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class CallArguments:
    """More characters of the open call's arguments (a JSON object, as text)."""

    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class CallEnd:
    """The open call's arguments are complete."""


CALL_END = CallEnd()
Segment = Text | Reasoning | CallStart | CallArguments | CallEnd
