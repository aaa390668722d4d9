"""Thin servicers: decode, call the service pipeline, encode. Nothing else lives here."""

from __future__ import annotations

import asyncio
import contextlib

from google.api import httpbody_pb2

from parley.codec import rest, typed
from parley.log import get_logger
from parley.service.event_log import EventBatch
from parley.service.responses import ResponsesService
from parley.service.sessions import SessionLimits
from parley.transport.boundary import Gate, streaming, unary
from parley.transport.intake import BodyIntake
from parley.v1 import events_pb2, items_pb2, responses_pb2, service_pb2, service_pb2_grpc

log = get_logger(__name__)


def _json_body(document) -> httpbody_pb2.HttpBody:
    return httpbody_pb2.HttpBody(content_type=rest.JSON, data=rest.encode_json(document))


def _sse_body(events: list[dict], obfuscate: bool) -> httpbody_pb2.HttpBody:
    """Events ready together travel as one message; each stays its own SSE frame."""
    return httpbody_pb2.HttpBody(content_type=rest.SSE,
                                 data=rest.encode_sse(events, getattr(events, "encoded", None), obfuscate))


def _optional(message, field: str):
    return getattr(message, field) if message.HasField(field) else None


# How many turns of the event loop a ready message waits for more of its stream's events. Each
# turn lets the producer add what the engine already delivered; under load a turn is long and
# several steps leave as one message, idle it costs microseconds.
COALESCE_TURNS = 2
# Events a stream holds for a client that reads slower than the model writes (a few hundred KiB
# at most); beyond, the pipeline is not read (backpressure). A client that takes nothing for
# SLOW_READER_SECONDS while that many wait has its generation stopped.
MAX_QUEUED_EVENTS = 1024
SLOW_READER_SECONDS = 60.0


class SlowReader(Exception):
    """The client took nothing for SLOW_READER_SECONDS while MAX_QUEUED_EVENTS waited for it."""


async def _coalesced(batches):
    """Batches that become ready together leave together, as one message.

    A producer task drains the pipeline into a queue; the writer takes everything queued,
    after giving the producer up to COALESCE_TURNS turns of the loop to add more. A stream
    whose client or Envoy is slower than the model, or a loaded server, sends fewer, larger
    messages instead of one message per engine step.
    """
    queue: asyncio.Queue = asyncio.Queue()
    queued = 0  # events in the queue
    taken = asyncio.Event()  # the writer took what was queued

    # An open stream waits here far longer than it works: no frame may keep a sent batch (its
    # events, their JSON bytes) alive while it waits, hence the `del`s and `None`s below.
    async def produce():
        nonlocal queued
        try:
            async for batch in batches:
                while queued >= MAX_QUEUED_EVENTS:
                    taken.clear()
                    try:
                        await asyncio.wait_for(taken.wait(), SLOW_READER_SECONDS)
                    except TimeoutError:
                        log.warning("stream.slow_reader", queued_events=queued, waited_s=SLOW_READER_SECONDS,
                                    action="the generation stops; what is queued is still sent")
                        await batches.aclose()  # now, not when the client reads again
                        raise SlowReader(f"the client read nothing for {SLOW_READER_SECONDS:g} s") from None
                queued += len(batch)
                queue.put_nowait(batch)
                del batch
        finally:
            queue.put_nowait(None)

    def took(item):
        nonlocal queued
        if item is not None:
            queued -= len(item)
            taken.set()
        return item

    producer = asyncio.create_task(produce())
    try:
        ended = False
        while not ended:
            batch = took(await queue.get())
            if batch is None:
                break
            merged = None
            for _ in range(COALESCE_TURNS):
                if producer.done():
                    break
                waiting = queue.qsize()
                await asyncio.sleep(0)
                if queue.qsize() == waiting:  # nothing came in that turn: the engine is not ahead
                    break
            while not queue.empty():
                more = took(queue.get_nowait())
                if more is None:
                    ended = True
                    break
                if merged is None:
                    merged = EventBatch(batch)
                    merged.encoded = list(batch.encoded)
                merged.extend(more)
                merged.encoded.extend(more.encoded)
            yield batch if merged is None else merged
            batch = merged = more = None
        await producer  # re-raises what the pipeline raised
    finally:
        if not producer.done():
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
        await batches.aclose()


