"""API errors: one class, one table from kind to HTTP status and gRPC code.

Everything below the transport raises ApiError; the transport's single error boundary turns it
into a gRPC status (typed API) or an OpenAI error body (REST), and anything else into a
generic `server_error` without internals.
"""

from __future__ import annotations

import dataclasses
import enum


class ErrorKind(enum.Enum):
    # value: (http status, OpenAI error type, grpc.StatusCode name)
    INVALID_REQUEST = (400, "invalid_request_error", "INVALID_ARGUMENT")
    UNAUTHENTICATED = (401, "invalid_request_error", "UNAUTHENTICATED")
    TOO_LARGE = (413, "invalid_request_error", "INVALID_ARGUMENT")
    NOT_FOUND = (404, "invalid_request_error", "NOT_FOUND")
    CONFLICT = (409, "invalid_request_error", "ABORTED")
    RATE_LIMITED = (429, "rate_limit_error", "RESOURCE_EXHAUSTED")
    SERVER_ERROR = (500, "server_error", "INTERNAL")
    UNAVAILABLE = (503, "server_error", "UNAVAILABLE")

    @property
    def http_status(self) -> int:
        return self.value[0]

    @property
    def error_type(self) -> str:
        return self.value[1]

    @property
    def grpc_code_name(self) -> str:
        return self.value[2]


@dataclasses.dataclass
class ApiError(Exception):
    kind: ErrorKind
    message: str
    param: str | None = None
    code: str | None = None
    retry_after_seconds: float | None = None  # when a retry can succeed (429), if known

    def __str__(self) -> str:
        return self.message

    def to_openai(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(ErrorKind.INVALID_REQUEST, message, param, code)


def invalid_type(param: str, expected: str, value) -> ApiError:
    """"Invalid type for 'param': expected X, but got Y instead." (OpenAI's wording)."""
    got = "null" if value is None else type(value).__name__
    got = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
           "list": "an array", "dict": "an object"}.get(got, got)
    return invalid(f"Invalid type for '{param}': expected {expected}, but got {got} instead.", param, "invalid_type")


def engine_unavailable(detail) -> ApiError:
    """503: the engine cannot take work (dead, or its engine process unreachable); another
    replica may."""
    return ApiError(ErrorKind.UNAVAILABLE, f"The model engine is not available ({detail}); retry on another replica.",
                    None, "engine_unavailable")


def not_found(message: str, param: str | None = None) -> ApiError:
    return ApiError(ErrorKind.NOT_FOUND, message, param, None)


def server_error(message: str = "The server had an error while processing your request.") -> ApiError:
    return ApiError(ErrorKind.SERVER_ERROR, message, None, "server_error")
