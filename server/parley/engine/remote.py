"""Engine `remote`: generate through an engine process (`parley engine`, engine/host.py).

Several serving processes, each its own event loop and GIL, share one engine (one model on the
GPU). Generations travel on one asyncio connection (engine/wire.py); a serving process reads
the engine's frames and hands each stream its deltas, several at once when they were ready
together. The Engine interface's synchronous calls (render_prompt, check_constraint) are
blocking round trips on a socket of the calling thread's own: render_prompt runs on worker
threads (renders_off_loop), and a constraint's verdict is kept, so the loop blocks only the
first time a constraint is seen.

If the engine process goes away, running generations fail with EngineDead, health() turns not
ok (new requests get 503, readiness fails) and the connection is retried every second; when
the engine process is back, so is this one.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import socket
import threading
from collections.abc import AsyncIterator

import orjson
import structlog

from parley.engine import wire
from parley.engine.base import ChatMessage, Constraint, EngineDead, EngineHealth, SamplingParams

log = structlog.get_logger("parley.engine.remote")

RECONNECT_SECONDS = 1.0
WAITING_LOG_SECONDS = 10.0
# A blocking call's reply must come within this; a stuck engine process then fails the request.
CALL_TIMEOUT_SECONDS = 60.0
CONSTRAINT_VERDICTS = 1024


class _Stream:
    """One generation's frames as they arrive; its consumer takes all that are there at once."""

    __slots__ = ("frames", "waiter")

    def __init__(self):
        self.frames: collections.deque = collections.deque()
        self.waiter: asyncio.Future | None = None

    def put(self, frame: list) -> None:
        self.frames.append(frame)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self) -> list[list]:
        while not self.frames:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
            self.waiter = None
        frames = list(self.frames)
        self.frames.clear()
        return frames


