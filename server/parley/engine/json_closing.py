"""The shortest text that completes a JSON prefix, tracked as the text streams.

`text.format: json_object` is a promise of a JSON object. A grammar keeps every token valid, but
it cannot make a model stop adding keys, so a small model can reach max_output_tokens inside an
unfinished object. The llama.cpp engine therefore watches how much closing the object still
needs (this module), and once that is about what the budget has left, it writes the closing
itself: the answer stays within its budget and parses.

The tracker assumes a well-formed prefix (the grammar guarantees one). A pending key gets
`: null`, a pending value `null`, a number that cannot end yet a `0`, a literal its remaining
letters, and a comma that waits for more gets one more member (`"": null` or `null`).
"""

from __future__ import annotations

_LITERALS = ("true", "false", "null")


class JsonCloser:
    def __init__(self) -> None:
        # One entry per open container: "{" or "[", with what it expects next:
        # key | colon | value | comma (comma-or-close) | first (a key/value or the close).
        self._stack: list[list[str]] = []
        self._in_string = False
        self._string_is_key = False
        self._escaped = False
        self._unicode_left = 0     # hex digits still due after \u
        self._token = ""           # a number or literal being written
        self._done = False         # the top-level value is complete

    def feed(self, text: str) -> None:
        for char in text:
            self._char(char)

    def _char(self, char: str) -> None:
        if self._in_string:
            if self._unicode_left:
                self._unicode_left -= 1
            elif self._escaped:
                self._escaped = False
                if char == "u":
                    self._unicode_left = 4
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
                self._after_value("colon" if self._string_is_key else None)
            return
        if self._token:
            if char.isalnum() or char in "+-.":
                self._token += char
                return
            self._token = ""
            self._after_value(None)
        if char.isspace():
            return
        top = self._stack[-1] if self._stack else None
        if char in "{[":
            self._stack.append([char, "first"])
        elif char in "}]":
            self._stack.pop()
            self._after_value(None)
        elif char == ":":
            top[1] = "value"
        elif char == ",":
            top[1] = "key" if top[0] == "{" else "value"
        elif char == '"':
            self._in_string = True
            self._string_is_key = top is not None and top[0] == "{" and top[1] in ("key", "first")
        else:  # a number or a literal starts
            self._token = char

    def _after_value(self, expecting: str | None) -> None:
        """A string, number, literal or container just ended."""
        if expecting == "colon":
            self._stack[-1][1] = "colon"
        elif self._stack:
            self._stack[-1][1] = "comma"
        else:
            self._done = True

    def suffix(self) -> str:
        """What completes the text fed so far (empty once the top-level value is complete)."""
        parts = []
        expecting = self._stack[-1][1] if self._stack else None
        if self._in_string:
            parts.append("0000"[:self._unicode_left] + ("\\" if self._escaped else "") + '"')
            expecting = "colon" if self._string_is_key else "comma"
        elif self._token:
            literal = next((word for word in _LITERALS if word.startswith(self._token)), None)
            parts.append(literal[len(self._token):] if literal else ("0" if self._token[-1] in "+-.eE" else ""))
            expecting = "comma"
        if expecting == "colon":
            parts.append(": null")
        elif expecting == "value":
            parts.append("null")
        elif expecting == "key":
            parts.append('"": null')
        if not self._stack and not self._done and not parts:
            parts.append("{}")  # nothing written yet: the smallest object
        parts += ["}" if opener == "{" else "]" for opener, _ in reversed(self._stack)]
        return "".join(parts)
