"""BodyIntake: one-message bodies pass at once; large ones take turns and stay under the limit."""

import asyncio

import pytest
from google.api import httpbody_pb2
from parley.errors import ApiError, ErrorKind
from parley.transport.intake import BodyIntake


async def messages(*chunks: bytes, content_type: str = "application/json", gate: asyncio.Event | None = None):
    for index, chunk in enumerate(chunks):
        if index and gate is not None:
            await gate.wait()
        yield httpbody_pb2.HttpBody(content_type=content_type if index == 0 else "", data=chunk)


async def read(intake: BodyIntake, stream) -> tuple[bytes, str]:
    async with intake.body(stream) as (data, content_type):
        return bytes(data), content_type


async def test_a_body_of_one_message_is_read_as_it_is():
    assert await read(BodyIntake(1024, 1), messages(b'{"a": 1}')) == (b'{"a": 1}', "application/json")


async def test_no_message_at_all_is_an_empty_body_without_a_content_type():
    assert await read(BodyIntake(1024, 1), messages()) == (b"", "")


async def test_a_body_of_several_messages_is_joined_with_the_first_ones_content_type():
    assert await read(BodyIntake(1024, 1), messages(b'{"a"', b": ", b"1}")) == (b'{"a": 1}', "application/json")


@pytest.mark.parametrize("chunks", [(b"x" * 1025,), (b"x" * 600, b"x" * 600)])
async def test_a_body_over_the_limit_is_a_413(chunks):
    with pytest.raises(ApiError) as refused:
        await read(BodyIntake(1024, 1), messages(*chunks))
    assert refused.value.kind is ErrorKind.TOO_LARGE and refused.value.kind.http_status == 413
    assert refused.value.code == "request_too_large"


async def test_large_bodies_take_turns_while_small_ones_pass():
    intake = BodyIntake(1 << 20, 1)
    first_holds = asyncio.Event()
    release_first = asyncio.Event()

    async def hold_first():
        async with intake.body(messages(b"a", b"b")) as (data, _):
            first_holds.set()
            await release_first.wait()
            return bytes(data)

    first = asyncio.create_task(hold_first())
    await first_holds.wait()
    second_gate = asyncio.Event()
    second = asyncio.create_task(read(intake, messages(b"c", b"d", gate=second_gate)))
    second_gate.set()
    assert await read(intake, messages(b"small")) == (b"small", "application/json")  # not behind the large
    await asyncio.sleep(0.05)
    assert not second.done()  # its second message waits for the first large body's turn to end
    release_first.set()
    assert await first == b"ab"
    assert await second == (b"cd", "application/json")
