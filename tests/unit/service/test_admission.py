"""Admission: a queue per project, slots handed out in turns, a cap per project."""

import asyncio

import pytest
from parley.errors import ApiError
from parley.service.admission import Admission


async def test_a_free_slot_is_taken_at_once():
    admission = Admission(1, 4)
    ticket = admission.enter("a")
    await ticket.start()
    assert (admission.running, admission.waiting) == (1, 0)
    ticket.release()
    ticket.release()  # idempotent
    assert (admission.running, admission.waiting) == (0, 0)


async def test_a_flooding_project_delays_another_by_at_most_one_turn():
    admission = Admission(2, 100)
    order = []

    async def run(project: str, name: str, hold: asyncio.Event):
        ticket = admission.enter(project)
        await ticket.start()
        order.append(name)
        await hold.wait()
        ticket.release()

    holds = [asyncio.Event() for _ in range(12)]
    flood = [asyncio.create_task(run("a", f"a{i}", holds[i])) for i in range(10)]
    await asyncio.sleep(0)
    late = asyncio.create_task(run("b", "b0", holds[10]))
    await asyncio.sleep(0)
    assert order == ["a0", "a1"]
    holds[0].set()  # one slot frees: b's turn, though a has eight waiting before it
    await asyncio.sleep(0.01)
    assert order == ["a0", "a1", "b0"]
    for hold in holds:
        hold.set()
    await asyncio.gather(*flood, late)
    assert order[3:] == [f"a{i}" for i in range(2, 10)]  # a's own stay first come, first served


async def test_turns_alternate_between_projects_that_both_wait():
    admission = Admission(1, 100)
    first = admission.enter("a")
    await first.start()
    tickets = [admission.enter(p) for p in ("a", "a", "b", "b")]
    started = []

    async def start(ticket, name):
        await ticket.start()
        started.append(name)

    tasks = [asyncio.create_task(start(t, n)) for t, n in zip(tickets, ("a1", "a2", "b1", "b2"), strict=True)]
    await asyncio.sleep(0)
    running = first
    for _ in range(4):
        running.release()
        await asyncio.sleep(0)
        running = tickets[["a1", "a2", "b1", "b2"].index(started[-1])]
    running.release()
    await asyncio.gather(*tasks)
    assert started == ["b1", "a1", "b2", "a2"]  # b was served least recently, then turn by turn


async def test_each_project_has_its_own_cap():
    admission = Admission(1, 1)
    admission.enter("a")
    admission.enter("a")
    with pytest.raises(ApiError) as refused:
        admission.enter("a")
    assert refused.value.kind.http_status == 429 and refused.value.code == "server_busy"
    admission.enter("b")  # a's flood does not shut b out


async def test_a_ticket_released_while_queued_ends_its_wait_and_frees_nothing():
    admission = Admission(1, 4)
    running = admission.enter("a")
    await running.start()
    queued = admission.enter("b")
    waiter = asyncio.create_task(queued.start())
    await asyncio.sleep(0)
    queued.release()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    running.release()
    assert (admission.running, admission.waiting) == (0, 0)


async def test_a_waiter_cancelled_as_it_is_handed_the_slot_passes_it_on():
    admission = Admission(1, 4)
    running = admission.enter("a")
    await running.start()
    cancelled, next_in_line = admission.enter("b"), admission.enter("c")
    waiter = asyncio.create_task(cancelled.start())
    other = asyncio.create_task(next_in_line.start())
    await asyncio.sleep(0)
    running.release()  # hands the slot to b ...
    waiter.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.wait_for(other, 1)  # c got the slot
    assert admission.running == 1
