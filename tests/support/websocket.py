"""A WebSocket-mode client for tests: every event it receives is checked against both specs
(skipped, as the REST conformance tests are, where shared/ is absent)."""

from __future__ import annotations

import asyncio
import contextlib

import orjson
from websockets.asyncio.client import ClientConnection, connect

from tests.support import openapi

TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


def websocket_url(base_url: str) -> str:
    """`http://host:port/v1` (Envoy's REST base) -> `ws://host:port/v1/responses`."""
    return base_url.replace("http://", "ws://", 1) + "/responses"


def check_both_specs(event: dict) -> None:
    """One server event against OpenAI's `ResponsesServerEvent` and the Open Responses schema of
    its type (`WebSocketErrorEvent` for the error envelope)."""
    if openapi.SPEC_PATH.is_file():
        openapi.validate("ResponseWsError" if event["type"] == "error" else "ResponsesServerEvent", event)
    if openapi.OPEN_RESPONSES_PATH.is_file():
        schema = ("WebSocketErrorEvent" if event["type"] == "error"
                  else openapi.open_responses_event_schema(event["type"]))
        if schema is not None:
            openapi.validate_open_responses(schema, event)


class Socket:
    """One WebSocket-mode connection."""

    def __init__(self, connection: ClientConnection):
        self.connection = connection
        self.received: list[dict] = []

    async def send(self, **message) -> None:
        await self.connection.send(orjson.dumps({"type": "response.create", **message}).decode())

    async def send_raw(self, data: str | bytes) -> None:
        await self.connection.send(data)

    async def next(self, timeout: float = 60) -> dict:
        event = orjson.loads(await asyncio.wait_for(self.connection.recv(), timeout))
        check_both_specs(event)
        self.received.append(event)
        return event

    async def turn(self, timeout: float = 60, **message) -> list[dict]:
        """Send one create and return its events, up to its terminal event or error envelope."""
        await self.send(**message)
        return await self.until_done(timeout)

    async def until_done(self, timeout: float = 60) -> list[dict]:
        events = []
        while True:
            event = await self.next(timeout)
            events.append(event)
            if event["type"] in TERMINAL or event["type"] == "error":
                return events


@contextlib.asynccontextmanager
async def open_socket(base_url: str, api_key: str | None = None, headers: dict | None = None, **options):
    headers = {**(headers or {}), **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    async with connect(websocket_url(base_url), additional_headers=headers, **options) as connection:
        yield Socket(connection)
