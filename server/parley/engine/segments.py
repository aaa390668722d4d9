"""Rendering a prompt message by message, where the chat template allows it.

A chat template renders a whole conversation, so a turn that re-renders its whole context costs
more with every turn. Many templates (ChatML, Llama 3, ...) write each message on its own: the
conversation's rendering is its messages' renderings end to end, then the generation prompt. For
such a template the service keeps a conversation's tokens and renders only a turn's new messages
(service/turn_state.py).

Whether a template is one of them is checked at start-up, not assumed: probe conversations (roles
in every order, reasoning and tool-call text, empty and template-like contents, with and without
a system message) must render, for every prefix, exactly as their messages' renderings joined.
Tokens join too only at a boundary that the tokenizer never merges across: each message's
rendering (but the first) and the generation prompt must open with one of the tokenizer's
special tokens, which it matches before anything else and which strips no whitespace beside it;
that is checked for every message rendered, not only the probes. A template that fails any of it
is rendered whole, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from parley.engine.base import ChatMessage

# A message before the one rendered, so that the template renders that one as a later message
# (templates treat the first differently: SmolLM2's adds a default system prompt before it).
ANCHOR = ChatMessage("developer", "Parley")
PROBES = (
    [ChatMessage("developer", "You are terse."), ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello!"),
     ChatMessage("user", "Add 2 and 3."),
     ChatMessage("assistant", '<think>\nA sum.\n</think>\n<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n'
                 "</tool_call>"),
     ChatMessage("user", "<tool_response>\n5\n</tool_response>"), ChatMessage("assistant", "5."),
     ChatMessage("user", "Thanks")],
    [ChatMessage("user", "Hi"), ChatMessage("assistant", "<think>\nhm\n</think>\nHello"), ChatMessage("user", "Again")],
    [ChatMessage("user", "one"), ChatMessage("user", "two"), ChatMessage("assistant", ""),
     ChatMessage("assistant", "{{ not a template }}"), ChatMessage("developer", "late rule"),
     ChatMessage("user", "  spaced \n\n")],
)


class MessageRendering(Protocol):
    """An engine's prompt as its messages' renderings end to end: for any messages,
    render_prompt(messages) == render_message(messages[0], True) + ... +
    render_message(messages[i], False) + ... + generation_prompt(). render_message raises
    ValueError for a message it cannot render on its own (the caller renders the prompt whole)."""

    def render_message(self, message: ChatMessage, first: bool) -> list[int]: ...

    def generation_prompt(self) -> list[int]: ...


class NotSegmented(ValueError):
    pass


class TemplateSegments:
    """MessageRendering over a chat template: `render_text(messages, add_generation_prompt)` is
    the template, `tokenize` the tokenizer (special tokens parsed, no BOS added), and
    `is_boundary(token)` whether a token is one the tokenizer matches before anything else and
    that strips no whitespace beside it."""

    def __init__(self, render_text: Callable[[list[ChatMessage], bool], str], tokenize: Callable[[str], list[int]],
                 is_boundary: Callable[[int], bool]):
        self._render_text = render_text
        self._tokenize = tokenize
        self._is_boundary = is_boundary
        self._anchor = render_text([ANCHOR], False)
        self._generation = self._after_anchor(render_text([ANCHOR], True))
        self._generation_tokens = self._opened(self._generation) if self._generation else []

    @classmethod
    def checked(cls, render_text, tokenize, is_boundary) -> tuple[TemplateSegments | None, str | None]:
        """(segments, None) when the template renders message by message on every probe, else
        (None, why not)."""
        try:
            segments = cls(render_text, tokenize, is_boundary)
            for probe in PROBES:
                for end in range(1, len(probe) + 1):
                    messages = probe[:end]
                    joined = "".join(segments.text(message, index == 0) for index, message in enumerate(messages))
                    if render_text(messages, True) != joined + segments._generation:
                        return None, f"the template renders a conversation of {end} messages otherwise than its messages"
                tokens = [token for index, message in enumerate(probe) for token in segments.render_message(message, index == 0)]
                if tokenize(render_text(probe, True)) != tokens + segments.generation_prompt():
                    return None, "the tokenizer merges tokens across the template's message boundaries"
        except Exception as exc:  # a template that raises on a probe's order or content
            return None, f"{type(exc).__name__}: {exc}"
        return segments, None

    def text(self, message: ChatMessage, first: bool) -> str:
        if first:
            return self._render_text([message], False)
        return self._after_anchor(self._render_text([ANCHOR, message], False))

    def render_message(self, message: ChatMessage, first: bool) -> list[int]:
        text = self.text(message, first)
        return self._tokenize(text) if first else self._opened(text)

    def generation_prompt(self) -> list[int]:
        return list(self._generation_tokens)

    def _after_anchor(self, text: str) -> str:
        if not text.startswith(self._anchor):
            raise NotSegmented("the template changes the message before the one rendered")
        return text[len(self._anchor):]

    def _opened(self, text: str) -> list[int]:
        tokens = self._tokenize(text)
        if not tokens or not self._is_boundary(tokens[0]):
            raise NotSegmented("the rendering does not open with a special token")
        return tokens