async def _sse_messages(batches, obfuscate: bool):
    """The stream's SSE messages, ended by `data: [DONE]` (an Open Responses MUST; OpenAI's SDKs
    stop on it). A resume after the last event is an event stream of [DONE] alone."""
    async with contextlib.aclosing(batches):
        async for batch in batches:
            message = _sse_body(batch, obfuscate)
            del batch
            yield message
    yield httpbody_pb2.HttpBody(content_type=rest.SSE, data=rest.SSE_DONE)


async def _typed_events(batches):
    async with contextlib.aclosing(batches):
        async for batch in batches:
            for event in batch:
                yield typed.from_json(event, events_pb2.ResponseStreamEvent())


class ResponsesHttpServicer(service_pb2_grpc.ResponsesHttpServicer):
    """The REST face (through Envoy): OpenAI's JSON and SSE bytes in HttpBody messages."""

    def __init__(self, service: ResponsesService, gate: Gate, intake: BodyIntake):
        self.service = service
        self.gate = gate
        self.intake = intake

    @streaming
    async def HttpCreateResponseChunked(self, request_iterator, context, project):
        async with self.intake.body(request_iterator) as (data, content_type):
            prepared = await self.service.prepare(project, rest.decode_body(data, content_type))
            del data
        async with contextlib.aclosing(self._created(prepared)) as messages:
            async for message in messages:
                yield message

    async def _json_of(self, request_iterator):
        """A streamed request body, read within the intake's bounds and parsed."""
        async with self.intake.body(request_iterator) as (data, content_type):
            return rest.decode_body(data, content_type)

    @streaming
    async def HttpCountInputTokens(self, request_iterator, context, project):
        yield _json_body(await self.service.count_input_tokens(project, await self._json_of(request_iterator)))

    @streaming
    async def HttpCompactResponse(self, request_iterator, context, project):
        yield _json_body(await self.service.compact(project, await self._json_of(request_iterator)))

    @streaming
    async def HttpCreateResponse(self, request, context, project):
        prepared = await self.service.prepare(project, rest.decode_body(request.data, request.content_type))
        del request
        async with contextlib.aclosing(self._created(prepared)) as messages:
            async for message in messages:
                yield message

    async def _created(self, prepared):
        if not prepared.params.stream:
            yield _json_body(await self.service.create_prepared(prepared))
            return
        # aclosing: a client that goes away must stop the engine now, not when the GC runs.
        batches = _coalesced(await self.service.events_of(prepared))
        async with contextlib.aclosing(_sse_messages(batches, prepared.params.obfuscate)) as messages:
            async for message in messages:
                yield message

    @streaming
    async def HttpGetResponse(self, request, context, project):
        if not request.stream:
            yield _json_body(await self.service.get(project, request.response_id, list(request.include)))
            return
        starting_after = _optional(request, "starting_after")
        batches = self.service.follow(project, request.response_id, -1 if starting_after is None else starting_after,
                                      list(request.include))
        obfuscate = _optional(request, "include_obfuscation") is not False
        async with contextlib.aclosing(_sse_messages(batches, obfuscate)) as messages:
            async for message in messages:
                yield message

    @unary
    async def HttpDeleteResponse(self, request, context, project):
        return _json_body(await self.service.delete(project, request.response_id))

    @unary
    async def HttpCancelResponse(self, request, context, project):
        return _json_body(await self.service.cancel(project, request.response_id))

    @unary
    async def HttpListInputItems(self, request, context, project):
        return _json_body(await self.service.list_input_items(
            project, request.response_id, limit=_optional(request, "limit"), order=_optional(request, "order"),
            after=_optional(request, "after"), before=_optional(request, "before"), include=list(request.include)))

    @unary
    async def HttpListModels(self, request, context, project):
        return _json_body({"object": "list", "data": self.service.models})

    @unary
    async def HttpCreateConversation(self, request, context, project):
        body = rest.decode_body(request.body.data, request.body.content_type) if request.body.data.strip() else {}
        return _json_body(await self.service.conversations.create(project, body))

    @unary
    async def HttpGetConversation(self, request, context, project):
        return _json_body(await self.service.conversations.get(project, request.conversation_id))

    @unary
    async def HttpUpdateConversation(self, request, context, project):
        body = rest.decode_body(request.body.data, request.body.content_type)
        return _json_body(await self.service.conversations.update(project, request.conversation_id, body))

    @unary
    async def HttpDeleteConversation(self, request, context, project):
        return _json_body(await self.service.conversations.delete(project, request.conversation_id))

    @unary
    async def HttpCreateConversationItems(self, request, context, project):
        body = rest.decode_body(request.body.data, request.body.content_type)
        return _json_body(await self.service.conversations.add_items(project, request.conversation_id, body,
                                                                     list(request.include)))

    @unary
    async def HttpListConversationItems(self, request, context, project):
        return _json_body(await self.service.conversations.list_items(
            project, request.conversation_id, limit=_optional(request, "limit"), order=_optional(request, "order"),
            after=_optional(request, "after"), include=list(request.include)))

    @unary
    async def HttpGetConversationItem(self, request, context, project):
        return _json_body(await self.service.conversations.get_item(project, request.conversation_id,
                                                                    request.item_id, list(request.include)))

    @unary
    async def HttpDeleteConversationItem(self, request, context, project):
        return _json_body(await self.service.conversations.delete_item(project, request.conversation_id,
                                                                       request.item_id))


