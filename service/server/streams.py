"""Open streams: their own threads, a cap in all and per peer, and an idle timeout.

The sync gRPC server runs each open stream in one handler thread for as long as it lives,
whether or not the client sends anything. So the streams of :data:`STREAMS` (ScoreStream,
health ``Watch``, reflection) run on a thread pool of their own (``--max-streams`` threads
plus a few that answer refusals), never on the scoring or control threads, and:

- at most ``--max-streams`` are open at once, and ``--max-streams-per-peer`` from one
  client address; beyond, a new stream gets RESOURCE_EXHAUSTED at once;
- a stream whose client sends no request for ``--stream-idle-seconds`` ends with
  UNAVAILABLE saying so (:class:`IdleTimeoutReader`), and an idle stream ends as soon as
  the server drains;
- an open stream holds no scoring slot: a ScoreStream takes one only while one of its
  images is scored (``DensemapServicer.ScoreStream``).
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc

from service.errors import DensemapError
from service.server.status import ServerBusy, StreamIdle, abort

SCORE_STREAM = "/densemap.v1.Densemap/ScoreStream"
STREAMS = frozenset(
    (
        SCORE_STREAM,
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    )
)
REFUSAL_THREADS = 4  # stream threads beyond --max-streams, so refusals answer at once
POLL_SECONDS = 0.25  # an idle stream re-checks the drain this often
_END = object()


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


class IdleTimeoutReader:
    """Iterate a stream's requests so that waiting for the next one can time out.

    A helper thread reads one request each time the handler asks for one (no read-ahead,
    so no request waits in memory); the handler waits at most ``idle_seconds``, then
    raises :class:`StreamIdle`, or the error ``stopping()`` returns (a drain) sooner.
    """

    def __init__(
        self,
        requests: Iterator[object],
        *,
        idle_seconds: float,
        stopping: Callable[[], BaseException | None] = lambda: None,
    ) -> None:
        self._requests = requests
        self._idle_seconds = idle_seconds
        self._stopping = stopping
        self._wanted = threading.Semaphore(0)
        self._items: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._closed = False
        self._thread: threading.Thread | None = None

    def __iter__(self) -> IdleTimeoutReader:
        return self

    def __next__(self) -> object:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._read, name="densemap-stream-reader", daemon=True
            )
            self._thread.start()
        self._wanted.release()
        deadline = time.monotonic() + self._idle_seconds
        while True:
            left = deadline - time.monotonic()
            try:
                item = self._items.get(timeout=max(min(POLL_SECONDS, left), 0.001))
            except queue.Empty:
                error = self._stopping()
                if error is not None:
                    raise error from None
                if time.monotonic() >= deadline:
                    raise StreamIdle(
                        f"the stream sent no request for {self._idle_seconds:g} s (the "
                        "server's --stream-idle-seconds), so it was closed to free its slot: "
                        "open a new stream when you have images to send"
                    ) from None
                continue
            if item is _END:
                raise StopIteration
            if isinstance(item, BaseException):
                raise item
            return item

    def _read(self) -> None:
        while True:
            self._wanted.acquire()
            if self._closed:
                return
            try:
                item = next(self._requests)
            except StopIteration:
                item = _END
            except BaseException as exc:  # the client cancelled, or a malformed request
                item = exc
            self._items.put(item)
            if item is _END or isinstance(item, BaseException):
                return

    def close(self) -> None:
        """Let the helper thread go (it also ends by itself when the call ends)."""
        self._closed = True
        self._wanted.release()


class StreamInterceptor(grpc.ServerInterceptor):
    """Run each stream of :data:`STREAMS` on the stream threads, within the limits."""

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
        self.pool = futures.ThreadPoolExecutor(
            max_workers=limits.max_streams + REFUSAL_THREADS, thread_name_prefix="densemap-stream"
        )

    def _limited(self, behavior, *, reads: bool):
        def streaming(request_or_iterator, context):
            slot = self.limits.slot(context.peer())
            try:
                slot.__enter__()
            except DensemapError as exc:
                abort(context, exc)
            reader = None
            if reads:
                reader = IdleTimeoutReader(
                    request_or_iterator, idle_seconds=self._idle_seconds, stopping=self._stopping
                )
                request_or_iterator = reader
            try:
                yield from behavior(request_or_iterator, context)
            except DensemapError as exc:
                abort(context, exc)
            finally:
                if reader is not None:
                    reader.close()
                slot.__exit__(None, None, None)

        streaming.experimental_thread_pool = self.pool  # gRPC runs the call on this pool
        return streaming

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method not in STREAMS:
            return handler
        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._limited(handler.stream_stream, reads=True),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_stream_rpc_method_handler(
            self._limited(handler.unary_stream, reads=False),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
