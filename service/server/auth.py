"""Optional bearer-token check for every RPC except health and reflection (open for probes).

Clients send the metadata ``authorization: Bearer <token>`` (tritonclient:
``headers={"authorization": "Bearer <token>"}``); the scheme is case-insensitive
(``bearer``, ``BEARER``: RFC 6750), the token is not. A missing or wrong token ends the call
with UNAUTHENTICATED, through the status table like every other error.
"""

from __future__ import annotations

import hmac

import grpc

from densemap.service.server.status import Unauthenticated, status_for

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


def bearer_token(value: str | bytes) -> bytes | None:
    """The token of an ``authorization`` value ``Bearer <token>``, or None when its scheme
    is another. RFC 6750 (after RFC 7235): the scheme is case-insensitive ("bearer",
    "BEARER"), one or more spaces follow it; the token itself is compared exactly."""
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else bytes(value)
    scheme, _, token = raw.strip(b" \t").partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.lstrip(b" ")


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` (constant-time compare)."""

    def __init__(self, token: str) -> None:
        self._expected = token.encode()

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
        token = bearer_token(sent[0])
        if token is None:
            return _deny_handler(
                handler,
                "the authorization metadata is not a bearer token: send "
                "'authorization: Bearer <token>'",
            )
        if not hmac.compare_digest(token, self._expected):
            return _deny_handler(
                handler, "the bearer token is wrong: check the token the server was given"
            )
        return handler
