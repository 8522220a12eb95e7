"""Request bytes: size-checked and parsed by the server itself, on every service of the port.

gRPC Python deserializes a request before any handler runs and answers bytes that are not
the method's protobuf message with a bare UNKNOWN or INTERNAL plus a server-side
traceback, which reads as a server bug. :class:`MalformedRequestInterceptor` registers
every method with raw bytes in and out, and its wrapper:

- refuses a control call (health, readiness, metadata, model lists) whose request is over
  :data:`CONTROL_MESSAGE_BYTES` before parsing it: those requests are a few bytes, and a
  huge one must not hold the event loop that answers probes;
- parses the request, and ends an unparsable one with INVALID_ARGUMENT through the status
  table like every other error;
- sends responses a handler already serialized (scoring calls serialize on their thread,
  not on the event loop) as they are, and serializes the others.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable

import grpc

from service.server.status import MalformedRequest, abort

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


def _parser(method: str, deserialize: Callable[[bytes], object]):
    limit = CONTROL_MESSAGE_BYTES if method in CONTROL_METHODS else None

    async def parse(raw: bytes, context):
        if limit is not None and len(raw) > limit:
            await abort(
                context,
                MalformedRequest(
                    f"the request to {method} is {len(raw)} bytes, over the limit of {limit} "
                    "for this call (it needs a few bytes: a name at most)"
                ),
            )
        try:
            return deserialize(raw)
        except Exception:
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
    async for raw in raw_requests:
        yield await parse(raw, context)


def _wrap(behavior, parse, *, streaming_in: bool):
    """``behavior`` with parsed requests: a coroutine (unary response or writer API) or an
    async generator (streamed responses), as gRPC's aio server accepts them."""

    async def request_of(raw, context):
        return _parse_each(raw, parse, context) if streaming_in else await parse(raw, context)

    if inspect.isasyncgenfunction(behavior):

        async def generate(raw, context):
            async for response in behavior(await request_of(raw, context), context):
                yield response

        return generate

    async def run(raw, context):
        return await behavior(await request_of(raw, context), context)

    return run


def parsing_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    parse = _parser(method, handler.request_deserializer)
    kind = (
        ("stream" if handler.request_streaming else "unary")
        + "_"
        + ("stream" if handler.response_streaming else "unary")
    )
    behavior = _wrap(getattr(handler, kind), parse, streaming_in=handler.request_streaming)
    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    return factory(behavior, response_serializer=_serializer(handler.response_serializer))


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Parse requests inside the handler, so undecodable bytes get INVALID_ARGUMENT."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return parsing_handler(handler, handler_call_details.method)
