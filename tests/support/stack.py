"""Parley (the real gRPC server, on a free port) with the real Envoy in front of it.

The server runs on an event loop of its own, in its own thread, as it does in production: a
test that blocks pytest's loop (a synchronous SDK call, a slow assertion) cannot starve the
server, or the health checks Envoy sends it. Tests reach the server over the network; what
they need from inside it goes through `Stack.call`, which runs on the server's loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import threading
from pathlib import Path

import grpc
from parley import config
from parley.app import App
from parley.gateway import Envoy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """An App on an event loop in a thread of its own."""

    def __init__(self, settings: config.Settings, engine=None):
        self.app = App(settings, engine=engine)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._started = concurrent.futures.Future()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, name="parley-server", daemon=True)

    def start(self, timeout: float = 120) -> None:
        self._thread.start()
        self._started.result(timeout=timeout)  # re-raises what start-up raised

    def _serve(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.app.start()
        except BaseException as exc:
            self._started.set_exception(exc)
            return
        self._started.set_result(None)
        await self._stop.wait()
        await self.app.stop(grace=1)

    def submit(self, coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def stop(self, timeout: float = 60) -> None:
        if self.loop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)


class Stack:
    def __init__(self, server: ServerThread, envoy: Envoy | None):
        self.server = server
        self.envoy = envoy

    @property
    def app(self) -> App:
        return self.server.app

    @property
    def base_url(self) -> str:
        assert self.envoy is not None
        return self.envoy.url

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.app.grpc_port}"

    @property
    def engine(self):
        return self.app.engine

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.grpc_target)

    async def call(self, function, *args):
        """`await function(*args)` on the server's own loop (e.g. `stack.call(service.get, "default", id)`)."""
        return await asyncio.wrap_future(self.server.submit(function(*args)))


@contextlib.asynccontextmanager
async def running_stack(store_path: Path, engine=None, gateway: bool = True, **overrides):
    settings = config.load(environ={}, **{"grpc_port": 0, "metrics_port": 0, "websocket_port": 0,
                                          "http_port": free_port(), "store_path": str(store_path), **overrides})
    server = ServerThread(settings, engine)
    await asyncio.to_thread(server.start)
    envoy = None
    try:
        if gateway:
            envoy = Envoy(settings, server.app.grpc_port, websocket_port=server.app.websocket_port)
            await asyncio.to_thread(envoy.start)
        yield Stack(server, envoy)
    finally:
        if envoy is not None:
            await asyncio.to_thread(envoy.stop)
        await asyncio.to_thread(server.stop)


SCRIPTED_MODEL = "scripted"


@contextlib.asynccontextmanager
async def scripted_stack(tmp_path_factory, name: str, **overrides):
    """Server and Envoy on the scripted engine (it answers "Hello"), with a store of its own."""
    from tests.fakes.engines import ScriptedEngine

    engine = ScriptedEngine(model_id=SCRIPTED_MODEL, script=["Hel", "lo"])
    async with running_stack(tmp_path_factory.mktemp(name) / f"{name}.sqlite3", engine=engine,
                             **overrides) as running:
        yield running


@contextlib.asynccontextmanager
async def envoy_over(*targets: str, websockets: tuple[str, ...] = (), **overrides):
    """The real Envoy in front of replicas at `targets` ("host:port", the first one's host being
    every replica's), with settings `overrides`; `websockets`: their WebSocket ports' targets
    (without them WebSocket mode is left out)."""
    first, *others = targets
    host, port = first.rsplit(":", 1)
    settings = config.load(environ={}, **{"http_port": free_port(), "envoy_admin_port": free_port(), "grpc_host": host,
                                          **overrides})
    websocket_port = int(websockets[0].rsplit(":", 1)[1]) if websockets else None
    envoy = Envoy(settings, int(port), tuple(others), websocket_port=websocket_port, extra_websockets=websockets[1:])
    await asyncio.to_thread(envoy.start)
    try:
        yield envoy
    finally:
        await asyncio.to_thread(envoy.stop)
