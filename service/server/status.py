"""The ONE table from densemap errors to gRPC status codes, and the server-side errors.

Both APIs (densemap.v1 and KServe v2) and the auth interceptor decide status codes only
through :func:`status_for`. An error that is not in the table is a bug: it becomes INTERNAL
with an incident id; the traceback goes to the server log, never to the client.
"""

from __future__ import annotations

import logging
import traceback
import uuid

import grpc

from densemap.service.errors import (
    Cancelled,
    ConversionError,
    DensemapError,
    ImageTooLarge,
    InvalidImage,
    InvalidOption,
    ModelLoadError,
    ModelNotFound,
)

log = logging.getLogger("densemap.server")

MAX_DETAILS_CHARS = 2000  # a status message stays readable (and small) whatever it quotes


class ServerBusy(DensemapError):
    """Too many requests running or queued: backpressure instead of unbounded memory."""


class MalformedRequest(DensemapError):
    """The request bytes are not the method's protobuf message."""


class ResponseTooLarge(DensemapError):
    """The response would exceed the server's message size limit (--max-message-mb)."""


class NotServing(DensemapError):
    """The server is still loading its models, or drains before shutting down."""


class StreamIdle(DensemapError):
    """A stream's client sent no request for --stream-idle-seconds: the stream is closed."""


class DeadlineExceeded(Cancelled):
    """The caller's deadline passed before the work started or finished."""


class Unauthenticated(DensemapError):
    """The call carries no valid bearer token."""


class Unsupported(DensemapError):
    """An RPC of the protocol this server does not serve (Triton-only extensions)."""


# First match wins: subclasses come before their bases.
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidImage, grpc.StatusCode.INVALID_ARGUMENT),  # includes ImageTooSmall
    (InvalidOption, grpc.StatusCode.INVALID_ARGUMENT),
    (MalformedRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (ImageTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ServerBusy, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ResponseTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (MemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotServing, grpc.StatusCode.UNAVAILABLE),
    (StreamIdle, grpc.StatusCode.UNAVAILABLE),  # reopen a stream when there is work
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (Unsupported, grpc.StatusCode.UNIMPLEMENTED),
    (ModelLoadError, grpc.StatusCode.FAILED_PRECONDITION),  # broken model: fix it, reload
    (ConversionError, grpc.StatusCode.INTERNAL),
)

_MEMORY_MESSAGE = (
    "the server ran out of memory for this request: send a smaller image, fewer scales or "
    "a coarser output stride"
)


def drop_frames(exc: BaseException) -> None:
    """Free what the finished frames of ``exc``'s traceback (and its causes') hold: a
    failed call's request, image, maps. A failed call's frames stay referenced from
    cycles (the traceback and the scoring thread's future; gRPC's abort error and the
    call's state) that only Python's cyclic garbage collector frees, and big buffers do
    not make it run: refused requests stayed resident after their calls ended."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for ``exc`` (logs unexpected errors)."""
    for error_class, code in STATUS_TABLE:
        if isinstance(exc, error_class):
            if isinstance(exc, MemoryError):
                return code, _MEMORY_MESSAGE
            message = str(exc) or error_class.__name__
            if code is grpc.StatusCode.INTERNAL:
                return code, _log_incident(exc)
            return code, _truncate(message)
    return grpc.StatusCode.INTERNAL, _log_incident(exc)


def _log_incident(exc: BaseException) -> str:
    incident = uuid.uuid4().hex[:12]
    log.error("internal error, incident %s", incident, exc_info=exc)
    return (
        f"internal server error (incident {incident}): the server log has the details under "
        "this incident id; please report it"
    )


def _truncate(message: str) -> str:
    if len(message) <= MAX_DETAILS_CHARS:
        return message
    return message[: MAX_DETAILS_CHARS - 15] + " ...(truncated)"


def quote_name(name: str, limit: int = 80) -> str:
    """A client-supplied name, quoted and shortened for messages and logs."""
    return repr(name if len(name) <= limit else name[:limit] + "...")


async def abort(context, exc: BaseException) -> None:
    """End an aio call with the status of ``exc`` (raises, as ``context.abort`` does)."""
    code, message = status_for(exc)
    await context.abort(code, message)
