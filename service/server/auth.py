"""Optional bearer-token check for every RPC except health and reflection (open for probes).

Clients send the metadata ``authorization: Bearer <token>`` (tritonclient:
``headers={"authorization": "Bearer <token>"}``). A missing or wrong token ends the call
with UNAUTHENTICATED, through the status table like every other error.
"""

from __future__ import annotations

import hmac

import grpc

from service.server.status import Unauthenticated, status_for

OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def _deny_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler that ends the call UNAUTHENTICATED at once. It is request-streaming, so
    gRPC runs it without waiting for the request body: a caller without the token gets
    nothing held for it, not even the bytes of its request."""
    code, details = status_for(Unauthenticated(message))

    async def deny(_requests, context):
        await context.abort(code, details)

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    return grpc.stream_unary_rpc_method_handler(deny)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` (constant-time compare)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICES):
            return handler
        sent = [
            value
            for key, value in handler_call_details.invocation_metadata or ()
            if key == "authorization"
        ]
        if not sent:
            return _deny_handler(
                handler,
                "this server requires a bearer token: send the metadata "
                "'authorization: Bearer <token>'",
            )
        value = sent[0].encode() if isinstance(sent[0], str) else sent[0]
        if not hmac.compare_digest(value, self._expected):
            return _deny_handler(
                handler, "the bearer token is wrong: check the token the server was given"
            )
        return handler
