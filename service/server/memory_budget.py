"""One memory budget for the whole server: what every scoring call holds, counted together.

The engine's memory budget bounds ONE request; eight of them at once, or six responses
their clients never read, add up past the pod's limit (docs/engine.md "Measurements behind
the code").
:class:`MemoryBudget` is the server-wide bound, ``--memory-limit`` (default: the cgroup
limit when there is one, else the machine's memory), and each scoring call reserves
(:meth:`reserve`):

- its request: a Score or ModelInfer call reserves room for the largest request before
  gRPC reads its body (``uploads.py``), :meth:`Reservation.resize`-d to
  :data:`REQUEST_COPIES` times the message once it is in (the parsed message and one
  field read; the received bytes are dropped once parsed); other calls reserve that once
  their message has arrived, before it is parsed (``malformed.py``); held as long as the
  call lives;
- once its cost is known and before it queues, the larger of the engine's peak (image, maps, one pass) and what sending holds (image,
  maps, the response message and its serialized bytes), ``RequestCost``.

The reservation is released when gRPC reports the call done: after the client has read the
whole response, or the call ended otherwise. So an unread response keeps its bytes counted
(and a client that stops reading its connection altogether is dropped after the write
timeout, gRPC's keepalive: ``--write-timeout-seconds``). A call that does not fit beside
the reservations held is refused with RESOURCE_EXHAUSTED at once, saying so; one that can
never fit is refused saying what to ask for instead. The bytes for requests are the limit
less :data:`HEADROOM` of it (allocator slack, gRPC's buffers) and the process's resident
memory once its models are loaded.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from densemap.service.engine.cost import describe
from densemap.service.errors import ImageTooLarge
from densemap.service.server.status import ServerBusy

CGROUP_LIMIT_FILES = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)
NO_CGROUP_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as about 2**63
HEADROOM = 0.2  # of the limit, never reserved: allocator slack, gRPC buffers, the heap
REQUEST_COPIES = 2  # a request while its call lives: the parsed message and one field read


def cgroup_memory_limit(files=CGROUP_LIMIT_FILES) -> int | None:
    """The memory limit of this process's cgroup, or None when there is none."""
    for path in files:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < NO_CGROUP_LIMIT:
            return int(text)
    return None


def machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_memory_limit() -> int:
    """``--memory-limit`` when not given: the cgroup limit (a pod's), else the machine's."""
    return cgroup_memory_limit() or machine_memory()


def resident_bytes() -> int:
    """This process's resident memory (RSS) now."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


class Reservation:
    """Bytes one call holds in the budget; :meth:`release` gives them back (once)."""

    def __init__(self, budget: MemoryBudget, nbytes: int) -> None:
        self._budget = budget
        self.nbytes = nbytes
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._budget._give_back(self.nbytes)

    def resize(self, nbytes: int) -> None:
        """Hold ``nbytes`` instead: a reservation made for the most a call could need,
        trued up once its size is known. Growing refuses, as :meth:`MemoryBudget.reserve`
        does, when the difference does not fit."""
        if self._released:
            return
        if nbytes > self._budget.for_requests:
            self._budget.reserve(nbytes)  # raises: more than the server has for requests
        if nbytes > self.nbytes:
            self._budget.reserve(nbytes - self.nbytes)  # raises when the rest is held
        else:
            self._budget._give_back(self.nbytes - nbytes)
        self.nbytes = nbytes


class MemoryBudget:
    """The server-wide memory limit, and the bytes scoring calls hold within it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._reserved = 0
        self._baseline = 0  # resident bytes with the models loaded, no call running
        # told (from any thread) when a call was refused for room that others hold: it may
        # free some for the next one (uploads.py ends the oldest body past its grace)
        self.on_shortage: Callable[[], None] | None = None

    @property
    def reserved(self) -> int:
        """Bytes reserved by calls now."""
        return self._reserved

    @property
    def for_requests(self) -> int:
        """Bytes calls may reserve in all: the limit less headroom and the baseline."""
        return max(int(self.limit * (1 - HEADROOM)) - self._baseline, 0)

    def measure_baseline(self) -> None:
        """Take the process's resident memory now, less what calls hold, as the baseline
        (after the models loaded or reloaded)."""
        with self._lock:
            self._baseline = max(resident_bytes() - self._reserved, 0)

    def reserve(self, nbytes: int, *, tell_shortage: bool = True) -> Reservation:
        """Hold ``nbytes`` for a call, or refuse it (RESOURCE_EXHAUSTED) with what to do;
        a refusal for room that others hold calls :attr:`on_shortage` (unless
        ``tell_shortage`` is False)."""
        room = self.for_requests
        if nbytes > room:
            raise ImageTooLarge(
                f"this request needs about {describe(nbytes)} of server memory (its request, "
                f"maps and response), over all the server has for requests, "
                f"{describe(room)} (--memory-limit {describe(self.limit)}, less the models "
                "and headroom): ask for less (a smaller image, a coarser output_stride, fewer "
                "scales or classes, dtype float16, only argmax or top-k outputs)"
            )
        with self._lock:
            held = self._reserved
            if held + nbytes <= room:
                self._reserved += nbytes
                return Reservation(self, nbytes)
        if tell_shortage and self.on_shortage is not None:
            self.on_shortage()
        raise ServerBusy(
            f"the server's memory for requests is in use: this request needs about "
            f"{describe(nbytes)}, and other calls hold {describe(held)} of {describe(room)} "
            "(--memory-limit; responses not yet read by their clients count until they "
            "are): retry later with backoff, or on another replica"
        )

    def _give_back(self, nbytes: int) -> None:
        with self._lock:
            self._reserved -= nbytes
