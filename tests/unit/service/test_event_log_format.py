"""How events are stored: a run of plain text deltas is one compact line that replays as exactly
the events that were streamed, from any point."""

import orjson
from parley.engine.synthetic import SyntheticEngine
from parley.service.event_log import decode_rows, text_run_line
from parley.service.events import ResponseBuilder, Sequencer

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