class ResponsesServicer(service_pb2_grpc.ResponsesServicer):
    """The typed face: parley.v1 messages in and out, the same pipeline underneath."""

    def __init__(self, service: ResponsesService, gate: Gate, session_limits: SessionLimits):
        self.service = service
        self.gate = gate
        self.session_limits = session_limits

    @streaming
    async def Session(self, request_iterator, context, project):
        session = self.service.open_session(project, self.session_limits, context.invocation_metadata())
        feeding = asyncio.create_task(_feed(request_iterator, session), name="session-feed")
        try:
            async for outgoing in session.outgoing():
                for message in typed.session_events(outgoing.events, outgoing.stream_id):
                    yield message
                del outgoing
        finally:
            feeding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeding
            await session.close()

    @unary
    async def CreateResponse(self, request, context, project):
        document = await self.service.create(project, typed.to_json(request))
        return typed.from_json(document, responses_pb2.Response())

    @streaming
    async def StreamCreateResponse(self, request, context, project):
        body = {**typed.to_json(request), "stream": True}  # the RPC, not a field, chooses streaming
        batches = await self.service.events_of(await self.service.prepare(project, body))
        async with contextlib.aclosing(_typed_events(batches)) as events:
            async for event in events:
                yield event

    async def StreamResponse(self, request, context):
        """The deprecated name of StreamCreateResponse."""
        async for event in self.StreamCreateResponse(request, context):
            yield event

    @unary
    async def GetResponse(self, request, context, project):
        return typed.from_json(await self.service.get(project, request.response_id, list(request.include)),
                               responses_pb2.Response())

    @unary
    async def DeleteResponse(self, request, context, project):
        return typed.from_json(await self.service.delete(project, request.response_id),
                               service_pb2.DeleteResponseResponse())

    @unary
    async def ListInputItems(self, request, context, project):
        page = await self.service.list_input_items(
            project, request.response_id, limit=_optional(request, "limit"), order=_optional(request, "order"),
            after=_optional(request, "after"), before=_optional(request, "before"), include=list(request.include))
        return typed.from_json(page, service_pb2.ListInputItemsResponse())

    @unary
    async def ListModels(self, request, context, project):
        return typed.from_json({"object": "list", "data": self.service.models}, service_pb2.ListModelsResponse())

    @unary
    async def CancelResponse(self, request, context, project):
        return typed.from_json(await self.service.cancel(project, request.response_id), responses_pb2.Response())

    @unary
    async def CountInputTokens(self, request, context, project):
        return typed.from_json(await self.service.count_input_tokens(project, typed.to_json(request)),
                               service_pb2.InputTokenCount())

    @unary
    async def CompactResponse(self, request, context, project):
        return typed.from_json(await self.service.compact(project, typed.to_json(request)),
                               service_pb2.CompactedResponse())

    @unary
    async def CreateConversation(self, request, context, project):
        return typed.from_json(await self.service.conversations.create(project, typed.to_json(request)),
                               service_pb2.Conversation())

    @unary
    async def GetConversation(self, request, context, project):
        return typed.from_json(await self.service.conversations.get(project, request.conversation_id),
                               service_pb2.Conversation())

    @unary
    async def UpdateConversation(self, request, context, project):
        body = {"metadata": dict(request.metadata)}
        return typed.from_json(await self.service.conversations.update(project, request.conversation_id, body),
                               service_pb2.Conversation())

    @unary
    async def DeleteConversation(self, request, context, project):
        return typed.from_json(await self.service.conversations.delete(project, request.conversation_id),
                               service_pb2.DeleteConversationResponse())

    @unary
    async def CreateConversationItems(self, request, context, project):
        body = {"items": typed.to_json(request)["items"]}
        page = await self.service.conversations.add_items(project, request.conversation_id, body,
                                                          list(request.include))
        return typed.from_json(page, service_pb2.ConversationItemList())

    @unary
    async def ListConversationItems(self, request, context, project):
        page = await self.service.conversations.list_items(
            project, request.conversation_id, limit=_optional(request, "limit"), order=_optional(request, "order"),
            after=_optional(request, "after"), include=list(request.include))
        return typed.from_json(page, service_pb2.ConversationItemList())

    @unary
    async def GetConversationItem(self, request, context, project):
        item = await self.service.conversations.get_item(project, request.conversation_id, request.item_id,
                                                         list(request.include))
        return typed.from_json(item, items_pb2.Item())

    @unary
    async def DeleteConversationItem(self, request, context, project):
        return typed.from_json(await self.service.conversations.delete_item(project, request.conversation_id,
                                                                            request.item_id),
                               service_pb2.Conversation())

    @streaming
    async def FollowResponse(self, request, context, project):
        starting_after = _optional(request, "starting_after")
        batches = self.service.follow(project, request.response_id, -1 if starting_after is None else starting_after)
        async with contextlib.aclosing(_typed_events(batches)) as events:
            async for event in events:
                yield event


