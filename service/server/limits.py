"""Backpressure, deadlines, cancellation and the serving state (loading, ready, draining).

- :class:`ServingState`: whether new calls are accepted, and how many are in flight (a
  call counts until gRPC reports it terminated, so a drain waits for responses to be sent).
- :class:`Admission`: a global cap on scoring calls (so each admitted call has a scoring
  thread and refusals answer at once), then per model a max in-flight count and a bounded
  FIFO queue. Beyond both: RESOURCE_EXHAUSTED at once, never unbounded memory.
- :class:`CallGuard`: the ``cancel`` hook passed to ``Engine.score``; it turns a client
  that went away or a passed deadline into CANCELLED / DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from densemap.service.errors import Cancelled
from densemap.service.server.status import (
    DeadlineExceeded,
    NotServing,
    ServerBusy,
    quote_name,
    status_for,
)

QUEUE_POLL_SECONDS = 0.05  # queued calls re-check cancellation and deadline this often


class CallGuard:
    """Cancel hook of one call: true once the client cancelled or went away, the deadline
    passed, or the drain's grace ended (``ServingState.cut``).

    Made on the event loop (:meth:`for_context`), read from the scoring thread: the loop
    sets ``gone`` when gRPC ends the call (a cancel, a lost connection, the deadline)."""

    def __init__(self, deadline: float = math.inf, state: ServingState | None = None) -> None:
        self._deadline = deadline  # time.monotonic() seconds
        self._state = state
        self._gone = threading.Event()

    @classmethod
    def for_context(cls, context, state: ServingState | None = None) -> CallGuard:
        """The guard of an aio call: its deadline, and ``gone`` once gRPC ends the call."""
        remaining = context.time_remaining()
        deadline = math.inf if remaining is None else time.monotonic() + remaining
        guard = cls(deadline, state)
        context.add_done_callback(lambda _context: guard.cancel())
        return guard

    def cancel(self) -> None:
        """The call ended (the client cancelled or left): the work stops at its next check."""
        self._gone.set()

    def __call__(self) -> bool:
        if self._state is not None and self._state.cut_message is not None:
            return True
        if time.monotonic() >= self._deadline:
            return True
        return self._gone.is_set()

    def remaining(self) -> float:
        return self._deadline - time.monotonic()

    def error(self) -> Cancelled | NotServing:
        if self._state is not None and self._state.cut_message is not None:
            return NotServing(self._state.cut_message)
        if self.remaining() <= 0:  # once passed, a deadline stays passed
            return DeadlineExceeded(
                "the call's deadline passed before scoring finished: allow a longer deadline, "
                "send a smaller image, or retry when the server is less busy"
            )
        return Cancelled("the client cancelled the call; the work was stopped")

    def stop_code(self) -> grpc.StatusCode:
        """The code to count for a call gRPC ended under us (cancelled or past deadline)."""
        return status_for(self.error())[0]

    def check(self) -> None:
        """Raise the matching error when the call should not go on."""
        if self():
            raise self.error()


class ServingState:
    """Loading -> ready -> draining, and the count of calls in flight."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.ready = False
        self.draining = False
        self.cut_message: str | None = None
        self.unusable: str | None = None  # why the server can never become ready as started
        # loaded, but not ready: why (no model served, a --require-models one missing)
        self.readiness_problem: str | None = None
        self._active = 0

    @property
    def ready_for_traffic(self) -> bool:
        """What readiness, "" and KServe ServerReady say: loaded, serving at least one
        model and every required one, and not draining. (``ready`` alone means loaded:
        calls are answered, those for a model not served with NOT_FOUND.)"""
        return self.ready and not self.draining and self.readiness_problem is None

    def set_ready(self, ready: bool) -> None:
        with self._cond:
            self.ready = ready

    def begin_drain(self) -> None:
        with self._cond:
            self.draining = True

    def cut(self, message: str) -> None:
        """The drain's grace ended: calls still running stop with UNAVAILABLE ``message``."""
        with self._cond:
            self.draining = True
            self.cut_message = message

    def check_serving(self) -> None:
        if self.draining:
            raise NotServing(
                "the server is shutting down: retry on another replica or after it restarts"
            )
        if not self.ready and self.unusable:
            raise NotServing(f"the server cannot serve: {self.unusable}")
        if not self.ready:
            raise NotServing("the server is still loading its models: retry in a few seconds")

    def track(self, context) -> None:
        """Count this call as in flight until gRPC reports it done (its status sent)."""
        with self._cond:
            self._active += 1
        done = threading.Event()

        def release(_context=None) -> None:
            if not done.is_set():
                done.set()
                with self._cond:
                    self._active -= 1
                    self._cond.notify_all()

        context.add_done_callback(release)

    @property
    def active(self) -> int:
        return self._active

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight; False when ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._active > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True


class _ModelQueue:
    def __init__(self) -> None:
        self.running = 0
        self.waiting: collections.deque[object] = collections.deque()


class Admission:
    """Global cap on scoring calls, then per-model in-flight slots with a FIFO queue."""

    def __init__(self, *, max_in_flight: int, max_queue: int, max_admitted: int, idle=None) -> None:
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.max_admitted = max_admitted
        self._idle = idle  # told when calls start and when the last one ends (IdleRelease)
        self._cond = threading.Condition()
        self._admitted = 0
        self._models: dict[str, _ModelQueue] = {}

    @contextmanager
    def call_slot(self) -> Iterator[None]:
        """A scoring call, or one ScoreStream image while it is scored, holds one of the
        global slots (open streams are limited apart, in ``streams``)."""
        with self._cond:
            if self._admitted >= self.max_admitted:
                raise ServerBusy(
                    f"the server already handles {self._admitted} scoring calls "
                    f"(limit {self.max_admitted}, from --scoring-threads): retry later with backoff"
                )
            self._admitted += 1
            if self._idle is not None:
                self._idle.call_started()
        try:
            yield
        finally:
            with self._cond:
                self._admitted -= 1
                if self._admitted == 0 and self._idle is not None:
                    self._idle.all_calls_ended()

    @contextmanager
    def model_slot(self, model: str, guard: CallGuard) -> Iterator[float]:
        """Run one engine call of ``model``; yields the seconds spent queued."""
        start = time.perf_counter()
        ticket = object()
        with self._cond:
            queue = self._models.setdefault(model, _ModelQueue())
            full = queue.running >= self.max_in_flight or queue.waiting
            if full and len(queue.waiting) >= self.max_queue:
                raise ServerBusy(
                    f"model {quote_name(model)} has {queue.running} requests running and "
                    f"{len(queue.waiting)} queued (limits --max-in-flight {self.max_in_flight}, "
                    f"--max-queue {self.max_queue}): retry later with backoff or add replicas"
                )
            queue.waiting.append(ticket)
            try:
                while queue.running >= self.max_in_flight or queue.waiting[0] is not ticket:
                    guard.check()
                    self._cond.wait(min(QUEUE_POLL_SECONDS, max(guard.remaining(), 0.001)))
                guard.check()  # a request whose deadline already passed is not started
            finally:
                queue.waiting.remove(ticket)
                self._cond.notify_all()
            queue.running += 1
        try:
            yield time.perf_counter() - start
        finally:
            with self._cond:
                queue.running -= 1
                self._cond.notify_all()

    @property
    def admitted(self) -> int:
        """Global slots held now (scoring calls and stream images being scored)."""
        return self._admitted

    def counts(self, model: str) -> tuple[int, int]:
        """(running, queued) for ``model``."""
        with self._cond:
            queue = self._models.get(model)
            return (queue.running, len(queue.waiting)) if queue else (0, 0)
