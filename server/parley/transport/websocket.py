"""WebSocket mode: `GET /v1/responses` upgraded, served here on an internal port that Envoy's
upgrade route forwards to (the REST port stays the one port clients use).

The handshake is the boundary: the API key is checked before the upgrade (401 with OpenAI's
error body otherwise), the path must be /v1/responses (404), and connections beyond the limit
get 503. After it, the connection is a session (service/sessions.py): each text message is one
client event, each server event one text message. A message over the size limit ends the
connection with close code 1009 (the WebSocket protocol's own answer: reading it whole to
answer otherwise would defeat the bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http
import time
import uuid

import orjson
import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from parley.codec import rest
from parley.errors import ApiError, ErrorKind, invalid
from parley.log import get_logger
from parley.service.keys import Authenticator
from parley.service.responses import ResponsesService
from parley.service.sessions import LIMIT_REACHED, Session, SessionLimits

log = get_logger(__name__)

PATH = "/v1/responses"
# Envoy's active health check of the WebSocket cluster (plain HTTP/1.1: a gRPC health check
# needs an HTTP/2 cluster): 200 while this replica serves, 503 once it drains or its engine dies.
HEALTH_PATH = "/healthz"


@dataclasses.dataclass(frozen=True)
class WebSocketSettings:
    host: str = "127.0.0.1"
    port: int = 0
    max_message_bytes: int = 16 * 1024 * 1024
    max_connections: int = 1024
    idle_seconds: float = 600.0  # nothing sent by the client and nothing running: closed
    ping_seconds: float = 20.0  # keepalive pings; a peer that answers none within as long is gone
    session: SessionLimits = SessionLimits()


def _reply(status: int, error: ApiError, request_id: str) -> Response:
    body = orjson.dumps(error.to_openai())
    headers = Headers([("Content-Type", rest.JSON), ("Content-Length", str(len(body))),
                       ("x-request-id", request_id), ("Connection", "close")])
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


def _health(serving: bool) -> Response:
    status = http.HTTPStatus.OK if serving else http.HTTPStatus.SERVICE_UNAVAILABLE
    body = b"SERVING\n" if serving else b"NOT_SERVING\n"
    headers = Headers([("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return Response(status.value, status.phrase, headers, body)


class WebSocketServer:
    def __init__(self, service: ResponsesService, authenticator: Authenticator, settings: WebSocketSettings):
        self.service = service
        self.authenticator = authenticator
        self.settings = settings
        self.server: Server | None = None
        self.port: int | None = None
        self._sessions: set[Session] = set()
        self.serving = False  # the app's health, as the gRPC health service reports it

    async def start(self) -> int:
        self.server = await serve(
            self._handle, self.settings.host, self.settings.port, process_request=self._handshake,
            max_size=self.settings.max_message_bytes, max_queue=1, compression=None,
            ping_interval=self.settings.ping_seconds, ping_timeout=self.settings.ping_seconds,
            server_header=None)
        self.port = self.server.sockets[0].getsockname()[1]
        log.info("websocket.serving", address=f"{self.settings.host}:{self.port}")
        return self.port

    async def _handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        request_id = request.headers.get("x-request-id") or "req_" + uuid.uuid4().hex
        connection.request_id = request_id
        connection.trace_metadata = [(name, request.headers[name]) for name in ("traceparent", "tracestate")
                                     if name in request.headers]
        path = request.path.split("?", 1)[0]
        if path == HEALTH_PATH and "upgrade" not in request.headers:
            return _health(self.serving)
        if path != PATH:
            return _reply(404, invalid(f"Invalid URL (GET {request.path[:200]}): WebSocket mode is served at "
                                       f"{PATH}."), request_id)
        if len(self._sessions) >= self.settings.max_connections:
            log.warning("websocket.refused", reason="connection limit", open=len(self._sessions))
            return _reply(503, ApiError(ErrorKind.UNAVAILABLE, "This server has as many WebSocket connections "
                                        "open as it takes; retry shortly.", None, "websocket_connections_exhausted"),
                          request_id)
        try:
            connection.project = await self.authenticator.project_of(request.headers.get("authorization"))
        except ApiError as error:
            log.info("request.rejected", status=error.kind.http_status, code=error.code, rpc="WebSocket")
            return _reply(error.kind.http_status, error, request_id)
        return None

    async def _handle(self, connection: ServerConnection) -> None:
        structlog.contextvars.bind_contextvars(request_id=connection.request_id, rpc="WebSocket",
                                               project=connection.project)
        session = self.service.open_session(connection.project, self.settings.session, connection.trace_metadata)
        self._sessions.add(session)
        started = time.monotonic()
        log.info("websocket.opened")
        writer = asyncio.create_task(self._write(connection, session), name="websocket-writer")
        reader = asyncio.create_task(self._read(connection, session), name="websocket-reader")
        try:
            await asyncio.wait((writer, reader), return_when=asyncio.FIRST_COMPLETED)
        finally:
            reader.cancel()
            await session.close()  # every lane stops: generation ends within a token
            self._sessions.discard(session)
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await writer
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await reader
        reason = session.end_reason
        if reason == LIMIT_REACHED:
            await connection.close(1000, LIMIT_REACHED)
        elif reason == "slow reader":
            await connection.close(1008, "the client read nothing for too long")
        elif reason == "idle":
            await connection.close(1000, "idle")
        log.info("websocket.closed", reason=reason, code=connection.close_code,
                 seconds=round(time.monotonic() - started, 3))

    async def _read(self, connection: ServerConnection, session: Session) -> None:
        """Client messages into the session, read only while it has room for them."""
        while not session.ended:
            await session.room()
            if session.ended:
                return
            try:
                message = await asyncio.wait_for(connection.recv(decode=False), self.settings.idle_seconds)
            except TimeoutError:
                if session.idle:
                    session.end("idle")
                    return
                continue
            except ConnectionClosed:
                return
            try:
                document = orjson.loads(message)
            except orjson.JSONDecodeError as exc:
                session.refuse(invalid(f"We could not parse the JSON of your message. ({exc.msg} at position "
                                       f"{exc.pos})", None, "invalid_json"))
                continue
            session.receive(document, len(message))
            del message, document

    async def _write(self, connection: ServerConnection, session: Session) -> None:
        async for outgoing in session.outgoing():
            for data in rest.encode_ws(outgoing.events, outgoing.encoded, outgoing.stream_id):
                await connection.send(data, text=True)
            del outgoing

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    async def stop(self, grace: float) -> None:
        """No new connections; turns already running get `grace` seconds (new ones are refused
        by the shutting-down service), then every connection closes with 1001 (going away)."""
        if self.server is None:
            return
        self.serving = False
        self.server.close(close_connections=False)
        deadline = time.monotonic() + grace
        while any(not session.idle for session in self._sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.server.close(close_connections=True)
        await self.server.wait_closed()
