import orjson
import pytest
from parley.codec import rest
from parley.errors import ApiError


def test_sse_framing_is_event_line_then_data_line():
    frame = rest.encode_sse({"type": "response.output_text.delta", "delta": "é\n", "sequence_number": 3})
    head, data, end = frame.split(b"\n", 2)
    assert head == b"event: response.output_text.delta"
    assert orjson.loads(data.removeprefix(b"data: ")) == {"type": "response.output_text.delta", "delta": "é\n",
                                                          "sequence_number": 3}
    assert end == b"\n"


@pytest.mark.parametrize("body", [b"", b"   ", b"{", b"{'a': 1}", b"\xff\xfe"])
def test_malformed_bodies_are_400_invalid_json(body):
    with pytest.raises(ApiError) as info:
        rest.decode_body(body)
    assert info.value.kind.http_status == 400 and info.value.code == "invalid_json"


def test_json_keeps_nulls_and_numbers():
    assert rest.encode_json({"a": None, "b": 1, "c": 1.5}) == b'{"a":null,"b":1,"c":1.5}'
