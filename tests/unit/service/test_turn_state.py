"""A chain's kept state (service/turn_state.py): a continuation built from it gets exactly the
prompt that reading the chain from the store and rendering it whole gives, turn after turn; it
reads no store but one lookup; and a deletion anywhere in the chain, on any replica, is seen."""

import random

import pytest
from parley import metrics
from parley.engine.base import ChatMessage
from parley.errors import ApiError
from parley.service.responses import ResponsesService
from parley.store.sqlite import SqliteStore

from tests.fakes.engines import ScriptedEngine
from tests.support.pipeline import service_on

TOOLS = [{"type": "function", "name": "add", "description": "Add two numbers.",
          "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}]
ROLES = ["user", "user", "developer"]
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'


def hits() -> float:
    return metrics.TURN_STATES.labels("hit")._value.get()


class Twins:
    """The same conversation on two services: one keeps states, one (context_cache_bytes=0)
    reads every chain from its store and renders it whole."""

    def __init__(self, kept: ResponsesService, whole: ResponsesService):
        self.services = (kept, whole)
        self.previous: list[str | None] = [None, None]
        self.conversations: list[str] | None = None  # set: the turns go on in these, not by chain

    async def in_conversations(self):
        self.conversations = [(await service.conversations.create("default", {}))["id"] for service in self.services]

    async def turn(self, script: list[str], body_for) -> list[dict]:
        responses = []
        for index, service in enumerate(self.services):
            service.engine.upcoming = [script]
            body = {"model": "scripted", **body_for(index)}
            if self.conversations:
                body["conversation"] = self.conversations[index]
            elif self.previous[index]:
                body["previous_response_id"] = self.previous[index]
            response = await service.create("default", body)
            self.previous[index] = response["id"]
            responses.append(response)
        kept, whole = (service.engine.last_prompt for service in self.services)
        assert kept == whole
        assert responses[0]["usage"]["input_tokens"] == responses[1]["usage"]["input_tokens"]
        return responses


@pytest.fixture(params=[4096, 160], ids=["fits", "truncated"])
async def twins(tmp_path, request):
    window = request.param
    async with service_on(tmp_path / "kept.sqlite3", ScriptedEngine(context_window=window, by_message=True)) as kept, \
            service_on(tmp_path / "whole.sqlite3", ScriptedEngine(context_window=window),
                       context_cache_bytes=0) as whole:
        yield Twins(kept, whole)


@pytest.mark.parametrize("mode", ["chain", "conversation"])
async def test_a_continuation_from_a_kept_state_is_the_prompt_rendered_whole(twins, mode):
    if mode == "conversation":
        await twins.in_conversations()
    rng = random.Random(3)
    before = hits()
    responses = None
    for turn in range(40):
        kind = rng.choice(["text", "call", "text", "reasoning"])
        instructions = rng.choice([None, "Be brief.", "Answer in French."])
        calls = [next((item for item in r["output"] if item["type"] == "function_call"), None)
                 for r in responses] if responses else [None, None]

        def body_for(index, calls=calls, instructions=instructions, turn=turn, kind=kind):
            items = []
            if calls[index] is not None:  # answer the call the last turn made
                items.append({"type": "function_call_output", "call_id": calls[index]["call_id"], "output": "2"})
            if kind == "reasoning":
                items.append({"type": "reasoning", "summary": [{"type": "summary_text", "text": "thinking"}]})
            items.append({"type": "message", "role": ROLES[turn % 3], "content": f"turn {turn} " + "word " * (turn % 7)})
            body = {"input": items, "tools": TOOLS, "truncation": "auto", "max_output_tokens": 16}
            if instructions:
                body["instructions"] = instructions
            return body
        script = [CALL] if kind == "call" else ["Sure", ",", " done."]
        responses = await twins.turn(script, body_for)
    assert hits() - before >= 30  # nearly every turn continued from a kept state


async def test_a_kept_turn_reads_one_lookup_not_its_chain(tmp_path):
    async with service_on(tmp_path / "s.sqlite3", ScriptedEngine(by_message=True)) as service:
        first = await service.create("default", {"model": "scripted", "input": "one"})
        reads = []
        original = service.store.chain_context
        service.store.chain_context = lambda *a: reads.append(a) or original(*a)
        await service.create("default", {"model": "scripted", "input": "two", "previous_response_id": first["id"]})
        assert reads == []


async def test_a_deletion_on_another_replica_breaks_the_kept_chain(tmp_path):
    """Two replicas on one store: the one that keeps the chain sees the other's deletion of a
    response in the middle of it, and refuses the continuation as the store would."""
    path = tmp_path / "shared.sqlite3"
    async with service_on(path, ScriptedEngine(by_message=True)) as keeper:
        other_store = SqliteStore(path)
        await other_store.open()
        try:
            other = ResponsesService(ScriptedEngine(), other_store)
            ids, previous = [], None
            for text in ("one", "two", "three"):
                body = {"model": "scripted", "input": text, **({"previous_response_id": previous} if previous else {})}
                previous = (await keeper.create("default", body))["id"]
                ids.append(previous)
            await other.delete("default", ids[1])
            with pytest.raises(ApiError) as refused:
                await keeper.create("default", {"model": "scripted", "input": "four", "previous_response_id": ids[2]})
            assert refused.value.code == "previous_response_not_found" and ids[1] in refused.value.message
            await other.drain()
        finally:
            await other_store.close()


async def test_states_stay_within_their_memory_and_one_per_chain(tmp_path):
    async with service_on(tmp_path / "s.sqlite3", ScriptedEngine(context_window=1 << 16, by_message=True),
                          context_cache_bytes=64 * 1024) as service:
        previous = None
        for turn in range(30):
            body = {"model": "scripted", "input": f"turn {turn} " + "word " * 200}
            if previous:
                body["previous_response_id"] = previous
            previous = (await service.create("default", body))["id"]
        states = service.turn_states
        assert len(states) <= 1 and states._bytes <= 64 * 1024
        # The chain outgrew the budget: its turns go on, read from the store.
        reply = await service.create("default", {"model": "scripted", "input": "more", "previous_response_id": previous})
        assert reply["status"] == "completed"


async def test_items_added_to_a_conversation_elsewhere_reach_the_next_turn(twins):
    """The items API changes the conversation's revision: the kept state is not used, and the
    next prompt has the added item, as rendering the stored conversation whole has."""
    await twins.in_conversations()
    body = {"input": "hello", "max_output_tokens": 16}
    await twins.turn(["Hi", "."], lambda index: body)
    await twins.turn(["Hi", "."], lambda index: body)
    for service, conversation in zip(twins.services, twins.conversations, strict=True):
        added = {"items": [{"type": "message", "role": "user", "content": "remember the number 42"}]}
        await service.conversations.add_items("default", conversation, added, [])
    before = hits()
    await twins.turn(["Noted", "."], lambda index: body)
    assert hits() == before  # the state was of an older revision
    assert any(word == engine_word("42") for word in twins.services[0].engine.last_prompt)
    await twins.turn(["Noted", "."], lambda index: body)
    assert hits() == before + 1  # ... and the turn after it continues from a state again


def engine_word(word: str) -> int:
    from parley.engine.scripted import ScriptedEngine as Engine
    return Engine.render_message(ChatMessage("user", word), False)[1]


async def test_another_projects_continuation_of_a_kept_response_is_not_found(tmp_path):
    async with service_on(tmp_path / "s.sqlite3", ScriptedEngine(by_message=True)) as service:
        first = await service.create("alpha", {"model": "scripted", "input": "secret plan"})
        with pytest.raises(ApiError) as refused:
            await service.create("beta", {"model": "scripted", "input": "and?", "previous_response_id": first["id"]})
        assert refused.value.code == "previous_response_not_found"
        assert len(service.turn_states) == 1  # alpha's, untouched


async def test_written_behind_a_kept_chain_goes_on_from_its_state(tmp_path):
    from parley.service.event_log import WritePolicy

    async with service_on(tmp_path / "s.sqlite3", ScriptedEngine(by_message=True),
                          write_policy=WritePolicy(acknowledge_durably=False)) as service:
        previous, before = None, hits()
        for text in ("one", "two", "three"):  # streamed: the next turn comes while the writes are behind
            body = {"model": "scripted", "input": text, "stream": True,
                    **({"previous_response_id": previous} if previous else {})}
            prepared = await service.prepare("default", body)
            [event async for batch in service.run(prepared) for event in batch]
            previous = prepared.response["id"]
        assert hits() - before == 2
