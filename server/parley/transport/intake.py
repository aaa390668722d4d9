"""Request bodies taken in at the pace memory allows.

Envoy streams a POST body to the server in messages of up to 1 MiB as it reads it. A body of one
message (every ordinary request) is read at once. A longer one is a large body: its reading,
parsing and preparation hold one of a few large-body permits, and the others wait with their
bytes still in Envoy and the client (HTTP/2 flow control), not in this process. So a burst of
huge bodies costs the server about `large_bodies_at_once` bodies of memory, not all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from parley.errors import ApiError, ErrorKind
from parley.log import get_logger

log = get_logger(__name__)


def too_large(limit: int) -> ApiError:
    return ApiError(ErrorKind.TOO_LARGE, f"The request body is larger than this server accepts ({limit} bytes).",
                    None, "request_too_large")


class BodyIntake:
    def __init__(self, limit_bytes: int, large_at_once: int):
        self.limit_bytes = limit_bytes
        self._large = asyncio.Semaphore(large_at_once)

    @contextlib.asynccontextmanager
    async def body(self, messages: AsyncIterator) -> AsyncIterator[tuple[bytes, str]]:
        """(body bytes, content type); a large body's permit is held until the block ends."""
        first = await anext(messages, None)
        if first is None:
            yield b"", ""
            return
        content_type, data = first.content_type, first.data
        more = await anext(messages, None)
        if more is None:
            del first
            if len(data) > self.limit_bytes:
                raise too_large(self.limit_bytes)
            yield data, content_type
            return
        async with self._large:
            body = bytearray(data)
            del first, data
            while more is not None:
                body += more.data
                if len(body) > self.limit_bytes:
                    raise too_large(self.limit_bytes)
                more = await anext(messages, None)
            log.debug("request.large_body", bytes=len(body))
            yield body, content_type
