"""The pure builders: the hot path for plain text gives exactly the events of the general one."""

from parley.service.events import ResponseBuilder, Sequencer


def document() -> dict:
    return {"id": "resp_1", "status": "in_progress", "output": []}


def test_a_step_of_plain_deltas_equals_the_deltas_one_by_one(monkeypatch):
    ids = iter(["msg_1", "msg_2"])
    monkeypatch.setattr("parley.service.events.new_id", lambda prefix: next(ids))
    general, fast = ResponseBuilder(document()), ResponseBuilder(document())
    one_by_one = general.text_delta("Hel") + general.text_delta("lo") + general.text_delta(" there")
    ids = iter(["msg_1", "msg_2"])
    together = fast.text_deltas(["Hel", "lo"]) + fast.text_deltas([" there"])
    assert together == one_by_one
    assert [e["type"] for e in together] == ["response.output_item.added", "response.content_part.added"] + \
        ["response.output_text.delta"] * 3
    monkeypatch.setattr("parley.service.events.time.time", lambda: 1_800_000_000)  # completed_at must not tick
    assert fast.finish("stop", 3, 3, 0, 0) == general.finish("stop", 3, 3, 0, 0)
    assert fast.response["output"][0]["content"][0]["text"] == "Hello there"


def test_sequence_numbers_continue_across_batches_from_zero():
    sequencer = Sequencer()
    first, second = [{}, {}, {}], [{}, {}]
    assert sequencer.stamp(first) == 0 and sequencer.stamp([]) == 3 and sequencer.stamp(second) == 3
    assert [e["sequence_number"] for e in first + second] == [0, 1, 2, 3, 4]
