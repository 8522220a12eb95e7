"""Malformed request bytes are INVALID_ARGUMENT, on every service of the port.

gRPC Python deserializes a request before any handler runs and answers bytes that are not
the method's protobuf message with INTERNAL ("Exception deserializing request!") plus a
server-side traceback, which reads as a server bug. :class:`MalformedRequestInterceptor`
hands the raw bytes to a wrapped handler that parses them itself and ends an unparsable
request with INVALID_ARGUMENT, through the status table like every other error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import grpc

from service.server.status import MalformedRequest, status_for


def _parser(method: str, deserialize: Callable[[bytes], object]):
    def parse(raw: bytes, context: grpc.ServicerContext):
        try:
            return deserialize(raw)
        except Exception:
            code, details = status_for(
                MalformedRequest(
                    f"the request is not a valid protobuf message for {method}: send it with "
                    "stubs generated from the server's .proto files (grpcurl and reflection "
                    "describe them)"
                )
            )
            context.abort(code, details)

    return parse


def _parse_each(raw_requests: Iterable[bytes], parse, context) -> Iterator[object]:
    for raw in raw_requests:
        yield parse(raw, context)


def _parsing_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    parse = _parser(method, handler.request_deserializer)
    serializer = handler.response_serializer
    if not handler.request_streaming:
        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        behavior = getattr(handler, kind)

        def unary(raw, context):
            return behavior(parse(raw, context), context)

        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        return factory(unary, response_serializer=serializer)
    kind = "stream_stream" if handler.response_streaming else "stream_unary"
    behavior = getattr(handler, kind)

    def streaming(raw_requests, context):
        return behavior(_parse_each(raw_requests, parse, context), context)

    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    return factory(streaming, response_serializer=serializer)


class MalformedRequestInterceptor(grpc.ServerInterceptor):
    """Parse requests inside the handler, so undecodable bytes get INVALID_ARGUMENT."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _parsing_handler(handler, handler_call_details.method)
