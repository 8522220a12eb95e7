"""Open streams: a cap in all and per peer, and an idle timeout.

On the aio server an open stream holds no thread, but it holds a slot of its client's
connection and a little memory for as long as it lives. So the streams of :data:`STREAMS`
(ScoreStream, health ``Watch``, reflection):

- at most ``--max-streams`` are open at once, and ``--max-streams-per-peer`` from one
  client address; beyond, a new stream gets RESOURCE_EXHAUSTED at once;
- a stream whose client sends no request for ``--stream-idle-seconds`` ends with
  UNAVAILABLE saying so (:func:`idle_limited`), and an idle stream ends as soon as
  the server drains;
- an open stream holds no scoring slot: a ScoreStream takes one only while one of its
  images is scored (``DensemapServicer.ScoreStream``).
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import grpc

from densemap.service.errors import DensemapError
from densemap.service.server.status import ServerBusy, StreamIdle, abort

SCORE_STREAM = "/densemap.v1.Densemap/ScoreStream"
STREAMS = frozenset(
    (
        SCORE_STREAM,
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    )
)
POLL_SECONDS = 0.25  # an idle stream re-checks the drain this often


def peer_host(peer: str) -> str:
    """``context.peer()`` without its port: "ipv4:10.0.0.7:51234" -> "ipv4:10.0.0.7"."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in address:
        address = address.rsplit(":", 1)[0]
    return f"{kind}:{address}"


class StreamLimits:
    """Open streams in all and per client address."""

    def __init__(self, *, max_streams: int, max_per_peer: int) -> None:
        self.max_streams = max_streams
        self.max_per_peer = max_per_peer
        self._lock = threading.Lock()
        self._peers: collections.Counter[str] = collections.Counter()

    @property
    def open(self) -> int:
        with self._lock:
            return sum(self._peers.values())

    @contextmanager
    def slot(self, peer: str) -> Iterator[None]:
        host = peer_host(peer)
        with self._lock:
            total = sum(self._peers.values())
            if total >= self.max_streams:
                raise ServerBusy(
                    f"the server already has {total} open streams (limit --max-streams "
                    f"{self.max_streams}): close idle streams, or retry later with backoff"
                )
            if self._peers[host] >= self.max_per_peer:
                raise ServerBusy(
                    f"this client address already has {self._peers[host]} open streams (limit "
                    f"--max-streams-per-peer {self.max_per_peer}): send more images over one "
                    "stream, or close the streams you do not use"
                )
            self._peers[host] += 1
        try:
            yield
        finally:
            with self._lock:
                self._peers[host] -= 1
                if self._peers[host] <= 0:
                    del self._peers[host]


async def idle_limited(
    requests: AsyncIterator[object],
    *,
    idle_seconds: float,
    stopping: Callable[[], BaseException | None] = lambda: None,
) -> AsyncIterator[object]:
    """A stream's requests, read one at a time as the handler asks (no read-ahead, so no
    request waits in memory); waiting for one raises :class:`StreamIdle` after
    ``idle_seconds``, or the error ``stopping()`` returns (a drain) within POLL_SECONDS."""
    iterator = aiter(requests)
    while True:
        pending = asyncio.ensure_future(anext(iterator))
        deadline = time.monotonic() + idle_seconds
        try:
            while not pending.done():
                left = deadline - time.monotonic()
                await asyncio.wait({pending}, timeout=max(min(POLL_SECONDS, left), 0.001))
                if pending.done():
                    break
                error = stopping()
                if error is not None:
                    raise error
                if time.monotonic() >= deadline:
                    raise StreamIdle(
                        f"the stream sent no request for {idle_seconds:g} s (the server's "
                        "--stream-idle-seconds), so it was closed to free its slot: open a "
                        "new stream when you have images to send"
                    )
        finally:
            if not pending.done():
                pending.cancel()
        try:
            item = pending.result()
        except StopAsyncIteration:
            return
        yield item


class StreamInterceptor(grpc.aio.ServerInterceptor):
    """Hold each stream of :data:`STREAMS` within the limits, with the idle timeout."""

    def __init__(
        self,
        limits: StreamLimits,
        *,
        idle_seconds: float,
        stopping: Callable[[], BaseException | None] = lambda: None,
    ) -> None:
        self.limits = limits
        self._idle_seconds = idle_seconds
        self._stopping = stopping

    def _limited(self, behavior, *, reads: bool):
        generates = inspect.isasyncgenfunction(behavior)

        @asynccontextmanager
        async def opened(request_or_iterator, context):
            try:
                slot = self.limits.slot(context.peer())
                slot.__enter__()
            except DensemapError as exc:
                await abort(context, exc)
            try:
                if reads:
                    request_or_iterator = idle_limited(
                        request_or_iterator,
                        idle_seconds=self._idle_seconds,
                        stopping=self._stopping,
                    )
                yield request_or_iterator
            except DensemapError as exc:
                await abort(context, exc)
            finally:
                slot.__exit__(None, None, None)

        if generates:

            async def streaming(request_or_iterator, context):
                async with opened(request_or_iterator, context) as requests:
                    async for response in behavior(requests, context):
                        yield response

            return streaming

        async def writing(request_or_iterator, context):  # the writer API (health Watch)
            async with opened(request_or_iterator, context) as requests:
                await behavior(requests, context)

        return writing

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method not in STREAMS:
            return handler
        factory = (
            grpc.stream_stream_rpc_method_handler
            if handler.request_streaming
            else grpc.unary_stream_rpc_method_handler
        )
        behavior = handler.stream_stream if handler.request_streaming else handler.unary_stream
        return factory(
            self._limited(behavior, reads=handler.request_streaming),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
