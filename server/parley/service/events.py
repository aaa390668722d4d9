"""Pure builders of Response objects and stream events.

ResponseBuilder owns the response document as it grows and returns the OpenAI events for each
step; it does no I/O. Sequencer is the one place that assigns `sequence_number`.
"""

from __future__ import annotations

import time

import orjson

from parley.ids import new_id
from parley.service.tools import CustomInputDecoder, split_name
from parley.service.validation import CreateParams


def json_copy(document):
    """A deep copy of a JSON document; a round trip through orjson is several times faster than
    copy.deepcopy, and every snapshot of a response goes through here."""
    return orjson.loads(orjson.dumps(document))


def new_response(params: CreateParams, response_id: str, created_at: int) -> dict:
    """The Response document at creation, every field OpenAI prints present (null where unset)."""
    document = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "queued" if params.background else "in_progress",
        "background": params.background,
        "completed_at": None,
        "error": None,
        "frequency_penalty": params.frequency_penalty,
        "incomplete_details": None,
        "instructions": params.instructions,
        "max_output_tokens": params.max_output_tokens,
        "max_tool_calls": params.echo["max_tool_calls"],
        "model": params.model,
        "output": [],
        "parallel_tool_calls": params.parallel_tool_calls,
        "presence_penalty": params.presence_penalty,
        "previous_response_id": params.previous_response_id,
        "prompt_cache_key": params.echo["prompt_cache_key"],
        "prompt_cache_retention": params.echo["prompt_cache_retention"],
        "reasoning": params.reasoning or {"effort": None, "summary": None},
        "safety_identifier": params.echo["safety_identifier"],
        "service_tier": params.echo["service_tier"],
        "store": params.store,
        "temperature": params.temperature,
        "text": params.text,
        "tool_choice": params.tool_choice,
        "tools": params.tools,
        "top_logprobs": params.top_logprobs if params.top_logprobs is not None else 0,
        "top_p": params.top_p,
        "truncation": params.truncation,
        "usage": None,
        "user": params.echo["user"],
        "metadata": params.metadata,
    }
    if params.conversation_id is not None:
        document["conversation"] = {"id": params.conversation_id}
    if params.client_metadata:  # not an OpenAI field: present only when the client sent it
        document["client_metadata"] = params.client_metadata
    return document


class Sequencer:
    """Assigns strictly increasing sequence numbers, from 0, in emission order."""

    def __init__(self) -> None:
        self.next = 0

    def stamp(self, events: list[dict]) -> int:
        """Number `events` in order; return the first number given."""
        first = self.next
        for number, event in enumerate(events, first):
            event["sequence_number"] = number
        self.next = first + len(events)
        return first

    def withdraw(self, events: list[dict]) -> None:
        """`events`, the last stamped, were neither sent nor stored: what comes next takes their
        numbers, so that a client still sees no gap."""
        if events and events[-1]["sequence_number"] == self.next - 1:
            self.next = events[0]["sequence_number"]


def _delta_logprobs(logprobs) -> list[dict]:
    return [{"token": lp.token, "logprob": lp.logprob,
             "top_logprobs": [{"token": t, "logprob": p} for t, p, _ in lp.top]} for lp in logprobs]


def _part_logprobs(logprobs) -> list[dict]:
    return [{"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.bytes),
             "top_logprobs": [{"token": t, "logprob": p, "bytes": list(b)} for t, p, b in lp.top]}
            for lp in logprobs]


