"""Request bodies: room in the server's memory budget is reserved BEFORE gRPC reads one.

gRPC receives a whole request message before a handler sees it, so every upload being
received held up to twice its size outside the budget until its handler could reserve
or refuse it, however many clients uploaded at once (docs/server.md "Memory,
server-wide" has the measurements). Now, for Score and ModelInfer (the calls whose
requests may be large):

- they are registered request-streaming (``malformed.py``; a unary request is a stream of
  one message on the wire, so stock clients, tritonclient included, see no difference),
  and nothing asks gRPC for the message until :meth:`Uploads.receive` has reserved
  :meth:`Uploads.upload_bytes`: REQUEST_COPIES times ``--max-message-mb``, what the
  largest message costs while it is received and parsed (capped at all the budget has
  for requests: then one upload at a time);
- until then gRPC takes at most the stream's HTTP/2 flow-control window of the body
  (64 KiB: the server turns grpc's BDP probing off, with which the window of new streams
  grew to 4 MiB, measured), however large the message. Once the message is asked for,
  grpc opens the window 1 MiB at a time ahead of what arrived;
- a call that finds no room waits for one up to ADMIT_WAIT_SECONDS (an honest burst of
  small requests frees room within milliseconds, as each message arrives and its room
  shrinks to its size), then is refused with RESOURCE_EXHAUSTED, its body unread past that
  window: a waiting call holds no body, only its headers;
- once the message is in, the reservation shrinks to REQUEST_COPIES times its size, and
  the call goes on (its maps and response are reserved once their size is known);
- a body still arriving ``--upload-grace-seconds`` (DEFAULT_UPLOAD_GRACE_SECONDS) after its
  room was reserved may be ended: when a call finds no room for its upload, the oldest
  such upload is ended with RESOURCE_EXHAUSTED saying why, and its room goes to the
  newcomer; when a call is refused later, for its maps' room, the oldest is ended too,
  so that a retry finds room. So
  calls that send headers and never a body, or drip it, hold the room for uploads at most
  that long while other calls want it; an upload that nobody waits for is never cut.

Everything here runs on the server's event loop; reservations themselves are thread-safe
(:mod:`densemap.service.server.memory_budget`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from densemap.service.engine.cost import describe
from densemap.service.server.config import DEFAULT_UPLOAD_GRACE_SECONDS
from densemap.service.server.memory_budget import REQUEST_COPIES, MemoryBudget, Reservation
from densemap.service.server.status import MalformedRequest, ServerBusy

ADMIT_WAIT_SECONDS = 1.0  # how long a call waits for an upload's room, before refusal
POLL_SECONDS = 0.01


@dataclass
class _Upload:
    """One body being received: since when, and the event that ends it."""

    started: float
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class Uploads:
    """The request bodies being received, each within a reservation of the budget."""

    def __init__(
        self,
        memory: MemoryBudget,
        *,
        max_message_bytes: int,
        grace_seconds: float = DEFAULT_UPLOAD_GRACE_SECONDS,
    ) -> None:
        self.memory = memory
        self.max_message_bytes = max_message_bytes
        self.grace_seconds = grace_seconds
        self._pending: list[_Upload] = []  # oldest first
        self._loop: asyncio.AbstractEventLoop | None = None  # the server's, once a call came
        memory.on_shortage = self._on_shortage

    @property
    def pending(self) -> int:
        """Bodies being received now."""
        return len(self._pending)

    def upload_bytes(self) -> int:
        """What one upload reserves before its message is read."""
        return max(min(REQUEST_COPIES * self.max_message_bytes, self.memory.for_requests), 1)

    async def receive(self, context) -> tuple[bytes, Reservation]:
        """The call's one request message, read only once its room is reserved; and that
        reservation, trued up to the message's size and released when the call is done."""
        raw, reservation = await self._receive(context, context.read)
        if raw is grpc.aio.EOF:
            reservation.release()
            raise MalformedRequest("the call ended before its request was sent")
        context.add_done_callback(lambda _context: reservation.release())
        return raw, reservation

    async def receive_next(
        self, context, requests: AsyncIterator[bytes]
    ) -> tuple[bytes, Reservation] | None:
        """A stream's next raw request from ``requests`` (gRPC's iterator, which reads a
        message only when asked, idle timeout included), taken only once its room is
        reserved, and that reservation (the caller releases it when the message's work is
        done or the call ends); None once the client has sent its last. An idle stream
        holds the room while it waits: past the grace it is ended, like any upload, when
        another call needs the room."""

        async def read() -> object:
            try:
                return await anext(requests)
            except StopAsyncIteration:
                return grpc.aio.EOF

        raw, reservation = await self._receive(context, read)
        if raw is grpc.aio.EOF:
            reservation.release()
            return None
        return raw, reservation

    async def _receive(
        self, context, read_message: Callable[[], Awaitable[object]]
    ) -> tuple[object, Reservation]:
        """The next message (or EOF) read once its room is reserved, and that reservation:
        the caller's to release, unless this raises (then it is released here)."""
        self._loop = asyncio.get_running_loop()
        reservation = await self._admit()
        try:
            raw = await self._read_within_grace(read_message)
            if raw is not grpc.aio.EOF:
                reservation.resize(REQUEST_COPIES * len(raw))  # ServerBusy when it grows
        except BaseException:
            reservation.release()
            raise
        return raw, reservation

    async def _read_within_grace(self, read_message: Callable[[], Awaitable[object]]) -> object:
        """``read_message()``, ended (ServerBusy) when another call needs its room past the
        grace."""
        upload = _Upload(time.monotonic())
        self._pending.append(upload)
        read = asyncio.ensure_future(read_message())
        ended = asyncio.ensure_future(upload.ended.wait())
        try:
            await asyncio.wait({read, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._pending.remove(upload)
            ended.cancel()
            cut = not read.done()
            if cut:  # ended, or this call was cancelled: gRPC ends the read with the call
                read.cancel()
        if cut:
            raise ServerBusy(
                f"the request had not arrived {time.monotonic() - upload.started:.1f} s after "
                "the server reserved memory for it, and another call needed that memory "
                f"(--upload-grace-seconds {self.grace_seconds:g}): send the request at once "
                "and faster, or retry when the server is less busy"
            )
        return read.result()

    async def _admit(self) -> Reservation:
        """Reserve one upload's room; when there is none, end the oldest upload past its
        grace (its room comes back when its call ends), and wait for room up to
        ADMIT_WAIT_SECONDS; then refuse."""
        nbytes = self.upload_bytes()
        give_up = time.monotonic() + ADMIT_WAIT_SECONDS
        while True:
            try:
                return self.memory.reserve(nbytes, tell_shortage=False)
            except ServerBusy:
                if time.monotonic() > give_up:
                    raise self._busy(nbytes) from None
                self._end_oldest_stale()  # one past its grace that is not being ended yet
                await asyncio.sleep(POLL_SECONDS)

    def _on_shortage(self) -> None:
        """A call (on any thread) was refused for room that others hold, e.g. for its maps
        after its upload: end the oldest upload past its grace, so a retry finds room."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._end_oldest_stale)

    def _end_oldest_stale(self) -> None:
        stale = self._stale()
        if stale is not None:
            stale.ended.set()

    def _stale(self) -> _Upload | None:
        """The oldest upload past its grace that is not already being ended."""
        cutoff = time.monotonic() - self.grace_seconds
        for upload in self._pending:
            if upload.started > cutoff:
                return None
            if not upload.ended.is_set():
                return upload
        return None

    def _busy(self, nbytes: int) -> ServerBusy:
        memory = self.memory
        return ServerBusy(
            f"the server's memory for requests is in use ({describe(memory.reserved)} of "
            f"{describe(memory.for_requests)}, --memory-limit; {self.pending} request(s) "
            "being received, responses not yet read by their clients count too): a request "
            f"is received only once {describe(nbytes)} is free for it (twice --max-message-mb,"
            " the largest request): retry later with backoff, or on another replica"
        )