TYPED_SERVICE = service_pb2.DESCRIPTOR.services_by_name["Responses"].full_name
HTTP_SERVICE = service_pb2.DESCRIPTOR.services_by_name["ResponsesHttp"].full_name


async def _feed(requests, session) -> None:
    """A Session's requests into it, each read once it has room; the end of the requests ends
    the session when its lanes are done."""
    requests = aiter(requests)
    while True:
        await session.room()
        if session.ended:
            return
        try:
            request = await anext(requests)
        except StopAsyncIteration:
            break
        message = {"type": "response.create", **typed.to_json(request.create)}
        if request.HasField("stream_id"):
            message["stream_id"] = request.stream_id
        if request.HasField("generate"):
            message["generate"] = request.generate
        session.receive(message, request.ByteSize())
        del request, message
    await session.finish()


def add_servicers(server, service: ResponsesService, gate: Gate, intake: BodyIntake,
                  session_limits: SessionLimits) -> list[str]:
    """Register both faces on `server`; return their full service names."""
    service_pb2_grpc.add_ResponsesServicer_to_server(ResponsesServicer(service, gate, session_limits), server)
    service_pb2_grpc.add_ResponsesHttpServicer_to_server(ResponsesHttpServicer(service, gate, intake), server)
    return [TYPED_SERVICE, HTTP_SERVICE]
