"""The engine process's wire: how `parley serve` processes and one `parley engine` process talk.

One Unix socket, newline-delimited JSON frames (orjson never writes a raw newline), each a list
whose first element names it. Many generations share one connection, told apart by an id the
serving process picks. A side's frames are not written one by one: they gather until the loop
next runs, then go in one write. A GPU step hands a token to every running sequence at once, and
so the step's tokens for one serving process cross in one write, not one per stream.

serving process -> engine process
    ["hello"]                                 -> ["hello", {model_id, context_window, ...}]
    ["generate", id, prompt, params]          -> ["d", id, [delta, ...]]..., then ["f", id, finished]
                                                 or ["e", id, kind, message]
    ["abort", id]                             (the consumer is gone; no reply)
    ["render", id, [message, ...]]            -> ["r", id, tokens] or ["e", id, kind, message]
                                                 (a message: [role, content], or with its other
                                                 fields [role, content, tools, calls, call, effort])
    ["constraint", id, constraint]            -> ["r", id, null] or ["e", id, "invalid", message]
engine process -> serving process, on hello and every STATUS_SECONDS:
    ["status", ok, detail, kv_cache_usage]

Error kinds: "failed" (RequestFailed), "dead" (EngineDead), "invalid" (ValueError: a constraint
the engine cannot enforce, a message it cannot render), "bug" (anything else; shown generically).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import orjson

from parley.engine.base import (
    ChatMessage,
    Constraint,
    EngineDead,
    Finished,
    RequestFailed,
    SamplingParams,
    TextDelta,
    TokenLogprob,
)

STATUS_SECONDS = 0.5
# A frame larger than this is a broken peer, not a prompt (a 1M-token prompt is about 8 MB).
MAX_FRAME_BYTES = 64 * 1024 * 1024


def encode_params(params: SamplingParams) -> dict:
    return dataclasses.asdict(params)


def decode_params(fields: dict) -> SamplingParams:
    constraint = fields.get("constraint")
    return SamplingParams(**{**fields, "constraint": decode_constraint(constraint) if constraint else None})


def encode_constraint(constraint: Constraint) -> dict:
    return dataclasses.asdict(constraint)


def decode_constraint(fields: dict) -> Constraint:
    return Constraint(**{**fields, "tools": tuple((name, schema) for name, schema in fields.get("tools", ()))})


def encode_delta(delta: TextDelta) -> list:
    if not delta.logprobs:
        return [delta.text, delta.tokens]
    return [delta.text, delta.tokens,
            [[lp.token, lp.logprob, lp.bytes, lp.top] for lp in delta.logprobs]]


def decode_delta(fields: list) -> TextDelta:
    if len(fields) == 2:
        return TextDelta(fields[0], fields[1])
    return TextDelta(fields[0], fields[1], tuple(
        TokenLogprob(token, logprob, tuple(raw), tuple((t, lp, tuple(b)) for t, lp, b in top))
        for token, logprob, raw, top in fields[2]))


def encode_finished(finished: Finished) -> list:
    return [finished.reason, finished.input_tokens, finished.output_tokens, finished.cached_tokens,
            finished.cache_write_tokens]


def decode_finished(fields: list) -> Finished:
    return Finished(*fields)


def encode_messages(messages: list[ChatMessage]) -> list[list]:
    return [list(message) if message.tools or message.calls or message.call or message.effort
            else [message.role, message.content] for message in messages]


def decode_messages(fields: list) -> list[ChatMessage]:
    return [ChatMessage(*message) if len(message) == 2 else
            ChatMessage(message[0], message[1], message[2], tuple(map(tuple, message[3])),
                        tuple(message[4]) if message[4] is not None else None, message[5])
            for message in fields]


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, EngineDead):
        return "dead"
    if isinstance(exc, RequestFailed):
        return "failed"
    if isinstance(exc, ValueError):
        return "invalid"
    return "bug"


def raise_error(kind: str, message: str):
    if kind == "dead":
        raise EngineDead(message)
    if kind == "failed":
        raise RequestFailed(message)
    if kind == "invalid":
        raise ValueError(message)
    raise RuntimeError(f"the engine process failed: {message}")


class FrameProtocol(asyncio.Protocol):
    """Newline-delimited JSON frames over a stream transport; `send` gathers frames until the
    loop next runs, and writes them at once."""

    def __init__(self, on_frame: Callable[[list], None], on_lost: Callable[[Exception | None], None]):
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._buffer = bytearray()
        self._pending: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.rfind(b"\n")
        if end < 0:
            if len(self._buffer) > MAX_FRAME_BYTES:
                self.transport.close()
            return
        complete = bytes(self._buffer[:end])
        del self._buffer[:end + 1]
        for line in complete.split(b"\n"):
            try:
                frame = orjson.loads(line)
            except orjson.JSONDecodeError:
                self.transport.close()  # a peer that speaks something else: nothing it says can be trusted
                return
            self._on_frame(frame)

    def send(self, frame: list) -> None:
        if self.closed:
            return
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(orjson.dumps(frame))

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self.closed:
            self.transport.write(b"\n".join(pending) + b"\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pending = []
        self._on_lost(exc)
