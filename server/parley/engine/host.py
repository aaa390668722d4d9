"""`parley engine`: one engine in its own process, shared by several `parley serve` processes.

A GPU holds one copy of the model, but one Python process serving the Responses API is bound to
one core by the GIL (bench/results: lockstep). So the engine runs here, once, and the serving
processes (engine `remote`, engine/remote.py) send it token prompts and take its tokens back over
a Unix socket (engine/wire.py). This process does nothing but generate: no store, no HTTP, no
gRPC. TensorRT-LLM's LLM is built on this loop's thread, as the server does in-process.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import structlog

from parley.config import Settings
from parley.engine import wire
from parley.engine.base import Engine, Finished
from parley.engine.registry import build_engine

log = structlog.get_logger("parley.engine.host")


class _Connection:
    """One serving process: its running generations, each a task, cancelled when it aborts one
    or goes away."""

    def __init__(self, host: EngineHost):
        self.host = host
        self.protocol = wire.FrameProtocol(self.on_frame, self.on_lost)
        self.tasks: dict[int, asyncio.Task] = {}

    def on_frame(self, frame: list) -> None:
        op = frame[0]
        if op == "generate":
            _, stream_id, prompt, params = frame
            task = asyncio.get_running_loop().create_task(self._generate(stream_id, prompt, params))
            self.tasks[stream_id] = task
        elif op == "abort":
            task = self.tasks.pop(frame[1], None)
            if task is not None:
                task.cancel()
        elif op == "render":
            self.tasks[frame[1]] = asyncio.get_running_loop().create_task(self._render(frame[1], frame[2]))
        elif op == "constraint":
            self._reply(frame[1], lambda: self.host.engine.check_constraint(wire.decode_constraint(frame[2])))
        elif op == "hello":
            self.protocol.send(["hello", self.host.description()])
            self.protocol.send(self.host.status_frame())
        else:
            log.warning("engine_host.unknown_frame", op=str(op)[:40])

    def _reply(self, request_id: int, call) -> None:
        try:
            self.protocol.send(["r", request_id, call()])
        except Exception as exc:
            self.protocol.send(["e", request_id, wire.error_kind(exc), str(exc)])

    async def _render(self, request_id: int, messages: list) -> None:
        engine = self.host.engine
        try:
            decoded = wire.decode_messages(messages)
            if getattr(engine, "renders_off_loop", False):
                tokens = await asyncio.to_thread(engine.render_prompt, decoded)
            else:
                tokens = engine.render_prompt(decoded)
            self.protocol.send(["r", request_id, tokens])
        except Exception as exc:
            self.protocol.send(["e", request_id, wire.error_kind(exc), str(exc)])
        finally:
            self.tasks.pop(request_id, None)

    async def _generate(self, stream_id: int, prompt: list[int], params: dict) -> None:
        send = self.protocol.send
        try:
            async for event in self.host.engine.generate(prompt, wire.decode_params(params)):
                if isinstance(event, Finished):
                    send(["f", stream_id, wire.encode_finished(event)])
                elif isinstance(event, list):
                    send(["d", stream_id, [wire.encode_delta(delta) for delta in event]])
                else:
                    send(["d", stream_id, [wire.encode_delta(event)]])
        except asyncio.CancelledError:
            raise  # aborted: closing the engine's generator (above) was the abort
        except Exception as exc:
            kind = wire.error_kind(exc)
            if kind == "bug":
                log.exception("engine_host.generation_failed")
            send(["e", stream_id, kind, str(exc)])
        finally:
            self.tasks.pop(stream_id, None)

    def on_lost(self, exc: Exception | None) -> None:
        self.host.connections.discard(self)
        for task in list(self.tasks.values()):
            task.cancel()
        self.tasks.clear()
        log.info("engine_host.disconnected", running=len(self.host.connections))


class EngineHost:
    def __init__(self, engine: Engine, socket_path: str):
        self.engine = engine
        self.socket_path = socket_path
        self.connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._status: list | None = None
        self._watch: asyncio.Task | None = None

    def description(self) -> dict:
        engine = self.engine
        return {"model_id": engine.model_id, "context_window": engine.context_window,
                "tool_format": engine.tool_format, "reasoning_format": engine.reasoning_format,
                "native_tools": getattr(engine, "native_tools", False),
                "reasoning_efforts": list(getattr(engine, "reasoning_efforts", ()))}

    def status_frame(self) -> list:
        health = self.engine.health()
        return ["status", health.ok, health.detail, self.engine.kv_cache_usage()]

    async def start(self) -> None:
        path = Path(self.socket_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()  # a previous engine process's; binding would fail on it
        loop = asyncio.get_running_loop()

        def accepted():
            connection = _Connection(self)
            self.connections.add(connection)
            log.info("engine_host.connected", running=len(self.connections))
            return connection.protocol

        self._server = await loop.create_unix_server(accepted, str(path))
        os.chmod(path, 0o600)  # the engine runs whatever prompt it is sent: this user (the pod) only
        self._watch = asyncio.create_task(self._report_status(), name="engine-status")

    async def _report_status(self) -> None:
        while True:
            frame = self.status_frame()
            for connection in list(self.connections):
                connection.protocol.send(frame)
            if self._status is not None and frame[1:3] != self._status[1:3]:
                (log.info if frame[1] else log.error)("engine_host.health", ok=frame[1], detail=frame[2])
            self._status = frame
            await asyncio.sleep(wire.STATUS_SECONDS)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.protocol.transport.close()
        await asyncio.sleep(0)
        await self.engine.close()
        Path(self.socket_path).unlink(missing_ok=True)


async def serve_engine(settings: Settings) -> int:
    """Run the configured engine on `settings.engine_socket` until SIGINT or SIGTERM."""
    log.info("engine_host.loading", engine=settings.engine)
    if settings.engine == "tensorrt_llm":
        engine = build_engine(settings)  # on the loop thread: TensorRT-LLM's results bind to it
    else:
        engine = await asyncio.to_thread(build_engine, settings)
    start = getattr(engine, "start", None)  # optional, as in-process (app.py)
    if start is not None:
        await start()
    host = EngineHost(engine, settings.engine_socket)
    await host.start()
    print(f"Parley engine process ({settings.engine}, {engine.model_id}) listening on {settings.engine_socket}",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await host.stop()
    return 0
