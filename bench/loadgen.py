"""A small asyncio load generator for streaming `POST /v1/responses`, on loopback.

Each of N clients keeps one HTTP/1.1 keep-alive connection and sends streaming requests back to
back for the run's duration. It reads the SSE stream in large blocks and counts
`response.output_text.delta` frames with bytes.count, so the client stays cheap next to the
server it measures. Per request it records the time to the first delta and the gaps between
deltas. Deltas read in one block share that block's gap, spread evenly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

DELTA = b"event: response.output_text.delta\n"
END = b"\r\n0\r\n\r\n"


@dataclasses.dataclass
class Totals:
    deltas: int = 0
    requests: int = 0
    errors: int = 0
    ttft: list[float] = dataclasses.field(default_factory=list)
    itl: list[float] = dataclasses.field(default_factory=list)


def request_bytes(host: str, port: int, body: bytes) -> bytes:
    return (f"POST /v1/responses HTTP/1.1\r\nHost: {host}:{port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


async def _one_request(reader, writer, payload: bytes, totals: Totals, record: bool) -> None:
    sent = time.perf_counter()
    writer.write(payload)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
    last = None
    tail = b""
    count = 0
    while True:
        block = await reader.read(65536)
        if not block:
            raise ConnectionError("server closed the stream")
        now = time.perf_counter()
        window = tail + block
        found = window.count(DELTA) - tail.count(DELTA)
        if found and record:
            if last is None:
                totals.ttft.append(now - sent)
                totals.itl.extend([0.0] * (found - 1))
            else:
                totals.itl.extend([(now - last) / found] * found)
        if found:
            last = now
            count += found
        if window.endswith(END):
            break
        tail = window[-(len(DELTA) + len(END)):]
    if record:
        totals.deltas += count
        totals.requests += 1


async def client(host: str, port: int, payload: bytes, stop_at: float, record_from: float, totals: Totals) -> None:
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    try:
        while time.perf_counter() < stop_at:
            try:
                await _one_request(reader, writer, payload, totals, record=time.perf_counter() >= record_from)
            except (ConnectionError, RuntimeError, asyncio.IncompleteReadError):
                totals.errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    finally:
        writer.close()


async def run_load(host: str, port: int, body: bytes, concurrency: int, seconds: float, warmup: float) -> dict:
    payload = request_bytes(host, port, body)
    totals = Totals()
    start = time.perf_counter()
    record_from = start + warmup
    stop_at = record_from + seconds
    await asyncio.gather(*(client(host, port, payload, stop_at, record_from, totals) for _ in range(concurrency)))
    elapsed = time.perf_counter() - record_from
    return {"deltas": totals.deltas, "requests": totals.requests, "errors": totals.errors, "seconds": elapsed,
            "tokens_per_second": totals.deltas / elapsed, "ttft_ms": _percentiles(totals.ttft),
            "itl_ms": _percentiles(totals.itl)}


def _percentiles(samples: list[float]) -> dict:
    if not samples:
        return {"p50": None, "p99": None}
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {"p50": round(pick(0.50), 3), "p99": round(pick(0.99), 3)}
