"""Start Parley in-process (real gRPC server on a free port) with real Envoy in front of it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import grpc
from parley import config
from parley.app import App
from parley.gateway import Envoy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    def __init__(self, app: App, envoy: Envoy | None):
        self.app = app
        self.envoy = envoy

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


@contextlib.asynccontextmanager
async def running_stack(store_path: Path, engine=None, gateway: bool = True, **overrides):
    settings = config.load(environ={}, grpc_port=0, http_port=free_port(), envoy_admin_port=free_port(),
                           store_path=str(store_path), **overrides)
    app = App(settings, engine=engine)
    await app.start()
    envoy = None
    try:
        if gateway:
            envoy = Envoy(settings, app.grpc_port)
            await asyncio.to_thread(envoy.start)
        yield Stack(app, envoy)
    finally:
        if envoy is not None:
            await asyncio.to_thread(envoy.stop)
        await app.stop(grace=1)
