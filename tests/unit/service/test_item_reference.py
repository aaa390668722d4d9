"""item_reference input items (Open Responses' ItemReferenceParam) resolve to the stored item."""

import pytest
from parley.errors import ApiError

from tests.fakes.engines import ScriptedEngine
from tests.support.pipeline import service_on

MODEL = "scripted"


@pytest.fixture
async def service(tmp_path):
    engine = ScriptedEngine(model_id=MODEL, context_window=4096, script=["The answer is 42."])
    async with service_on(tmp_path / "p.sqlite3", engine) as service:
        yield service


async def test_a_reference_brings_the_stored_item_into_the_prompt_and_the_input(service):
    first = await service.create("default", {"model": MODEL, "input": "What is the answer?"})
    answer = first["output"][0]
    question = (await service.store.input_items(first["id"], "default"))[0]
    second = await service.create("default", {"model": MODEL, "input": [
        {"type": "item_reference", "id": question["id"]}, {"id": answer["id"]},  # `type` may be left out
        {"role": "user", "content": "Say it again."}]})
    prompt = service.engine.prompts[-1]
    assert [(m.role, m.content) for m in prompt] == [
        ("user", "What is the answer?"), ("assistant", "The answer is 42."), ("user", "Say it again.")]
    stored = await service.store.input_items(second["id"], "default")
    assert stored[:2] == [question, answer]


async def test_a_reference_to_nothing_or_to_another_project_is_404_and_stores_nothing(service):
    first = await service.create("default", {"model": MODEL, "input": "x"})
    for project, item_id in (("default", "msg_missing"), ("other", first["output"][0]["id"])):
        with pytest.raises(ApiError) as caught:
            await service.create(project, {"model": MODEL, "input": [{"type": "item_reference", "id": item_id}]})
        assert caught.value.kind.http_status == 404 and caught.value.param == "input[0].id"
    assert len(service.engine.prompts) == 1


@pytest.mark.parametrize("item, param", [({"type": "item_reference"}, "input[0].id"),
                                         ({"type": "item_reference", "id": 7}, "input[0].id"),
                                         ({"type": "item_reference", "id": "x", "extra": 1}, "input[0].extra")])
async def test_a_malformed_reference_is_a_400_naming_the_field(service, item, param):
    with pytest.raises(ApiError) as caught:
        await service.create("default", {"model": MODEL, "input": [item]})
    assert caught.value.kind.http_status == 400 and caught.value.param == param
