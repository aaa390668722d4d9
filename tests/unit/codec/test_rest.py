import orjson
import pytest
from parley.codec import rest
from parley.errors import ApiError


def test_sse_framing_is_event_line_then_data_line():
    frame = rest.encode_sse([{"type": "response.output_text.delta", "delta": "é\n", "sequence_number": 3}])
    head, data, end = frame.split(b"\n", 2)
    assert head == b"event: response.output_text.delta"
    assert orjson.loads(data.removeprefix(b"data: ")) == {"type": "response.output_text.delta", "delta": "é\n",
                                                          "sequence_number": 3}
    assert end == b"\n"


def test_events_sent_together_stay_separate_frames_and_reuse_their_encoding():
    events = [{"type": "response.created", "sequence_number": 0}, {"type": "response.in_progress", "sequence_number": 1},
              {"type": "response.created", "sequence_number": 2}]
    encoded = [b'{"pre":"encoded","n":%d}' % n for n in range(3)]
    assert rest.encode_sse(events, encoded) == (b'event: response.created\ndata: {"pre":"encoded","n":0}\n\n'
                                                b'event: response.in_progress\ndata: {"pre":"encoded","n":1}\n\n'
                                                b'event: response.created\ndata: {"pre":"encoded","n":2}\n\n')
    assert rest.encode_sse([]) == b""
    with pytest.raises(ValueError):  # an event without its bytes is a bug, never a short stream
        rest.encode_sse(events, encoded[:2])


@pytest.mark.parametrize("body", [b"", b"   ", b"{", b"{'a': 1}", b"\xff\xfe"])
def test_malformed_bodies_are_400_invalid_json(body):
    with pytest.raises(ApiError) as info:
        rest.decode_body(body)
    assert info.value.kind.http_status == 400 and info.value.code == "invalid_json"


def test_json_keeps_nulls_and_numbers():
    assert rest.encode_json({"a": None, "b": 1, "c": 1.5}) == b'{"a":null,"b":1,"c":1.5}'


def _frames(data: bytes) -> list[dict]:
    return [orjson.loads(line[6:]) for line in data.split(b"\n") if line.startswith(b"data: ")]


def test_obfuscation_pads_delta_events_to_a_block_and_nothing_else():
    delta = {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0,
             "delta": "Hello", "logprobs": [], "sequence_number": 3}
    done = {"type": "response.output_text.done", "item_id": "msg_1", "output_index": 0, "content_index": 0,
            "text": "Hello", "logprobs": [], "sequence_number": 4}
    padded, plain = _frames(rest.encode_sse([delta, done], obfuscate=True))
    assert padded.pop("obfuscation") and padded == delta and plain == done
    for text in ("", "a", "ab" * 40, "é"):
        data = rest.obfuscated(orjson.dumps({**delta, "delta": text}))
        assert len(data) % rest.OBFUSCATION_BLOCK == 0
        assert orjson.loads(data)["delta"] == text
    assert "obfuscation" not in _frames(rest.encode_sse([delta]))[0]
