"""The stored form of events: what the event log writes and reads back.

A stored row holds consecutive events as JSON lines: each event's bytes as the stream sent them,
except that plain text deltas of one content part share one compact line, which `decode_rows`
expands back to the very events (and bytes) that were streamed. A row worth it is deflated with
a preset dictionary of what events repeat (keys, types, a response's default fields): the
lifecycle events each carry the response document, and the `done` events repeat the text the
deltas carried, which deflate finds again within the row.
"""

from __future__ import annotations

import zlib

import orjson

from parley.service.events import expired_lease_failure
from parley.store.base import EventRun

TEXT_DELTA = "response.output_text.delta"


def text_run_line(first: dict, texts: list[str]) -> bytes:
    """The stored line of consecutive plain text deltas (no logprobs) of one content part:
    `first` is the first of their events, `texts` their deltas. `decode_rows` expands it back to
    the very same events. Deltas are most of what a response stores, and as full events each
    repeats its type and item id around a few bytes of text."""
    return orjson.dumps({"text_deltas": texts, "item_id": first["item_id"], "output_index": first["output_index"],
                         "content_index": first["content_index"], "sequence_number": first["sequence_number"]})


class TextRun:
    """A pending run of plain text deltas of one content part, still growing: a model at its pace
    emits a token per step, and a stored line per token repeated the item id and indexes around a
    few bytes of text (36 KB for a 200-token reply, 8.5 KB merged). Encoded once, when written."""

    __slots__ = ("first", "texts")

    def __init__(self, first: dict, texts: list[str]):
        self.first = first  # the first delta event (stamped): item id, indexes, sequence number
        self.texts = texts

    @property
    def last(self) -> int:
        return self.first["sequence_number"] + len(self.texts) - 1

    def encode(self) -> bytes:
        return text_run_line(self.first, self.texts)


# Rows written with a dictionary are read with the very same bytes: never edit one. A new one
# takes a new marker byte. Deflate prefers what is nearest the dictionary's end.
_ROW_DICTIONARIES = {
    1: (b'{"type":"response.failed","response":{"id":"resp_","object":"response","created_at":'
        b'"status":"queued","background":true,"completed_at":null,"error":{"code":"server_error","message":'
        b'"incomplete_details":{"reason":"max_output_tokens"},"instructions":null,"max_output_tokens":null,'
        b'"max_tool_calls":null,"model":"","output":[],"parallel_tool_calls":true,"previous_response_id":null,'
        b'"prompt_cache_key":null,"prompt_cache_retention":null,"reasoning":{"effort":null,"summary":null},'
        b'"safety_identifier":null,"service_tier":"default","store":true,"temperature":1.0,'
        b'"text":{"format":{"type":"text"},"verbosity":"medium"},"tool_choice":"auto","tools":[],"top_logprobs":0,'
        b'"top_p":1.0,"truncation":"disabled","usage":{"input_tokens":,"input_tokens_details":{"cached_tokens":0,'
        b'"cache_write_tokens":0},"output_tokens":,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":'
        b'},"user":null,"metadata":{}},"sequence_number":\n'
        b'{"type":"response.function_call_arguments.delta","item_id":"fc_","output_index":,"delta":"\n'
        b'{"type":"response.function_call_arguments.done","item_id":"fc_","output_index":,"arguments":"\n'
        b'{"type":"response.reasoning_text.delta","item_id":"rs_","output_index":0,"content_index":0,"delta":"\n'
        b'{"type":"response.output_item.added","output_index":0,"item":{"id":"msg_","type":"message",'
        b'"status":"in_progress","content":[],"role":"assistant"},"sequence_number":\n'
        b'{"type":"response.content_part.added","item_id":"msg_","output_index":0,"content_index":0,'
        b'"part":{"type":"output_text","annotations":[],"logprobs":[],"text":""},"sequence_number":\n'
        b'{"type":"response.output_text.done","item_id":"msg_","output_index":0,"content_index":0,"text":"'
        b'","logprobs":[],"sequence_number":\n'
        b'{"type":"response.content_part.done","item_id":"msg_","output_index":0,"content_index":0,'
        b'"part":{"type":"output_text","annotations":[],"logprobs":[],"text":"\n'
        b'{"type":"response.output_item.done","output_index":0,"item":{"id":"msg_","type":"message",'
        b'"status":"completed","content":[{"type":"output_text","annotations":[],"logprobs":[],"text":"'
        b'"}],"role":"assistant"},"sequence_number":\n'
        b'{"type":"response.completed","response":{"id":"resp_","object":"response","created_at":'
        b'"status":"in_progress","background":false,"completed_at":null,"error":null,\n'
        b'{"type":"response.output_text.delta","item_id":"msg_","output_index":0,"content_index":0,"delta":"'
        b'","logprobs":[],"sequence_number":\n'
        b'{"text_deltas":["","item_id":"msg_","output_index":0,"content_index":0,"sequence_number":'),
}
_ROW_DICTIONARY = 1  # the one new rows are written with
# Smaller rows (a delta or two) are left as they are: deflating them saves a few bytes at best.
MIN_DEFLATED_ROW = 96


def pack_row(lines: bytes) -> bytes:
    """A stored row's bytes: `lines` as they are, or deflated behind its dictionary's marker byte
    when that is smaller. Plain rows start with '{', so both kinds (and rows written before
    deflating existed) read back alike."""
    if len(lines) < MIN_DEFLATED_ROW:
        return lines
    deflater = zlib.compressobj(6, zlib.DEFLATED, -15, zdict=_ROW_DICTIONARIES[_ROW_DICTIONARY])
    packed = bytes((_ROW_DICTIONARY,)) + deflater.compress(lines) + deflater.flush()
    return packed if len(packed) < len(lines) else lines


def unpack_row(row: bytes) -> bytes:
    if row[:1] == b"{":
        return row
    inflater = zlib.decompressobj(-15, zdict=_ROW_DICTIONARIES[row[0]])
    return inflater.decompress(row[1:]) + inflater.flush()


def encoded(runs: list) -> list[EventRun]:
    """A response's pending runs as the one stored row they become."""
    lines = b"\n".join(blob.encode() if isinstance(blob, TextRun) else blob for _, _, blob in runs)
    return [(runs[0][0], runs[-1][1], pack_row(lines))]


def decode_rows(rows: list[bytes], starting_after: int = -1) -> list[dict]:
    """The events stored in `rows` (in order) after sequence number `starting_after`."""
    events = []
    for row in rows:
        for line in unpack_row(row).split(b"\n"):
            event = orjson.loads(line)
            deltas = event.get("text_deltas")
            if deltas is None:
                if event["sequence_number"] > starting_after:
                    events.append(event)
                continue
            first = event["sequence_number"]
            for number in range(max(first, starting_after + 1), first + len(deltas)):
                # The key order of ResponseBuilder's delta events: replayed bytes equal streamed ones.
                events.append({"type": TEXT_DELTA, "item_id": event["item_id"], "output_index": event["output_index"],
                               "content_index": event["content_index"], "delta": deltas[number - first],
                               "logprobs": [], "sequence_number": number})
    return events


def lease_recovery(document: dict, sequence_number: int) -> tuple[dict, bytes]:
    """The store's recovery of a response whose replica died: (failed document, stored line)."""
    failed, event = expired_lease_failure(document, sequence_number)
    return failed, orjson.dumps(event)
