"""What every densemap.v1 and KServe call shares: gating, admission, timing, status, logs.

A servicer method (a coroutine on the server's event loop) hands a function of
:class:`Call` to :meth:`ScoringCore.unary` (or :meth:`ScoringCore.stream_item` per
ScoreStream item). The core checks that the server serves, counts the call in flight, maps
any exception to its status through the one table (``densemap.service.server.status``), records
metrics and writes one debug log line per request.

A scoring call holds a thread only once its request message is complete and admitted: the
core then runs its function (decode, queue, engine, encode, serialize) on the scoring
thread pool, and the event loop goes on answering every other call meanwhile. Control
calls (metadata, model lists) run on the loop itself: they only read state.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent import futures
from contextlib import contextmanager
from typing import TypeVar

import grpc

from densemap.service.engine.cost import RequestCost, describe
from densemap.service.engine.options import ScoreOptions
from densemap.service.engine.result import ScoreResult
from densemap.service.errors import ImageTooLarge, ModelNotFound
from densemap.service.server.client_paths import client_text
from densemap.service.server.compute_limit import ComputeLimit
from densemap.service.server.limits import Admission, CallGuard, ServingState
from densemap.service.server.memory_budget import MemoryBudget, Reservation
from densemap.service.server.metrics import UNKNOWN_MODEL, ServerMetrics
from densemap.service.server.status import (
    NotServing,
    ResponseTooLarge,
    drop_frames,
    quote_name,
    status_for,
)

log = logging.getLogger("densemap.server")
T = TypeVar("T")


class Models:
    """The current repository (None while loading); swapped whole on reload.

    ``root``: the repository's folder, which :meth:`client_text` takes out of messages."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.repository = None
        self.root = root

    def client_text(self, message: str) -> str:
        """``message`` as a client reads it: repository-relative paths, no absolute one."""
        return client_text(message, self.root)

    def names(self) -> list[str]:
        repository = self.repository
        return sorted(repository.names) if repository is not None else []

    def get(self, name: str):
        repository = self.repository
        if repository is None:
            raise NotServing("the server is still loading its models: retry in a few seconds")
        names = repository.names
        if name not in names:  # matched against the index, never used as a path
            failure = repository.errors.get(name)
            if failure is not None:
                raise ModelNotFound(
                    f"model {quote_name(name)} is not served: it failed to load ({failure}); "
                    "fix its files, then reload the server (SIGHUP)"
                )
            served = ", ".join(sorted(names)) or "none"
            raise ModelNotFound(
                f"model {quote_name(name)} is not served here (served: {served}); "
                "ListModels or ModelMetadata show the names"
            )
        return repository.get(name)