class RemoteEngine:
    renders_off_loop = True
    # Prompts are rendered whole, in the engine process: rendering message by message would make
    # every kept turn a blocking round trip on the event loop.
    message_rendering = None
    # The engine process restarts on its own; restarting this one would not bring it back.
    restart_heals = False

    def __init__(self, socket_path: str):
        self.socket_path = socket_path
        self.model_id = ""
        self.context_window = 0
        self.tool_format = "hermes"
        self.reasoning_format = "none"
        self.native_tools = False
        self.reasoning_efforts: tuple[str, ...] = ()
        self._protocol: wire.FrameProtocol | None = None
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count(1)
        self._status: list = ["status", False, "not connected to the engine process yet", None]
        self._connector: asyncio.Task | None = None
        self._closing = False
        self._local = threading.local()
        self._sockets: list[socket.socket] = []  # every thread's, so that close() closes them all
        self._sockets_lock = threading.Lock()
        self._verdicts: collections.OrderedDict[bytes, str | None] = collections.OrderedDict()

    @classmethod
    def from_settings(cls, settings) -> RemoteEngine:
        return cls(settings.engine_socket)

    async def start(self) -> None:
        """Connect (waiting for the engine process while it loads its model), learn what it
        serves, then keep the connection: reconnect whenever it is lost."""
        await self._connect(waiting=True)
        self._connector = asyncio.create_task(self._keep_connected(), name="engine-connection")

    async def _connect(self, waiting: bool) -> None:
        loop = asyncio.get_running_loop()
        hello: asyncio.Future = loop.create_future()
        started = next_log = loop.time()
        while True:
            try:
                _, protocol = await loop.create_unix_connection(
                    lambda: wire.FrameProtocol(lambda frame: self._on_frame(frame, hello),
                                               lambda exc: self._on_lost(exc, hello)), self.socket_path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if not waiting:
                    raise
                if loop.time() >= next_log:
                    log.info("engine.waiting", socket=self.socket_path, waited_s=round(loop.time() - started),
                             reason=type(exc).__name__)
                    next_log = loop.time() + WAITING_LOG_SECONDS
                await asyncio.sleep(0.2)
        self._protocol = protocol
        protocol.send(["hello"])
        description = await asyncio.wait_for(hello, CALL_TIMEOUT_SECONDS)
        if self.model_id and description["model_id"] != self.model_id:
            log.warning("engine.model_changed", was=self.model_id, now=description["model_id"])
        self.model_id = description["model_id"]
        self.context_window = description["context_window"]
        self.tool_format = description["tool_format"]
        self.reasoning_format = description["reasoning_format"]
        self.native_tools = description.get("native_tools", False)
        self.reasoning_efforts = tuple(description.get("reasoning_efforts", ()))
        log.info("engine.connected", socket=self.socket_path, model=self.model_id)

    async def _keep_connected(self) -> None:
        while not self._closing:
            await asyncio.sleep(RECONNECT_SECONDS)
            if self._protocol is None:
                try:
                    await self._connect(waiting=False)
                except (OSError, asyncio.TimeoutError):
                    pass

    def _on_frame(self, frame: list, hello: asyncio.Future) -> None:
        op = frame[0]
        if op in ("d", "f", "e"):
            stream = self._streams.get(frame[1])
            if stream is not None:
                stream.put(frame)
        elif op == "status":
            self._status = frame
        elif op == "hello" and not hello.done():
            hello.set_result(frame[1])

    def _on_lost(self, exc: Exception | None, hello: asyncio.Future) -> None:
        if not hello.done():
            hello.set_exception(ConnectionResetError("the engine process closed the connection"))
        self._protocol = None
        self._status = ["status", False, "the engine process is unreachable", None]
        streams, self._streams = self._streams, {}
        for stream_id, stream in streams.items():
            stream.put(["e", stream_id, "dead", "the engine process went away"])
        if not self._closing:
            log.error("engine.disconnected", socket=self.socket_path, failed_generations=len(streams))

    # -- the Engine interface --------------------------------------------------------------

    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator:
        protocol = self._protocol
        if protocol is None:
            raise EngineDead("the engine process is unreachable")
        stream_id = next(self._ids)
        stream = self._streams[stream_id] = _Stream()
        protocol.send(["generate", stream_id, prompt, wire.encode_params(params)])
        ended = False
        try:
            while True:
                deltas = []
                for frame in await stream.take():
                    if frame[0] == "d":
                        deltas += map(wire.decode_delta, frame[2])
                        continue
                    ended = True
                    if deltas:
                        yield deltas
                    if frame[0] == "f":
                        yield wire.decode_finished(frame[2])
                        return
                    wire.raise_error(frame[2], frame[3])
                yield deltas
        finally:
            self._streams.pop(stream_id, None)
            if not ended and not protocol.closed:
                protocol.send(["abort", stream_id])  # the engine process closes the generation: the abort

    def render_prompt(self, messages: list[ChatMessage]) -> list[int]:
        return self._call("render", wire.encode_messages(messages))

    def check_constraint(self, constraint: Constraint | None) -> None:
        if constraint is None:
            return
        key = orjson.dumps(wire.encode_constraint(constraint), option=orjson.OPT_SORT_KEYS)
        if key not in self._verdicts:
            try:
                self._call("constraint", wire.encode_constraint(constraint))
                verdict = None
            except ValueError as refused:
                verdict = str(refused)
            self._verdicts[key] = verdict
            if len(self._verdicts) > CONSTRAINT_VERDICTS:
                self._verdicts.popitem(last=False)
        verdict = self._verdicts[key]
        if verdict is not None:
            raise ValueError(verdict)

    def health(self) -> EngineHealth:
        return EngineHealth(bool(self._status[1]), self._status[2])

    def kv_cache_usage(self) -> float | None:
        return self._status[3]

    async def close(self) -> None:
        self._closing = True
        if self._connector is not None:
            self._connector.cancel()
        if self._protocol is not None:
            self._protocol.transport.close()
        with self._sockets_lock:
            for connection in self._sockets:
                connection.close()

    # -- blocking calls, on the calling thread's own socket ----------------------------------

    def _call(self, op: str, argument):
        request_id = next(self._ids)
        message = orjson.dumps([op, request_id, argument]) + b"\n"
        for attempt in (1, 2):  # a kept socket may be to an engine process that has since restarted
            kept = getattr(self._local, "socket", None) is not None
            try:
                connection = self._thread_connection()
                connection.sendall(message)
                reply = self._reply(connection, request_id)
                break
            except OSError as exc:
                self._drop_thread_connection()
                if not kept or attempt == 2:
                    raise EngineDead(f"the engine process is unreachable ({type(exc).__name__})") from None
        if reply[0] == "e":
            wire.raise_error(reply[2], reply[3])
        return reply[2]

    def _thread_connection(self) -> socket.socket:
        connection = getattr(self._local, "socket", None)
        if connection is None:
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            connection.settimeout(CALL_TIMEOUT_SECONDS)
            connection.connect(self.socket_path)
            self._local.socket = connection
            self._local.buffer = bytearray()
            with self._sockets_lock:
                self._sockets.append(connection)
        return connection

    def _drop_thread_connection(self) -> None:
        connection = getattr(self._local, "socket", None)
        if connection is not None:
            connection.close()
            self._local.socket = None
            with self._sockets_lock:
                self._sockets.remove(connection)

    def _reply(self, connection: socket.socket, request_id: int) -> list:
        buffer: bytearray = self._local.buffer
        while True:
            end = buffer.find(b"\n")
            while end >= 0:
                frame = orjson.loads(bytes(buffer[:end]))
                del buffer[:end + 1]
                if frame[0] in ("r", "e") and frame[1] == request_id:
                    return frame
                end = buffer.find(b"\n")  # the status frames every connection gets: not for us
            chunk = connection.recv(1 << 16)
            if not chunk:
                raise ConnectionResetError("the engine process closed the connection")
            buffer += chunk
