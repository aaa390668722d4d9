"""`parley serve` (gRPC server only) and `parley run` (server + Envoy sidecar)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from parley import config, log

# The event loop shares the GIL with the SQLite writer, gRPC's poller and the llama.cpp worker.
# Each of those returns from C code and then waits for the GIL for up to the switch interval
# (5 ms by default) while the loop runs on; 0.5 ms measured +45-80% streamed tokens/s at 64
# streams (bench/serving.py; docs/decisions.md).
GIL_SWITCH_INTERVAL_S = 0.0005
# glibc serves blocks above its mmap threshold with mmap and returns them to the system when
# freed, but it raises the threshold after such a block is freed (up to 32 MiB), so the next
# request bodies of a few MiB come from the heap and stay in RSS after they are gone (12 bodies of
# 15 MB left a server at ~970 MB, idle). A fixed threshold keeps large blocks mmapped.
MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3


def return_large_blocks_to_the_system() -> None:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="parley", description="Serve the OpenAI Responses API.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("serve", "run the gRPC server only (Envoy runs beside it, e.g. in Kubernetes)"),
                       ("run", "run the gRPC server and the Envoy REST gateway, and print the URL")):
        config.add_arguments(commands.add_parser(name, help=text))
    args = parser.parse_args(argv)
    try:
        settings = config.load(args)
    except ValueError as exc:
        print(f"parley: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    log.configure(settings.log_format, settings.log_level)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # uvloop is optional: the default loop works, slower
        pass
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    return_large_blocks_to_the_system()
    from parley.app import serve

    raise SystemExit(asyncio.run(serve(settings, with_gateway=args.command == "run")))