class Call:
    """One request: its model label, stage timings (seconds) and input size."""

    def __init__(self, core: ScoringCore, guard: CallGuard, api: str) -> None:
        self._core = core
        self.guard = guard
        self.api = api
        self.model = UNKNOWN_MODEL
        self.seconds: dict[str, float] = {"decode": 0.0, "queue": 0.0, "infer": 0.0}
        self.pixels = 0
        self.reservation: Reservation | None = None  # its bytes in the server's budget
        self.start = time.perf_counter()

    def release_memory(self) -> None:
        """Give the call's bytes back to the server's budget (its response is sent)."""
        if self.reservation is not None:
            self.reservation.release()

    def engine(self, name: str):
        engine = self._core.models.get(name)
        self.model = name
        return engine

    @contextmanager
    def timed(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def score(
        self,
        engine,
        image,
        options: ScoreOptions,
        *,
        response_bytes: Callable[[RequestCost], int] | None = None,
    ) -> ScoreResult:
        """Engine.score behind the model's queue, with the call's cancel hook.

        The request's cost is checked first, in milliseconds and before it queues
        (``ScoringCore.check_cost``, then its MACs against the compute limit); ``response_bytes`` gives the size of the response an
        API builds from it (default: densemap.v1's, every output).
        """
        with self.timed("decode"):
            cost = engine.estimate_image(image, options)
            size = cost.response_bytes if response_bytes is None else response_bytes(cost)
            self._core.check_cost(cost, size, budget=engine.memory_budget)
            self._core.compute.check(engine, cost.macs, model=self.model)
            if self.reservation is None:  # the server's budget: work and response (the
                # request's bytes were reserved before it was parsed: malformed.py)
                held = max(cost.peak_bytes, cost.sending_bytes(size))
                self.reservation = self._core.memory.reserve(held)
        guard = self.guard
        guard.check()  # a request whose deadline already passed is not started
        core = self._core
        with core.admission.model_slot(self.model, guard) as queued:
            self.seconds["queue"] = queued
            gauge = core.metrics.in_flight.labels(self.model)
            gauge.inc()
            start = time.perf_counter()
            try:
                result = engine.score(image, options, cancel=guard)
            except Exception as exc:
                if guard():  # the engine stopped because of the hook: say which reason
                    raise guard.error() from exc
                raise
            finally:
                gauge.dec()
            wall = time.perf_counter() - start
        timings = result.timings
        decode = float(timings.get("decode", 0.0)) + float(timings.get("preprocess", 0.0))
        self.seconds["decode"] += decode
        self.seconds["infer"] = max(wall - decode, 0.0)
        self.pixels = result.image_size[0] * result.image_size[1]
        return result

    def timing_ms(self) -> dict[str, float]:
        """decode/queue/infer/encode/total in milliseconds, for the response."""
        timing = {stage: 1000.0 * self.seconds.get(stage, 0.0) for stage in self._STAGES}
        timing["total"] = 1000.0 * (time.perf_counter() - self.start)
        return timing

    _STAGES = ("decode", "queue", "infer", "encode")


class ScoringCore:
    """Shared by both servicers: the models, the serving state, admission and metrics."""

    def __init__(
        self,
        *,
        models: Models,
        state: ServingState,
        admission: Admission,
        metrics: ServerMetrics,
        max_response_bytes: int = 2**31 - 1,
        compute: ComputeLimit,
        pool: futures.Executor,
        memory: MemoryBudget,
    ) -> None:
        self.models = models
        self.state = state
        self.admission = admission
        self.metrics = metrics
        self.max_response_bytes = max_response_bytes
        self.compute = compute
        self.pool = pool  # the scoring threads
        self.memory = memory

    def check_cost(self, cost: RequestCost, response_bytes: int, *, budget: int) -> None:
        """Refuse, before any work, a request whose response surely exceeds the message
        limit, or whose maps and response copies exceed the memory budget while it is sent
        (the engine has checked its passes against the same budget)."""
        if response_bytes > self.max_response_bytes:
            raise ResponseTooLarge(self._too_large(response_bytes, "at least "))
        sending = cost.sending_bytes(response_bytes)
        if sending > budget:
            raise ImageTooLarge(
                f"sending this response would hold about {describe(sending)} (the maps, the "
                f"response and its encoded copy), over the memory budget of {describe(budget)}"
                ": ask for less (a coarser output_stride, fewer or smaller scales, fewer "
                "classes, dtype float16, only argmax or top-k outputs)"
            )

    def _too_large(self, size: int, bound: str = "") -> str:
        limit_mb = self.max_response_bytes / 2**20
        return (
            f"the response would be {bound}{size / 2**20:.1f} MiB, over the server's message "
            f"limit of {limit_mb:.1f} MiB (--max-message-mb): ask for less (a coarser "
            "output_stride, fewer classes or scales, dtype fp16, only argmax or top-k "
            "outputs) or raise --max-message-mb on the server and the client"
        )

    def check_response_size(self, response) -> None:
        """A response over the message limit fails with what to change, not gRPC's bare error."""
        size = response.ByteSize()
        if size > self.max_response_bytes:
            raise ResponseTooLarge(self._too_large(size))

    def serialized(self, response) -> bytes:
        """The response's wire bytes, made on the scoring thread (not the event loop), after
        checking its size against the message limit."""
        self.check_response_size(response)
        return response.SerializeToString()

    async def in_pool(self, call: Call, work: Callable[[], T]) -> T:
        """Run ``work`` on a scoring thread. When gRPC ends the call meanwhile (a cancel, a
        lost client, the deadline), the call's guard tells the work to stop, and this waits
        for the thread to let go before it gives the call's slot back."""
        future = asyncio.get_running_loop().run_in_executor(self.pool, work)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            call.guard.cancel()
            await asyncio.wait({future})
            raise

    async def unary(
        self,
        context,
        api: str,
        handler: Callable[[Call], T],
        *,
        scoring: bool = False,
    ) -> T | bytes:
        """Run one unary call; errors end it with their status (no traceback leaves).

        ``scoring``: the handler runs on a scoring thread, holding a global slot, and the
        response comes back serialized; else on the event loop (it must be quick)."""
        call = Call(self, CallGuard.for_context(context, self.state), api)
        context.add_done_callback(lambda _context: call.release_memory())  # response sent
        try:
            self.state.check_serving()
            self.state.track(context)
            if scoring:
                with self.admission.call_slot():
                    response = await self.in_pool(call, lambda: self.serialized(handler(call)))
            else:
                response = handler(call)
                self.check_response_size(response)
        except asyncio.CancelledError:
            self.finish(call, call.guard.stop_code())
            raise
        except Exception as exc:
            code, message = status_for(exc)
            drop_frames(exc)
            message = self.models.client_text(message)
            self.finish(call, code)  # counted before the client can see the status
            await context.abort(code, message)
        self.finish(call, grpc.StatusCode.OK)
        return response

    async def stream_item(
        self, call: Call, handler: Callable[[Call], T]
    ) -> tuple[bytes | None, grpc.StatusCode, str]:
        """Run one ScoreStream item on a scoring thread, holding a scoring slot meanwhile:
        (serialized response or None, status code, message)."""
        code, message, result = grpc.StatusCode.OK, "", None
        try:
            with self.admission.call_slot():
                result = await self.in_pool(call, lambda: self.serialized(handler(call)))
        except asyncio.CancelledError:
            call.release_memory()
            self.finish(call, call.guard.stop_code())
            raise
        except Exception as exc:
            result = None
            code, message = status_for(exc)
            drop_frames(exc)
            message = self.models.client_text(message)
            call.release_memory()
        self.finish(call, code)
        return result, code, message

    def finish(self, call: Call, code: grpc.StatusCode) -> None:
        model = call.model
        self.metrics.requests.labels(model, call.api, code.name).inc()
        if call.pixels:
            self.metrics.input_pixels.labels(model).observe(call.pixels)
            self.metrics.observe_stages(model, call.seconds)
        if log.isEnabledFor(logging.DEBUG):
            elapsed_ms = 1000.0 * (time.perf_counter() - call.start)
            log.debug(
                "%s model=%s code=%s %.1f ms pixels=%d",
                call.api,
                model,
                code.name,
                elapsed_ms,
                call.pixels,
                extra={
                    "api": call.api,
                    "model": model,
                    "code": code.name,
                    "ms": round(elapsed_ms, 3),
                    "pixels": call.pixels,
                    **{f"{k}_ms": round(1000.0 * v, 3) for k, v in call.seconds.items()},
                },
            )
