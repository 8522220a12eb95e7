"""Request bytes: size-checked and parsed by the server itself, on every service of the port.

gRPC Python deserializes a request before any handler runs and answers bytes that are not
the method's protobuf message with a bare UNKNOWN or INTERNAL plus a server-side
traceback, which reads as a server bug. :class:`MalformedRequestInterceptor` registers
every method with raw bytes in and out, and its wrapper:

- refuses a control call (health, readiness, metadata, model lists) whose request is over
  :data:`CONTROL_MESSAGE_BYTES` before parsing it: those requests are a few bytes, and a
  huge one must not hold the event loop that answers probes;
- reads a scoring call's request itself (the call is registered request-streaming, which
  the wire does not show), only once the room for it is reserved (:mod:`densemap.service.server.
  uploads`: a call that finds none is refused before its body is read), and drops the
  received bytes once parsed; a scoring stream's (:data:`SCORING_STREAMS`) each message too;
- reserves, for any other call, :data:`REQUEST_COPIES` times its request's size in the
  server's memory budget (:mod:`densemap.service.server.memory_budget`) before parsing it, held
  until the call is done (a stream's message: until the next one is read): a request that
  does not fit is RESOURCE_EXHAUSTED before it is copied any further;
- parses the request, and ends an unparsable one with INVALID_ARGUMENT through the status
  table like every other error;
- sends responses a handler already serialized (scoring calls serialize on their thread,
  not on the event loop) as they are, and serializes the others.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable

import grpc

from densemap.service.errors import DensemapError
from densemap.service.server.memory_budget import REQUEST_COPIES, MemoryBudget, Reservation
from densemap.service.server.status import MalformedRequest, abort, drop_frames
from densemap.service.server.uploads import Uploads

CONTROL_MESSAGE_BYTES = 64 * 1024  # largest request of a control call
CONTROL_METHODS = frozenset(
    (
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
        "/inference.GRPCInferenceService/ModelReady",
        "/inference.GRPCInferenceService/ServerMetadata",
        "/inference.GRPCInferenceService/ModelMetadata",
        "/densemap.v1.Densemap/ListModels",
        "/densemap.v1.Densemap/GetModel",
    )
)
# streams whose messages are scoring requests: each read only once its room is reserved
SCORING_STREAMS = frozenset(("/densemap.v1.Densemap/ScoreStream",))


def _parser(method: str, deserialize: Callable[[bytes], object], memory: MemoryBudget):
    control = method in CONTROL_METHODS
    limit = CONTROL_MESSAGE_BYTES if control else None

    async def parse(
        raw: bytes, context, *, reserve: bool = True
    ) -> tuple[object, Reservation | None]:
        """(the request, its bytes' reservation in the memory budget or None; ``reserve``
        False: the caller holds one already)."""
        if limit is not None and len(raw) > limit:
            await abort(
                context,
                MalformedRequest(
                    f"the request to {method} is {len(raw)} bytes, over the limit of {limit} "
                    "for this call (it needs a few bytes: a name at most)"
                ),
            )
        reservation = None
        if reserve and not control:
            try:
                reservation = memory.reserve(REQUEST_COPIES * len(raw))
            except DensemapError as exc:
                await abort(context, exc)
        try:
            return deserialize(raw), reservation
        except Exception:
            if reservation is not None:
                reservation.release()
            await abort(
                context,
                MalformedRequest(
                    f"the request is not a valid protobuf message for {method}: send it with "
                    "stubs generated from the server's .proto files (grpcurl and reflection "
                    "describe them)"
                ),
            )

    return parse


def _serializer(serialize: Callable[[object], bytes] | None) -> Callable[[object], bytes]:
    def send(response) -> bytes:
        if isinstance(response, bytes) or serialize is None:
            return response
        return serialize(response)

    return send


async def _parse_each(raw_requests, parse, context) -> AsyncIterator[object]:
    """A stream's requests; each one's reservation is released once the next is asked for
    (the handler is done with it) or the stream ends."""
    reservation = None
    try:
        async for raw in raw_requests:
            if reservation is not None:
                reservation.release()
            request, reservation = await parse(raw, context)
            yield request
    finally:
        if reservation is not None:
            reservation.release()


async def _receive_each(uploads: Uploads, raw_requests, parse, context) -> AsyncIterator[object]:
    """A scoring stream's requests, each read only once ``uploads`` has reserved room for
    it (an idle stream holds that room while it waits: :meth:`Uploads.receive_next`); each
    one's reservation is released once the next is asked for, or the stream ends (one
    done-callback for the whole stream, whichever message it holds then)."""
    held: list[Reservation] = []  # the reservation of the message being handled, if any

    def release_held(_context=None) -> None:
        while held:
            held.pop().release()

    context.add_done_callback(release_held)
    try:
        while True:
            release_held()
            try:
                received = await uploads.receive_next(context, raw_requests)
            except DensemapError as exc:
                await abort(context, exc)
            if received is None:
                return
            raw, reservation = received
            held.append(reservation)
            request, _ = await parse(raw, context, reserve=False)
            del raw, received, reservation
            yield request
    finally:
        release_held()


def _wrap(behavior, parse, *, streaming_in: bool, uploads: Uploads | None = None):
    """``behavior`` with parsed requests: a coroutine (unary response or writer API) or an
    async generator (streamed responses), as gRPC's aio server accepts them; a request
    stream read through ``uploads`` when given (a scoring stream)."""

    async def request_of(raw, context):
        if streaming_in:
            if uploads is not None:
                return _receive_each(uploads, aiter(raw), parse, context)
            return _parse_each(raw, parse, context)
        request, reservation = await parse(raw, context)
        if reservation is not None:
            context.add_done_callback(lambda _context: reservation.release())
        return request

    if inspect.isasyncgenfunction(behavior):

        async def generate(raw, context):
            async for response in behavior(await request_of(raw, context), context):
                yield response

        return generate

    async def run(raw, context):
        return await behavior(await request_of(raw, context), context)

    return run


def _read_in_handler(behavior, parse, uploads: Uploads):
    """A unary call's behavior registered as request-streaming: it reads its one message
    itself (``context.read``), once ``uploads`` has reserved room for it, so no gRPC frame
    keeps the request's bytes alive once they are parsed (a unary handler's caller holds
    them for the whole call), and no body is received before its room is."""

    async def run(_requests, context):
        try:
            raw, _reservation = await uploads.receive(context)  # released when done
        except DensemapError as exc:
            await abort(context, exc)
        request, _ = await parse(raw, context, reserve=False)
        del raw
        handled = behavior(request, context)
        del request  # held by the handler's frames only, which an error clears
        try:
            return await handled
        except BaseException as exc:  # AbortError included: gRPC keeps it past the call
            drop_frames(exc)
            raise

    return run


def parsing_handler(
    handler: grpc.RpcMethodHandler,
    method: str,
    memory: MemoryBudget,
    uploads: Uploads,
) -> grpc.RpcMethodHandler:
    parse = _parser(method, handler.request_deserializer, memory)
    serializer = _serializer(handler.response_serializer)
    if not (handler.request_streaming or handler.response_streaming or method in CONTROL_METHODS):
        behavior = _read_in_handler(handler.unary_unary, parse, uploads)
        return grpc.stream_unary_rpc_method_handler(behavior, response_serializer=serializer)
    kind = (
        ("stream" if handler.request_streaming else "unary")
        + "_"
        + ("stream" if handler.response_streaming else "unary")
    )
    behavior = _wrap(
        getattr(handler, kind),
        parse,
        streaming_in=handler.request_streaming,
        uploads=uploads if method in SCORING_STREAMS else None,
    )
    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    return factory(behavior, response_serializer=serializer)


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Parse requests inside the handler, so undecodable bytes get INVALID_ARGUMENT, after
    reserving their bytes in ``memory``; a unary scoring call's body is
    read only once ``uploads`` has reserved room for it."""

    def __init__(self, memory: MemoryBudget, uploads: Uploads) -> None:
        self._memory = memory
        self._uploads = uploads

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return parsing_handler(handler, handler_call_details.method, self._memory, self._uploads)
