"""How events are stored: a run of plain text deltas is one compact line, rows are deflated with
a preset dictionary, and what is stored replays as exactly the events that were streamed, from
any point."""

import hashlib
import random

import orjson
from parley.engine.synthetic import SyntheticEngine
from parley.service.events import ResponseBuilder, Sequencer
from parley.service.stored_events import (
    _ROW_DICTIONARIES,
    MIN_DEFLATED_ROW,
    decode_rows,
    pack_row,
    text_run_line,
    unpack_row,
)

from tests.support.pipeline import service_on, stream


def test_a_run_line_replays_the_same_events_and_bytes_from_any_point():
    builder = ResponseBuilder({"id": "resp_1", "status": "in_progress", "output": []})
    head = builder.created() + builder.text_deltas([])  # opens the message item
    texts = ["Hel", "lo", " é\n", '"q"']
    deltas = builder.text_deltas(texts)
    tail = builder.finish("stop", 5, 4, 0, 0)
    events = head + deltas + tail
    Sequencer().stamp(events)
    row = b"\n".join([*map(orjson.dumps, head), text_run_line(deltas[0], texts), *map(orjson.dumps, tail)])
    assert len(row.split(b"\n")) == len(head) + 1 + len(tail)
    for after in range(-1, len(events)):
        replayed = decode_rows([row], after)
        assert replayed == events[after + 1:]
        assert [orjson.dumps(event) for event in replayed] == [orjson.dumps(event) for event in events[after + 1:]]


async def test_what_a_stream_stored_replays_as_it_was_streamed(tmp_path):
    engine = SyntheticEngine(output_tokens=40)  # steps of 16 tokens: runs inside and across rows
    async with service_on(tmp_path / "s.sqlite3", engine) as service:
        streamed = await stream(service, input="hi")
        response_id = streamed[0]["response"]["id"]
        for after in (-1, 0, 3, 4, 10, 20, len(streamed) - 2):
            assert await service.events.read(response_id, after) == streamed[after + 1:]


def test_the_compact_line_is_a_fraction_of_the_full_events():
    builder = ResponseBuilder({"id": "resp_2", "status": "in_progress", "output": []})
    many = builder.text_deltas([" tok"] * 256)[2:]  # without the item-opening events
    Sequencer().stamp(many)
    full = b"\n".join(orjson.dumps(event) for event in many)
    assert len(text_run_line(many[0], [" tok"] * 256)) * 5 < len(full)


async def test_a_token_per_step_is_stored_compactly_and_replays_as_it_was_streamed(tmp_path):
    from tests.fakes.engines import ScriptedEngine

    engine = ScriptedEngine(model_id="m", script=[" tok"] * 200)  # one token per step, as a model at c1
    async with service_on(tmp_path / "s.sqlite3", engine) as service:
        streamed = await stream(service, input="hi", max_output_tokens=300)
        response_id = streamed[0]["response"]["id"]
        for after in (-1, 0, 3, 4, 5, 100, len(streamed) - 2):
            assert await service.events.read(response_id, after) == streamed[after + 1:]
        stored = sum(map(len, await service.store.event_rows(response_id)))
    full = sum(len(orjson.dumps(event)) for event in streamed)
    assert stored * 4 < full  # a line per token was 36 KB of 44 KB


async def test_text_runs_grow_only_while_pending_and_only_within_one_content_part():
    from parley.service.event_log import EventLog, WritePolicy
    from parley.service.stored_events import TextRun, unpack_row
    from parley.store.signals import LocalSignals

    written = []

    class Store:
        async def append_event_batches(self, batches, creates=(), finishes=()):
            written.extend(blob for _, runs in batches for _, _, blob in runs)

    log = EventLog(Store(), LocalSignals(), WritePolicy(interval=60, lazy_interval=60))
    stream_ = log.stream("resp_4", persist=True, background=False)
    builder = ResponseBuilder({"id": "resp_4", "status": "in_progress", "output": []})
    streamed = list(stream_.emit(builder.created()))
    for texts in (["a"], ["b", "c"], ["d"]):
        streamed += stream_.emit(builder.text_deltas(texts), plain_texts=texts)
    pending = log._pending["resp_4"]
    assert [type(run[2]) for run in pending] == [bytes, bytes, TextRun]  # created, the part's opening, one run
    assert pending[-1][2].texts == ["a", "b", "c", "d"]
    await log.flush("resp_4")  # the run is written: what follows starts a new one
    streamed += stream_.emit(builder.text_deltas(["e"]), plain_texts=["e"])
    streamed += stream_.emit(builder.reasoning_delta("r"))  # another item
    streamed += stream_.emit(builder.text_deltas(["f"]), plain_texts=["f"])  # a new message: a new run
    await log.flush("resp_4")
    assert [run[2].texts for run in log._pending.get("resp_4", []) if isinstance(run[2], TextRun)] == []
    for after in range(-1, len(streamed)):
        assert decode_rows(written, after) == streamed[after + 1:]
    assert sum(unpack_row(blob).count(b'"text_deltas"') for blob in written) == 3


def test_rows_are_deflated_when_it_pays_and_read_back_as_they_were():
    small = b'{"type":"x","sequence_number":1}'
    assert len(small) < MIN_DEFLATED_ROW and pack_row(small) == small
    row = b"\n".join(orjson.dumps({"type": "response.output_text.done", "text": "word " * 40, "sequence_number": n})
                     for n in range(3))
    packed = pack_row(row)
    assert packed[:1] == b"\x01" and len(packed) * 4 < len(row)
    assert unpack_row(packed) == row and unpack_row(row) == row  # rows stored before deflating read as before
    rng = random.Random(7)
    noise = bytes(rng.randrange(256) for _ in range(300))
    assert pack_row(noise) == noise  # deflating would make it larger


def test_no_row_dictionary_ever_changes():
    """Rows deflated with a dictionary inflate only with the very same bytes: a change to one would
    make every row written with it unreadable. Add a dictionary under a new marker instead."""
    assert {marker: hashlib.sha256(data).hexdigest()[:16] for marker, data in _ROW_DICTIONARIES.items()} == {
        1: "c845b3f29f5d41ba"}


async def test_a_response_stores_at_most_twice_its_final_json(tmp_path):
    """A 200-token answer streamed a token per step was 36 KB in the store, then 9.6 KB with text
    runs: its lifecycle events carry the response document, and the done events repeat its text."""
    from tests.fakes.engines import ScriptedEngine

    rng = random.Random(3)
    words = [" " + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 8)))
             for _ in range(200)]
    engine = ScriptedEngine(model_id="m", script=words, delay=0.002)
    async with service_on(tmp_path / "s.sqlite3", engine) as service:
        streamed = await stream(service, input="hi", max_output_tokens=300)
        response_id = streamed[0]["response"]["id"]
        rows = await service.store.event_rows(response_id)
        assert await service.events.read(response_id) == streamed
        final = len(orjson.dumps(await service.store.get(response_id)))
    assert len(rows) > 2  # written as it streamed, not in one piece
    assert sum(map(len, rows)) <= 2 * final