class ResponseBuilder:
    """Grows the Response document item by item and returns the events for each step.

    At most one item is open at a time; a segment of another kind closes it first. Items are
    opened lazily, so a reply made only of tool calls has no empty message in it.
    """

    def __init__(self, response: dict, logprobs: bool = False, seal=None, custom_tools: frozenset[str] = frozenset()):
        self.response = response
        self.logprobs = logprobs
        self.seal = seal  # callable sealing reasoning content, when encrypted content is requested
        self.custom_tools = custom_tools  # calls of these are custom_tool_call items (free-form input)
        self._custom_input: CustomInputDecoder | None = None
        self._item: dict | None = None
        self._parts: list[str] = []
        self._part_logprobs: list = []

    def _lifecycle(self, kind: str) -> dict:
        return {"type": kind, "response": json_copy(self.response)}

    @property
    def _index(self) -> int:
        return len(self.response["output"]) - 1

    def created(self) -> list[dict]:
        """`response.created`, then `queued` (background) or `in_progress` (foreground)."""
        if self.response["status"] == "queued":
            return [self._lifecycle("response.created"), self._lifecycle("response.queued")]
        return [self._lifecycle("response.created"), self._lifecycle("response.in_progress")]

    def started(self) -> list[dict]:
        """A queued (background) response got its generation slot."""
        if self.response["status"] != "queued":
            return []
        self.response["status"] = "in_progress"
        return [self._lifecycle("response.in_progress")]

    def _open(self, item: dict, part: dict | None) -> list[dict]:
        self._item = item
        self._parts, self._part_logprobs = [], []
        self.response["output"].append(item)
        events = [{"type": "response.output_item.added", "output_index": self._index, "item": json_copy(item)}]
        if part is not None:
            events.append({"type": "response.content_part.added", "item_id": item["id"], "output_index": self._index,
                           "content_index": 0, "part": part})
        return events

    def _ensure(self, kind: str) -> list[dict]:
        if self._item is not None and self._item["type"] == kind:
            return []
        events = self.close("completed")
        if kind == "message":
            item = {"id": new_id("msg"), "type": "message", "status": "in_progress", "content": [], "role": "assistant"}
            part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
        else:
            item = {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        return events + self._open(item, part)

    def text_delta(self, text: str, logprobs=()) -> list[dict]:
        events = self.text_deltas([text])
        if self.logprobs and logprobs:
            self._part_logprobs.extend(logprobs)
            events[-1]["logprobs"] = _delta_logprobs(logprobs)
        return events

    def text_deltas(self, texts: list[str]) -> list[dict]:
        """The events of several plain text deltas at once (no logprobs): the hot path."""
        events = self._ensure("message")
        self._parts += texts
        item_id, index = self._item["id"], self._index
        events += [{"type": "response.output_text.delta", "item_id": item_id, "output_index": index,
                    "content_index": 0, "delta": text, "logprobs": []} for text in texts]
        return events

    def reasoning_delta(self, text: str) -> list[dict]:
        events = self._ensure("reasoning")
        self._parts.append(text)
        events.append({"type": "response.reasoning_text.delta", "item_id": self._item["id"],
                       "output_index": self._index, "content_index": 0, "delta": text})
        return events

    def add_item(self, item: dict) -> list[dict]:
        """A finished item added whole (a compaction item): its added and done events."""
        events = self.close("completed")
        events += self._open(item, None)
        self._item = None
        return events + [{"type": "response.output_item.done", "output_index": self._index, "item": json_copy(item)}]

    def call_start(self, name: str) -> list[dict]:
        """A call as the model wrote it: a namespaced function (`ns.name`) comes back with its
        `namespace`."""
        events = self.close("completed")
        if name in self.custom_tools:
            self._custom_input = CustomInputDecoder()
            item = {"id": new_id("ctc"), "type": "custom_tool_call", "call_id": new_id("call"), "name": name,
                    "input": ""}
            return events + self._open(item, None)
        namespace, name = split_name(name)
        item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress", "arguments": "",
                "call_id": new_id("call"), "name": name}
        if namespace is not None:
            item["namespace"] = namespace
        return events + self._open(item, None)

    def call_arguments(self, delta: str) -> list[dict]:
        self._parts.append(delta)
        if self._item["type"] == "custom_tool_call":  # the arguments' JSON is `{"input": "..."}`: its text
            text = self._custom_input.feed(delta)
            return [{"type": "response.custom_tool_call_input.delta", "item_id": self._item["id"],
                     "output_index": self._index, "delta": text}] if text else []
        return [{"type": "response.function_call_arguments.delta", "item_id": self._item["id"],
                 "output_index": self._index, "delta": delta}]

    def close(self, status: str) -> list[dict]:
        """Finish the open item, if any, with `status` (completed, or incomplete when cut off)."""
        item = self._item
        if item is None:
            return []
        self._item = None
        text = "".join(self._parts)
        index = self.response["output"].index(item)
        base = {"item_id": item["id"], "output_index": index}
        if item["type"] == "custom_tool_call":  # OpenAI's custom call has no status
            item["input"] = self._custom_input.value
            self._custom_input = None
            return [{"type": "response.custom_tool_call_input.done", **base, "input": item["input"]},
                    {"type": "response.output_item.done", "output_index": index, "item": json_copy(item)}]
        item["status"] = status
        if item["type"] == "function_call":
            item["arguments"] = text
            events = [{"type": "response.function_call_arguments.done", **base, "arguments": text,
                       "name": item["name"]}]
        elif item["type"] == "message":
            part = {"type": "output_text", "annotations": [], "logprobs": _part_logprobs(self._part_logprobs),
                    "text": text}
            item["content"] = [part]
            events = [{"type": "response.output_text.done", **base, "content_index": 0, "text": text,
                       "logprobs": _delta_logprobs(self._part_logprobs)},
                      {"type": "response.content_part.done", **base, "content_index": 0, "part": json_copy(part)}]
        else:
            part = {"type": "reasoning_text", "text": text}
            item["content"] = [part]
            if self.seal is not None:
                item["encrypted_content"] = self.seal([part])
            events = [{"type": "response.reasoning_text.done", **base, "content_index": 0, "text": text},
                      {"type": "response.content_part.done", **base, "content_index": 0, "part": json_copy(part)}]
        return events + [{"type": "response.output_item.done", "output_index": index, "item": json_copy(item)}]

    def finish(self, reason: str, input_tokens: int, output_tokens: int, cached_tokens: int,
               cache_write_tokens: int, reasoning_tokens: int = 0, generated: bool = True) -> list[dict]:
        """`generated` False: a warm-up (nothing was asked for, so no empty message either)."""
        events = self.close("incomplete" if reason == "length" else "completed")
        if not self.response["output"] and generated:  # nothing generated: still an (empty) assistant message
            events += self._ensure("message") + self.close("incomplete" if reason == "length" else "completed")
        self.response["usage"] = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": cache_write_tokens},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": input_tokens + output_tokens,
        }
        if reason == "length":
            self.response["status"] = "incomplete"
            self.response["incomplete_details"] = {"reason": "max_output_tokens"}
            return events + [self._lifecycle("response.incomplete")]
        self.response["status"] = "completed"
        self.response["completed_at"] = int(time.time())
        return events + [self._lifecycle("response.completed")]

    def fail(self, code: str, message: str) -> list[dict]:
        events = self.close("incomplete")
        self.response["status"] = "failed"
        self.response["error"] = {"code": code, "message": message}
        return [*events, self._lifecycle("response.failed")]

    def cancel(self) -> None:
        """The client went away or cancelled: no event can reach it, only the document changes."""
        self.close("incomplete")
        self.response["status"] = "cancelled"


LEASE_EXPIRED = ("The server generating this response stopped before it finished (its lease expired); "
                 "retry the request.")


def error_event(code: str, message: str, param: str | None = None) -> dict:
    """The stream's `error` event (sequence number stamped by the stream): a failure that is not
    the response's own outcome."""
    return {"type": "error", "code": code, "message": message, "param": param}


UNACKNOWLEDGED_MESSAGE = ("The response finished, but it could not be stored, so its outcome was not sent. Retrieving "
                          "it later shows it failed.")


def expired_lease_failure(response: dict, sequence_number: int) -> tuple[dict, dict]:
    """The stored document and final event for a response whose replica died mid-generation."""
    response = json_copy(response)
    response["status"] = "failed"
    response["error"] = {"code": "server_error", "message": LEASE_EXPIRED}
    for item in response["output"]:
        if item.get("status") == "in_progress":
            item["status"] = "incomplete"
    event = {"type": "response.failed", "response": json_copy(response), "sequence_number": sequence_number}
    return response, event
