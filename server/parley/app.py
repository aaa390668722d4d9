"""Composition root: engine, store, signals, service, gRPC server, maintenance, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from parley import metrics, tracing
from parley.config import Settings
from parley.engine.registry import build_engine
from parley.log import get_logger
from parley.service.admission import Admission
from parley.service.event_log import WritePolicy
from parley.service.keys import Authenticator
from parley.service.limits import RateLimits
from parley.service.responses import ResponsesService
from parley.service.sealing import Sealer, load_key
from parley.service.sessions import SessionLimits
from parley.store.signals import LocalSignals, PostgresSignals
from parley.transport.boundary import Gate
from parley.transport.intake import BodyIntake
from parley.transport.servicers import add_servicers
from parley.transport.websocket import WebSocketServer, WebSocketSettings

log = get_logger(__name__)

METADATA_LIMIT_BYTES = 256 * 1024
# How often the engine's health is polled for the gRPC health service (a cheap in-process check).
ENGINE_HEALTH_INTERVAL_SECONDS = 1.0


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def websocket_settings(settings: Settings) -> WebSocketSettings:
    return WebSocketSettings(
        host=settings.grpc_host, port=settings.websocket_port, max_message_bytes=settings.websocket_max_message_bytes,
        max_connections=settings.websocket_max_connections, idle_seconds=settings.websocket_idle_seconds,
        session=SessionLimits(max_lanes=settings.websocket_max_lanes, max_seconds=settings.websocket_max_seconds,
                              max_pending_bytes=settings.websocket_max_message_bytes))


def build_store(settings: Settings):
    if settings.store_dsn:
        from parley.store.postgres import PostgresStore

        return PostgresStore(settings.store_dsn), PostgresSignals(settings.store_dsn)
    from parley.store.sqlite import SqliteStore

    synchronous = "FULL" if settings.durability == "acknowledged" else "NORMAL"
    return SqliteStore(settings.store_path, synchronous), LocalSignals()


class App:
    """A running Parley gRPC server. start() binds and serves; stop() drains and closes."""

    def __init__(self, settings: Settings, engine=None):
        self.settings = settings
        self.engine = engine
        self.store, self.signals = build_store(settings)
        self.replica_id = settings.replica_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.grpc_port: int | None = None
        self.service: ResponsesService | None = None
        self.authenticator = Authenticator(self.store, settings.api_key)
        self.limits = RateLimits(settings.rate_limit_requests_per_minute, settings.rate_limit_tokens_per_minute)
        self.metrics_port: int | None = None
        self.websocket: WebSocketServer | None = None
        self.websocket_port: int | None = None
        self._metrics_server = None
        self._maintenance: asyncio.Task | None = None
        self._engine_watch: asyncio.Task | None = None
        self._services: list[str] = []

    async def start(self) -> int:
        if self.engine is None:
            if self.settings.engine == "tensorrt_llm":
                # TensorRT-LLM's LLM is built on the loop thread, as NVIDIA's own gRPC server does:
                # its results bind to the loop of the thread that made them. Nothing is served yet.
                self.engine = build_engine(self.settings)
            else:  # loading blocks for a second or two; keep the loop free meanwhile
                self.engine = await asyncio.to_thread(build_engine, self.settings)
        start = getattr(self.engine, "start", None)  # optional: an engine that connects on the loop
        if start is not None:
            await start()
        tracing.configure()
        await self.store.open()
        await self._check_auth()
        await self.signals.start()
        self.service = ResponsesService(
            self.engine, self.store, signals=self.signals, replica_id=self.replica_id, limits=self.limits,
            admission=Admission(self.settings.max_concurrent_generations, self.settings.max_queued_generations),
            lease_seconds=self.settings.lease_seconds, default_max_output_tokens=self.settings.default_max_output_tokens,
            log_prompts=self.settings.log_prompts, context_cache_bytes=self.settings.context_cache_mb * 2**20,
            write_policy=WritePolicy(acknowledge_durably=self.settings.durability == "acknowledged"),
            sealer=Sealer(load_key(self.settings.reasoning_key, Path(self.settings.store_path).parent / "reasoning.key")))
        await self.service.maintain(self.settings.response_ttl_seconds)  # fail what a crash left running
        self._maintenance = asyncio.create_task(self._maintain_forever(), name="maintenance")
        limit = self.settings.max_request_body_bytes + 64 * 1024
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 30000),
            # Envoy refuses request headers over 32 KiB (431); the path it forwards twice (as :path
            # and x-envoy-original-path) must then never trip gRPC's limit, which answers
            # RESOURCE_EXHAUSTED, a 429 that clients retry.
            ("grpc.max_metadata_size", METADATA_LIMIT_BYTES),
            ("grpc.absolute_max_metadata_size", METADATA_LIMIT_BYTES),
            ("grpc.http2.min_ping_interval_without_data_ms", 10000),
            # Request bodies arrive in 1 MiB messages; a body waiting for its turn (BodyIntake)
            # must wait in Envoy, not here: without this, gRPC grows every stream's receive
            # window to megabytes and 12 waiting 15 MB bodies took 260 MB instead of 45.
            ("grpc.http2.bdp_probe", 0),
        ])
        websocket = websocket_settings(self.settings)  # the typed Session RPC keeps the same limits
        self._services = add_servicers(
            self.server, self.service, Gate(self.authenticator, self.limits),
            BodyIntake(self.settings.max_request_body_bytes, self.settings.large_bodies_at_once),
            websocket.session)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([*self._services, reflection.SERVICE_NAME, health.SERVICE_NAME],
                                            self.server)
        self.grpc_port = self.server.add_insecure_port(f"{self.settings.grpc_host}:{self.settings.grpc_port}")
        await self.server.start()
        self.websocket = WebSocketServer(self.service, self.authenticator, websocket)
        try:
            self.websocket_port = await self.websocket.start()
        except OSError as exc:
            raise RuntimeError(f"WebSocket mode cannot listen on {self.settings.grpc_host}:"
                               f"{self.settings.websocket_port} ({exc.strerror}); set PARLEY_WEBSOCKET_PORT "
                               "(0 picks a free port)") from None
        self._serve_metrics()
        await self._report_health(True)
        self._engine_watch = asyncio.create_task(self._watch_engine(), name="engine-health")
        log.info("server.started", grpc=f"{self.settings.grpc_host}:{self.grpc_port}", websocket=self.websocket_port,
                 model=self.engine.model_id,
                 engine=self.settings.engine, store="postgres" if self.settings.store_dsn else self.settings.store_path,
                 replica=self.replica_id)
        return self.grpc_port

    async def _check_auth(self) -> None:
        """Auth is on when a key exists; off, the server says so, and binds only loopback
        addresses unless the operator insists."""
        if await self.authenticator.required():
            log.info("auth.on", bootstrap_key=bool(self.settings.api_key))
            return
        exposed = [f"{name}={host}" for name, host in (("grpc_host", self.settings.grpc_host),
                                                        ("http_host", self.settings.http_host))
                   if not _loopback(host)]
        if exposed and not self.settings.allow_unauthenticated:
            raise RuntimeError(
                f"no API key is configured, so anyone could use this server, and it would listen beyond this "
                f"machine ({', '.join(exposed)}). Set PARLEY_API_KEY, create a key with `parley keys create "
                "--project NAME`, or set PARLEY_ALLOW_UNAUTHENTICATED=true to serve without keys anyway.")
        log.warning("auth.off", reason="no API key configured: every request is the `default` project",
                    exposed=exposed or None)

    def _serve_metrics(self) -> None:
        metrics.LIVE.waiting = lambda: self.service.admission.waiting
        metrics.LIVE.running = lambda: self.service.admission.running
        metrics.LIVE.kv_usage = self.engine.kv_cache_usage
        metrics.LIVE.engine_healthy = lambda: self.engine.health().ok
        try:
            self._metrics_server = metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
        except OSError as exc:
            raise RuntimeError(f"the metrics endpoint cannot listen on {self.settings.metrics_host}:"
                               f"{self.settings.metrics_port} ({exc.strerror}); set PARLEY_METRICS_PORT "
                               "(0 picks a free port)") from None
        self.metrics_port = self._metrics_server.server_address[1]
        log.info("metrics.serving", url=f"http://{self.settings.metrics_host}:{self.metrics_port}/metrics")

    async def _report_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        # "" is what liveness probes ask: NOT_SERVING restarts this process, which helps only
        # when the engine lives in it (engine/base.py, health).
        alive = serving or not getattr(self.engine, "restart_heals", True)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING if alive else status)
        for name in self._services:
            await self.health.set(name, status)
        if self.websocket is not None:
            self.websocket.serving = serving

    async def _watch_engine(self) -> None:
        """A dead engine turns the health service NOT_SERVING (probes fail, the pod restarts);
        an engine that comes back turns it SERVING again."""
        serving = True
        while True:
            await asyncio.sleep(ENGINE_HEALTH_INTERVAL_SECONDS)
            state = self.engine.health()
            if state.ok != serving:
                serving = state.ok
                if serving:
                    log.info("engine.healthy", engine=self.settings.engine)
                else:
                    log.error("engine.unhealthy", engine=self.settings.engine, detail=state.detail)
                await self._report_health(serving)

    async def _maintain_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.maintenance_interval_seconds)
            try:
                await self.service.maintain(self.settings.response_ttl_seconds)
            except Exception:
                log.exception("maintenance.failed")

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: stop accepting, let in-flight work finish within `grace`, fail the rest."""
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        log.info("server.stopping", grace_s=grace)
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            # Refuses new RPCs at once; in-flight ones get `grace` seconds. Background work
            # drains concurrently within the same grace.
            await asyncio.gather(self.server.stop(grace),
                                 self.service.shutdown(grace) if self.service else asyncio.sleep(0),
                                 self.websocket.stop(grace) if self.websocket else asyncio.sleep(0))
        for task in (self._maintenance, self._engine_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.service is not None:
            await self.service.drain()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        await self.signals.stop()
        await self.store.close()
        if self.engine is not None:
            await self.engine.close()
        log.info("server.stopped")


# How often `parley run` checks that its Envoy still runs.
GATEWAY_CHECK_SECONDS = 1.0


async def _watch_gateway(envoy, stop: asyncio.Event) -> int | None:
    """Envoy's exit status, once it has exited; it sets `stop`: without Envoy there is no REST
    listener, and a server that looks alive but answers no one is worse than one that exits."""
    while not stop.is_set():
        await asyncio.sleep(GATEWAY_CHECK_SECONDS)
        status = envoy.process.poll()
        if status is not None:
            log.error("envoy.exited", status=status,
                      action="stopping: the REST listener is gone; a supervisor (or `make run` again) restarts it")
            stop.set()
            return status
    return None


async def serve(settings: Settings, with_gateway: bool) -> int:
    """Run until SIGINT or SIGTERM (exit status 0), or until the gateway dies (1)."""
    app = App(settings)
    envoy = None
    watcher = None
    try:
        await app.start()
        stop = asyncio.Event()
        if with_gateway:
            from parley.gateway import Envoy

            envoy = Envoy(settings, app.grpc_port, websocket_port=app.websocket_port)
            await asyncio.to_thread(envoy.start)
            watcher = asyncio.create_task(_watch_gateway(envoy, stop), name="gateway-watch")
            print(f"Parley is serving the OpenAI Responses API at {envoy.url}  "
                  f"(gRPC {settings.grpc_host}:{app.grpc_port}; Ctrl-C stops)", flush=True)
        else:
            print(f"Parley gRPC server listening on {settings.grpc_host}:{app.grpc_port}", flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        return 1 if watcher is not None and watcher.done() and watcher.result() is not None else 0
    finally:
        if watcher is not None and not watcher.done():
            watcher.cancel()
        if envoy is not None:
            await asyncio.to_thread(envoy.stop)
        await app.stop()
