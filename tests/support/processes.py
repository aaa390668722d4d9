"""`parley serve` as a real child process, for crash, shutdown and several-replica tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time


class ServerProcess:
    def __init__(self, **settings):
        self.env = {**os.environ, "PARLEY_ENGINE": "scripted", "PARLEY_MODEL_NAME": "scripted", "PARLEY_LOG_FORMAT": "json",
                    # Port 0: a free port each (the default 50051 is shared through SO_REUSEPORT, and two
                    # "replicas" there are one port that the kernel balances).
                    "PARLEY_GRPC_PORT": "0", "PARLEY_METRICS_PORT": "0", "PARLEY_WEBSOCKET_PORT": "0",
                    **{f"PARLEY_{k.upper()}": str(v) for k, v in settings.items()}}
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.stderr_lines: list[str] = []

    def start(self, timeout: float = 60) -> "ServerProcess":
        self.process = subprocess.Popen([sys.executable, "-m", "parley", "serve"], env=self.env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            match = re.search(r"listening on .*:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                return self
            if not line and self.process.poll() is not None:
                raise RuntimeError("parley serve exited:\n" + "".join(self.stderr_lines[-30:]))
        raise RuntimeError("parley serve did not start in time")

    def _drain_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr_lines.append(line)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def websocket_target(self) -> str:
        """Where its WebSocket mode listens, from its log line (logged before `listening on`)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for line in self.stderr_lines:
                if '"websocket.serving"' in line:
                    return json.loads(line)["address"]
            time.sleep(0.05)
        raise RuntimeError("parley serve logged no websocket.serving line")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
