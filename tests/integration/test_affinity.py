"""Cache affinity: two replicas on one PostgreSQL behind one Envoy. With affinity on, every turn
of a conversation reaches the same replica (the one holding its KV-cache prefix), whether it is
keyed by prompt_cache_key, a conversation, or a previous_response_id chain; a replica that
goes down hands its conversations to the other, and its WebSocket upgrades too. Off, requests go
round robin."""

import asyncio
import contextlib
import re

import httpx
import pytest
from openai import AsyncOpenAI

from tests.support import postgres
from tests.support.processes import ServerProcess
from tests.support.stack import envoy_over, free_port
from tests.support.websocket import open_socket

pytestmark = pytest.mark.integration

MODEL = "scripted"


@contextlib.asynccontextmanager
async def replicas_behind_envoy(dsn: str, affinity: bool):
    servers = [ServerProcess(store_dsn=dsn, metrics_port=free_port(), replica_id=name).start()
               for name in ("replica-a", "replica-b")]
    try:
        async with envoy_over(*(server.target for server in servers), http_affinity=affinity,
                              websockets=tuple(server.websocket_target for server in servers)) as envoy:
            yield servers, envoy
    finally:
        for server in servers:
            server.stop()


async def completed(servers) -> list[int]:
    """Responses each replica has completed so far."""
    counts = []
    async with httpx.AsyncClient() as http:
        for server in servers:
            text = (await http.get(f"http://127.0.0.1:{server.env['PARLEY_METRICS_PORT']}/metrics")).text
            found = re.search(r'^parley_responses_total\{project="default",status="completed"\} (\S+)', text, re.M)
            counts.append(int(float(found.group(1))) if found else 0)
    return counts


async def served_by(servers, turns) -> list[int]:
    """How many of the requests `turns` (an awaitable) makes each replica served."""
    before = await completed(servers)
    await turns
    after = await completed(servers)
    return [b - a for a, b in zip(before, after, strict=True)]


async def continued(client, previous: str, turns: int) -> None:
    for turn in range(turns):
        previous = (await client.responses.create(model=MODEL, input=f"turn {turn}",
                                                  previous_response_id=previous)).id


async def chain(client, turns: int) -> None:
    """A chain's first turn has no key yet (any replica); its id's tag routes the rest."""
    first = await client.responses.create(model=MODEL, input="turn 0")
    await continued(client, first.id, turns - 1)


async def conversation(client, turns: int) -> None:
    conv = await client.conversations.create()
    for turn in range(turns):
        await client.responses.create(model=MODEL, input=f"turn {turn}", conversation=conv.id)


async def keyed(client, turns: int, key: str) -> None:
    for turn in range(turns):
        await client.responses.create(model=MODEL, input=f"turn {turn}", prompt_cache_key=key)


async def test_each_conversation_stays_on_one_replica_and_moves_when_it_goes_down():
    with postgres.fresh_schema() as dsn:
        async with replicas_behind_envoy(dsn, affinity=True) as (servers, envoy):
            async with AsyncOpenAI(base_url=envoy.url, api_key="x", max_retries=0) as client:
                roots = [(await client.responses.create(model=MODEL, input="turn 0")).id for _ in range(6)]
                placements = [await served_by(servers, continued(client, root, 5)) for root in roots]
                placements += [await served_by(servers, conversation(client, 4)) for _ in range(3)]
                placements += [await served_by(servers, keyed(client, 4, f"user-{n}")) for n in range(4)]
                assert all(sorted(served) in ([0, 5], [0, 4]) for served in placements), placements
                assert {served.index(0) for served in placements} == {0, 1}, "every conversation on one replica"

                # A chain on the replica that then stops goes on, on the other.
                first = await client.responses.create(model=MODEL, input="turn 0")
                before = await completed(servers)
                second = await client.responses.create(model=MODEL, input="turn 1", previous_response_id=first.id)
                home = next(i for i, (a, b) in enumerate(zip(before, await completed(servers), strict=True)) if b > a)
                servers[home].stop()
                for _ in range(100):  # until Envoy's health checks have seen it go
                    with contextlib.suppress(Exception):
                        third = await client.responses.create(model=MODEL, input="turn 2",
                                                              previous_response_id=second.id)
                        break
                    await asyncio.sleep(0.1)
                assert third.status == "completed"
                assert third.id[5:21] == first.id[5:21]  # the chain's tag, carried by every turn


async def test_without_affinity_a_chain_goes_round_robin():
    with postgres.fresh_schema() as dsn:
        async with replicas_behind_envoy(dsn, affinity=False) as (servers, envoy):
            async with AsyncOpenAI(base_url=envoy.url, api_key="x", max_retries=0) as client:
                served = await served_by(servers, chain(client, 6))
    assert served == [3, 3]


async def one_socket_turn(base_url: str) -> bool:
    """Whether a new socket opened and ran a turn to completion."""
    try:
        async with open_socket(base_url) as socket:
            events = await socket.turn(timeout=10, type="response.create", model=MODEL, input="hello")
    except Exception:
        return False
    return events[-1]["type"] == "response.completed"


async def test_websocket_upgrades_leave_a_replica_that_is_down():
    with postgres.fresh_schema() as dsn:
        async with replicas_behind_envoy(dsn, affinity=True) as (servers, envoy):
            assert [await one_socket_turn(envoy.url) for _ in range(4)] == [True] * 4
            servers[0].stop()
            # Until Envoy's health checks of the WebSocket cluster see it go (two failed checks),
            # an upgrade may be sent to it; then every one goes to the replica that is left.
            in_a_row = 0
            for _ in range(300):
                in_a_row = in_a_row + 1 if await one_socket_turn(envoy.url) else 0
                if in_a_row == 10:
                    break
                await asyncio.sleep(0.05)
            assert in_a_row == 10
