"""When a request gives the CPU arena's and glibc's free memory back.

Shrinking the arena after a request frees every buffer its passes used; the next request
page-faults them afresh, so a stream of requests whose cost crossed
``EngineConfig.arena_keep_bytes`` ran well below a bare onnxruntime session's speed when the
arena was shrunk after each (README benchmarks, docs/engine.md "Measurements behind the
code").

So memory goes back after a request that needed more than ``arena_keep_bytes`` (its peak,
``RequestCost.peak_bytes``) only when the next request is unlikely to need the same again:
when this request's peak is not within :data:`SIMILAR_PEAK_RATIO` of the previous
request's. A steady stream of big requests of one size (a folder of scans, a camera) keeps
its buffers after the first; one outlier (a 4096² request among 1024² ones) gives them
back, as does the first smaller request after a stream of big ones. The arena is shared by
every engine of the process, so the previous request is the process's. A server also gives
memory back when it goes idle (``service/server/idle_memory.py``).
"""

from __future__ import annotations

import threading

# two peaks within this factor of each other count as the same size of request
SIMILAR_PEAK_RATIO = 1.5


class ReleasePolicy:
    """Decides, request after request, whether to give memory back (thread-safe)."""

    def __init__(self) -> None:
        self._previous = 0  # peak bytes of the previous request; 0: none yet, or released
        self._lock = threading.Lock()

    def should_release(self, peak_bytes: int, *, keep_bytes: int) -> bool:
        """Whether the request that just ended, of ``peak_bytes``, should give memory back."""
        with self._lock:
            previous, self._previous = self._previous, int(peak_bytes)
        if max(peak_bytes, previous) <= keep_bytes:
            return False  # small requests after small ones: keep their buffers
        similar = previous * SIMILAR_PEAK_RATIO >= peak_bytes >= previous / SIMILAR_PEAK_RATIO > 0
        return not similar


PROCESS_POLICY = ReleasePolicy()  # the CPU arena and glibc's heap are per process
