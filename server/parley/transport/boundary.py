"""The one error boundary of every RPC, and the per-RPC request id.

ApiError becomes a gRPC status with `google.rpc.Status` details (ErrorInfo) for gRPC clients
and trailer `x-openai-error` (the OpenAI error JSON) that Envoy's Lua filter turns into the REST
body. Any other exception
is logged with its traceback and answered with a generic server_error: no internals leak.
"""

from __future__ import annotations

import asyncio
import functools
import json
import uuid

import grpc
import structlog
from google.rpc import code_pb2, error_details_pb2, status_pb2

from parley.errors import ApiError, server_error
from parley.log import get_logger

log = get_logger(__name__)



def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and value:
            return value
    return "req_" + uuid.uuid4().hex


# Headers and trailers have size limits along the way (gRPC metadata, Envoy's header maps), and
# messages may echo what a client sent: a message is cut to this many characters on the wire.
MAX_MESSAGE_CHARS = 1024


def _bounded(error: ApiError) -> ApiError:
    if len(error.message) <= MAX_MESSAGE_CHARS:
        return error
    return ApiError(error.kind, error.message[:MAX_MESSAGE_CHARS] + "… (truncated)", error.param, error.code)


# What Envoy's transcoder answers for a gRPC status (convert_grpc_status); a kind whose HTTP
# status differs tells Envoy its own.
_HTTP_STATUS_OF_GRPC_CODE = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "ABORTED": 409, "RESOURCE_EXHAUSTED": 429,
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
    elif error.kind.http_status == 409:  # the SDK retries 409 by default; a finished response stays finished
        trailers.append(("x-should-retry", "false"))
    return tuple(trailers)


def _log_safely(method, event: str, **fields) -> None:
    try:
        method(event, **fields)
    except Exception:  # the client must get its answer even if logging itself fails
        pass


async def _abort(context: grpc.aio.ServicerContext, error: ApiError) -> None:
    error = _bounded(error)
    _log_safely(log.info, "request.rejected", status=error.kind.http_status, param=error.param,
                code=error.code, message=error.message)
    await context.abort(getattr(grpc.StatusCode, error.kind.grpc_code_name), error.message,
                        trailing_metadata=_trailers(error))


async def _fail(context: grpc.aio.ServicerContext, failure: Exception) -> None:
    if isinstance(failure, ApiError):
        # The abort raises from here with `failure` as its context, and its traceback holds the
        # handler's frames: a refused 15 MB body would stay alive until the cyclic GC ran.
        failure.__traceback__ = None
        await _abort(context, failure)
        return
    _log_safely(log.error, "request.crashed", exc_info=failure)
    failure.__traceback__ = None
    await _abort(context, server_error())


_PASS_THROUGH = (asyncio.CancelledError, grpc.aio.AbortError, GeneratorExit)


def unary(handler):
    @functools.wraps(handler)
    async def wrapper(self, request, context):
        structlog.contextvars.bind_contextvars(request_id=_request_id(context), rpc=handler.__name__)
        try:
            return await handler(self, request, context)
        except _PASS_THROUGH:
            raise
        except Exception as failure:
            await _fail(context, failure)
        finally:
            structlog.contextvars.clear_contextvars()
    return wrapper


def streaming(handler):
    @functools.wraps(handler)
    async def wrapper(self, request, context):
        structlog.contextvars.bind_contextvars(request_id=_request_id(context), rpc=handler.__name__)
        try:
            async for message in handler(self, request, context):
                yield message
        except _PASS_THROUGH:
            raise
        except Exception as failure:
            await _fail(context, failure)
        finally:
            structlog.contextvars.clear_contextvars()
    return wrapper
