"""The one boundary of every RPC: who calls (API key → project), the request id, the error
shape, the rate-limit headers and the per-RPC metrics.

ApiError becomes a gRPC status with `google.rpc.Status` details (ErrorInfo) for gRPC clients
and trailer `x-openai-error` (the OpenAI error JSON) that Envoy's Lua filter turns into the REST
body. Any other exception is logged with its traceback and answered with a generic
server_error: no internals leak.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import math
import time
import uuid

import grpc
import structlog
from google.rpc import code_pb2, error_details_pb2, status_pb2

from parley import metrics, tracing
from parley.errors import ApiError, server_error
from parley.log import get_logger
from parley.service.keys import Authenticator
from parley.service.limits import RateLimits

log = get_logger(__name__)



def _metadata(context: grpc.aio.ServicerContext, name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name and value:
            return value
    return None


def _request_id(context: grpc.aio.ServicerContext) -> str:
    return _metadata(context, "x-request-id") or "req_" + uuid.uuid4().hex


# Headers and trailers have size limits along the way (gRPC metadata, Envoy's header maps), and
# messages may echo what a client sent: a message is cut to this many characters on the wire.
MAX_MESSAGE_CHARS = 1024


def _bounded(error: ApiError) -> ApiError:
    if len(error.message) <= MAX_MESSAGE_CHARS:
        return error
    return dataclasses.replace(error, message=error.message[:MAX_MESSAGE_CHARS] + "… (truncated)")


# What Envoy's transcoder answers for a gRPC status (convert_grpc_status); a kind whose HTTP
# status differs tells Envoy its own.
_HTTP_STATUS_OF_GRPC_CODE = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404, "ABORTED": 409, "RESOURCE_EXHAUSTED": 429,
                             "INTERNAL": 500, "UNAVAILABLE": 503}


def _metadata_json(document) -> str:
    """JSON safe for a gRPC metadata value (printable ASCII): non-ASCII as \\u escapes, which a
    JSON reader turns back into the same text, and DEL escaped as well."""
    return json.dumps(document, ensure_ascii=True, separators=(",", ":")).replace("\x7f", "\\u007f")


def _trailers(error: ApiError) -> tuple:
    code = getattr(code_pb2, error.kind.grpc_code_name)
    info = error_details_pb2.ErrorInfo(reason=error.code or error.kind.error_type, domain="parley.dev",
                                       metadata={"type": error.kind.error_type, "param": error.param or ""})
    status = status_pb2.Status(code=code, message=error.message)
    status.details.add().Pack(info)
    trailers = [
        ("grpc-status-details-bin", status.SerializeToString()),
        ("x-openai-error", _metadata_json(error.to_openai())),
    ]
    if error.kind.http_status != _HTTP_STATUS_OF_GRPC_CODE.get(error.kind.grpc_code_name):
        trailers.append(("x-http-status", str(error.kind.http_status)))  # Envoy's Lua filter sets it
    if error.kind.http_status == 429:
        trailers.append(("x-should-retry", "true"))
        if error.retry_after_seconds is not None:  # the SDK waits this long before its retry
            trailers.append(("retry-after-ms", str(math.ceil(error.retry_after_seconds * 1000))))
    elif error.kind.http_status == 409:  # the SDK retries 409 by default; a finished response stays finished
        trailers.append(("x-should-retry", "false"))
    return tuple(trailers)


def _log_safely(method, event: str, **fields) -> None:
    try:
        method(event, **fields)
    except Exception:  # the client must get its answer even if logging itself fails
        pass


async def _abort(context: grpc.aio.ServicerContext, error: ApiError, headers: tuple = ()) -> None:
    error = _bounded(error)
    _log_safely(log.info, "request.rejected", status=error.kind.http_status, param=error.param,
                code=error.code, message=error.message)
    await context.abort(getattr(grpc.StatusCode, error.kind.grpc_code_name), error.message,
                        trailing_metadata=_trailers(error) + headers)


def _status_of(failure: BaseException) -> int:
    return failure.kind.http_status if isinstance(failure, ApiError) else 500


async def _fail(context: grpc.aio.ServicerContext, failure: Exception, headers: tuple = ()) -> None:
    if isinstance(failure, ApiError):
        # The abort raises from here with `failure` as its context, and its traceback holds the
        # handler's frames: a refused 15 MB body would stay alive until the cyclic GC ran.
        failure.__traceback__ = None
        await _abort(context, failure, headers)
        return
    _log_safely(log.error, "request.crashed", exc_info=failure)
    failure.__traceback__ = None
    await _abort(context, server_error(), headers)


_PASS_THROUGH = (asyncio.CancelledError, grpc.aio.AbortError, GeneratorExit)
# What a client that went away is counted as (nginx's "client closed request").
CLIENT_GONE = 499


class Gate:
    """What every RPC passes before its handler: the caller's project from its API key, and the
    rate-limit headers its reply carries. Servicers hold one as `gate`."""

    def __init__(self, authenticator: Authenticator, limits: RateLimits):
        self.authenticator = authenticator
        self.limits = limits

    async def project(self, context: grpc.aio.ServicerContext) -> str:
        return await self.authenticator.project_of(_metadata(context, "authorization"))

    def headers(self, project: str | None) -> tuple:
        return self.limits.headers(project) if project is not None and self.limits.enabled else ()


class _Call:
    """One RPC through the boundary: request id and project in every log line, its metrics."""

    __slots__ = ("context", "gate", "project", "rpc", "span", "started", "status")

    def __init__(self, gate: Gate, context: grpc.aio.ServicerContext, rpc: str):
        self.gate, self.context, self.rpc = gate, context, rpc
        self.project: str | None = None
        self.status = 200
        self.started = time.perf_counter()
        request_id = _request_id(context)
        structlog.contextvars.bind_contextvars(request_id=request_id, rpc=rpc)
        self.span = tracing.start_rpc(rpc, context.invocation_metadata(), **{"parley.request_id": request_id})

    async def admit(self) -> str:
        self.project = await self.gate.project(self.context)
        structlog.contextvars.bind_contextvars(project=self.project)
        self.span.set_attribute("parley.project", self.project)
        return self.project

    async def send_headers(self) -> None:
        headers = self.gate.headers(self.project)
        if headers:
            await self.context.send_initial_metadata(headers)

    async def fail(self, failure: Exception) -> None:
        self.status = _status_of(failure)
        await _fail(self.context, failure, self.gate.headers(self.project))

    def end(self) -> None:
        self.span.set_attribute("http.response.status_code", self.status)
        self.span.end()
        metrics.REQUESTS.labels(self.rpc, str(self.status)).inc()
        metrics.REQUEST_SECONDS.labels(self.rpc).observe(time.perf_counter() - self.started)
        structlog.contextvars.clear_contextvars()


def unary(handler):
    """`handler(self, request, context, project)` behind the one boundary."""
    @functools.wraps(handler)
    async def wrapper(self, request, context):
        call = _Call(self.gate, context, handler.__name__)
        try:
            reply = await handler(self, request, context, await call.admit())
            await call.send_headers()
            return reply
        except _PASS_THROUGH as gone:
            if not isinstance(gone, grpc.aio.AbortError):
                call.status = CLIENT_GONE
            raise
        except Exception as failure:
            await call.fail(failure)
        finally:
            call.end()
    return wrapper


def streaming(handler):
    """`handler(self, request, context, project)` (an async generator) behind the one boundary."""
    @functools.wraps(handler)
    async def wrapper(self, request, context):
        call = _Call(self.gate, context, handler.__name__)
        try:
            first = True
            async for message in handler(self, request, context, await call.admit()):
                if first:
                    first = False
                    await call.send_headers()
                yield message
        except _PASS_THROUGH as gone:
            if not isinstance(gone, grpc.aio.AbortError):
                call.status = CLIENT_GONE
            raise
        except Exception as failure:
            await call.fail(failure)
        finally:
            call.end()
    return wrapper
