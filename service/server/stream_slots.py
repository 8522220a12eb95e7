"""Long-lived health Watch and reflection streams hold an admission slot, like scoring calls.

The sync gRPC server runs each open stream in one of its ``--workers`` handler threads for
as long as the stream lives. A ``grpc.health.v1.Health/Watch`` (what gRPC's client-side
health checking opens per connection) or an idle reflection stream would otherwise hold a
thread forever, and ``--workers`` of them starve every other call, health checks
included, which then hang. Holding one of :class:`~service.server.limits.Admission`'s
global slots (``--workers`` - 4, shared with scoring calls) keeps the reserved threads
free; beyond the cap a new stream gets RESOURCE_EXHAUSTED at once.
"""

from __future__ import annotations

import grpc

from service.server.limits import Admission
from service.server.status import abort

LONG_STREAMS = frozenset(
    (
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    )
)


def _holding_slot(behavior, admission: Admission):
    def streaming(request_or_iterator, context):
        slot = admission.call_slot()
        try:
            slot.__enter__()
        except Exception as exc:
            abort(context, exc)
        try:
            yield from behavior(request_or_iterator, context)
        finally:
            slot.__exit__(None, None, None)

    return streaming


class StreamSlotInterceptor(grpc.ServerInterceptor):
    """Make each long-lived stream of :data:`LONG_STREAMS` hold a global admission slot."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method not in LONG_STREAMS:
            return handler
        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(
                _holding_slot(handler.stream_stream, self._admission),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_stream_rpc_method_handler(
            _holding_slot(handler.unary_stream, self._admission),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
