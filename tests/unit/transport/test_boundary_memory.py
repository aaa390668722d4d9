"""The error boundary lets go of a refused request at once. The abort it raises carries the
refusal as its context, and gRPC keeps that abort while it finishes the call: through the
refusal's traceback, the handler's frames (and a 15 MB body in them) stayed alive until the cyclic
GC happened to run; 12 refused bodies left the server 350 MB larger."""

import gc
import weakref

import grpc
import pytest
from parley.errors import invalid
from parley.service.keys import Authenticator
from parley.service.limits import RateLimits
from parley.transport.boundary import Gate, streaming, unary


class Body:  # stands for a large request body a handler still holds when it refuses the request
    pass


class Context:
    def invocation_metadata(self):
        return ()

    async def abort(self, code, message, trailing_metadata=()):
        raise grpc.aio.AbortError()


class NoKeys:  # a store without API keys: auth is off
    async def has_keys(self):
        return False


class Servicer:
    def __init__(self):
        self.body = None
        self.gate = Gate(Authenticator(NoKeys()), RateLimits())

    @unary
    async def Unary(self, request, context, project):
        body = Body()
        self.body = weakref.ref(body)
        raise invalid("refused")

    @streaming
    async def Streaming(self, request, context, project):
        body = Body()
        self.body = weakref.ref(body)
        raise invalid("refused")
        yield


@pytest.fixture
def no_cyclic_gc():
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def test_a_refused_unary_request_is_freed_while_its_abort_is_kept(no_cyclic_gc):
    servicer = Servicer()
    with pytest.raises(grpc.aio.AbortError) as kept:
        await servicer.Unary(None, Context())
    assert kept.value.__context__ is not None
    assert servicer.body() is None


async def test_a_refused_streaming_request_is_freed_while_its_abort_is_kept(no_cyclic_gc):
    servicer = Servicer()
    with pytest.raises(grpc.aio.AbortError) as kept:
        async for _ in servicer.Streaming(None, Context()):
            pass
    assert kept.value.__context__ is not None
    assert servicer.body() is None
