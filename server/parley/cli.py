"""`parley serve` (gRPC server only), `parley run` (server + Envoy sidecar), `parley keys` (API keys)."""

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
                       ("run", "run the gRPC server and the Envoy REST gateway, and print the URL"),
                       ("engine", "run only the engine, on PARLEY_ENGINE_SOCKET, for several `parley serve` "
                                  "processes with PARLEY_ENGINE=remote to share (one model on the GPU)")):
        config.add_arguments(commands.add_parser(name, help=text))
    keys = commands.add_parser("keys", help="create, list and revoke API keys (in the configured store)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key for a project; the key is printed once")
    create.add_argument("--project", required=True, help="the project the key belongs to")
    create.add_argument("--name", default="", help="a name to recognise the key by")
    actions.add_parser("list", help="list keys (never the keys themselves)")
    revoke = actions.add_parser("revoke", help="revoke a key by its id (key_...)")
    revoke.add_argument("key_id")
    for action in actions.choices.values():
        config.add_arguments(action)
    envoy_config = commands.add_parser(
        "envoy-config", help="print the Envoy sidecar config for these settings (for a Kubernetes ConfigMap: Envoy "
                             "then runs beside `parley serve` in the same pod)")
    envoy_config.add_argument("--descriptor", default=None,
                              help="where the sidecar finds the descriptor set (default: this install's)")
    envoy_config.add_argument("--router", action="store_true",
                              help="an Envoy in front of several replicas (PARLEY_GRPC_HOST names them all, e.g. a "
                                   "headless Service): ready while any one serves")
    config.add_arguments(envoy_config)
    args = parser.parse_args(argv)
    try:
        settings = config.load(args)
    except ValueError as exc:
        print(f"parley: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    problem = _engine_socket_problem(args.command, settings)
    if problem:
        print(f"parley: invalid configuration: {problem}", file=sys.stderr)
        raise SystemExit(2)
    if args.command == "keys":
        log.configure(settings.log_format, "warning")
        raise SystemExit(asyncio.run(manage_keys(settings, args)))
    if args.command == "envoy-config":
        from parley.gateway import render

        print(render(settings, settings.grpc_port, websocket_port=settings.websocket_port,
                     descriptor=args.descriptor, router=args.router), end="")
        return
    log.configure(settings.log_format, settings.log_level)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # uvloop is optional: the default loop works, slower
        pass
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    return_large_blocks_to_the_system()
    if args.command == "engine":
        from parley.engine.host import serve_engine

        raise SystemExit(asyncio.run(serve_engine(settings)))
    from parley.app import serve

    try:
        status = asyncio.run(serve(settings, with_gateway=args.command == "run"))
    except RuntimeError as exc:  # start-up refusals say what to change: no traceback to read through
        print(f"parley: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    raise SystemExit(status)


def _engine_socket_problem(command: str, settings: config.Settings) -> str | None:
    """The engine process and the servers that share it agree on one socket; a socket given to
    anything else would be ignored."""
    if command == "engine":
        if not settings.engine_socket:
            return "parley engine needs engine_socket (PARLEY_ENGINE_SOCKET): where it listens"
        if settings.engine == "remote":
            return "parley engine runs a model engine (llamacpp, tensorrt_llm, synthetic, scripted), not remote"
    elif command in ("serve", "run") and settings.engine_socket and settings.engine != "remote":
        return f"engine_socket is for engine remote (or `parley engine`); engine {settings.engine} does not use it"
    return None


async def manage_keys(settings: config.Settings, args: argparse.Namespace) -> int:
    from parley.app import build_store
    from parley.service.keys import create_key

    store, _ = build_store(settings)
    await store.open()
    try:
        if args.action == "create":
            try:
                key, record = await create_key(store, args.project, args.name)
            except ValueError as exc:
                print(f"parley: {exc}", file=sys.stderr)
                return 2
            print(f"id:      {record.id}\nproject: {record.project}\nkey:     {key}\n"
                  "The key is shown this once; only its hash is stored.")
        elif args.action == "list":
            print(f"{'id':<56} {'project':<20} {'name':<16} {'created':<20} {'last used':<20} revoked")
            for record in await store.list_keys():
                print(f"{record.id:<56} {record.project:<20} {record.name:<16} {_when(record.created_at):<20} "
                      f"{_when(record.last_used_at):<20} {_when(record.revoked_at)}")
        elif not await store.revoke_key(args.key_id):
            print(f"parley: no active key with id {args.key_id!r}", file=sys.stderr)
            return 1
        else:
            print(f"revoked {args.key_id} (replicas stop accepting it within 10 s)")
        return 0
    finally:
        await store.close()


def _when(moment: float | None) -> str:
    import datetime

    if moment is None:
        return "-"
    return datetime.datetime.fromtimestamp(moment, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
