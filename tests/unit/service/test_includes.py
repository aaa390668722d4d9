import pytest
from parley.errors import ApiError
from parley.service.includes import shape_stored
from parley.service.sealing import Sealer

LOGPROBS = [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}]


def stored() -> dict:
    return {"output": [
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hmm"}],
         "encrypted_content": "sealed"},
        {"type": "message", "id": "msg_1", "role": "assistant",
         "content": [{"type": "output_text", "text": "Hi", "annotations": [], "logprobs": LOGPROBS}]},
    ]}


def test_a_read_without_include_leaves_the_optional_parts_out():
    document = shape_stored(stored(), [], None)
    assert "encrypted_content" not in document["output"][0]
    assert document["output"][1]["content"][0]["logprobs"] == []


def test_a_read_with_include_returns_them_sealing_reasoning_on_the_way_out():
    sealer = Sealer(b"k" * 32)
    document = stored()
    del document["output"][0]["encrypted_content"]
    shaped = shape_stored(document, ["reasoning.encrypted_content", "message.output_text.logprobs"], sealer)
    assert sealer.open(shaped["output"][0]["encrypted_content"], "x") == [{"type": "reasoning_text", "text": "hmm"}]
    assert shaped["output"][1]["content"][0]["logprobs"] == LOGPROBS


@pytest.mark.parametrize("include, param", [(["nope"], "include[0]"), (["reasoning.encrypted_content"], "include")])
def test_an_include_that_cannot_be_honoured_is_a_400_naming_it(include, param):
    with pytest.raises(ApiError) as caught:
        shape_stored(stored(), include, None)
    assert caught.value.kind.http_status == 400 and caught.value.param == param
