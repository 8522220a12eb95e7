"""Giving memory back when the server goes idle, not only after big requests.

Big requests shrink the engine's CPU arena and trim glibc's heap as they end
(``EngineConfig.arena_keep_bytes``). A burst of medium requests never crosses that line yet
leaves their buffers resident (several times the RSS after the first request: docs/engine.md
"Measurements behind the code"). :class:`IdleRelease` runs ``release()`` on a thread of its own once no scoring
call has been admitted for ``delay`` seconds after the last one ended: it costs the next
request nothing, and an idle server's RSS returns near its size after warm-up.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("densemap.server")

DEFAULT_IDLE_DELAY = 2.0  # seconds without scoring before memory is given back


class IdleRelease:
    """Calls ``release()`` once per busy period, ``delay`` s after it ended."""

    def __init__(self, release: Callable[[], None], *, delay: float = DEFAULT_IDLE_DELAY):
        self._release = release
        self._delay = delay
        self._ended = threading.Event()  # a busy period ended
        self._busy = threading.Event()  # a call was admitted since
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="densemap-idle", daemon=True)
        self._thread.start()

    def call_started(self) -> None:
        self._busy.set()

    def all_calls_ended(self) -> None:
        self._busy.clear()
        self._ended.set()

    def stop(self) -> None:
        self._stopped.set()
        self._ended.set()

    def _loop(self) -> None:
        while not self._stopped.is_set():
            self._ended.wait()
            self._ended.clear()
            if self._stopped.wait(self._delay):
                return
            if self._busy.is_set() or self._ended.is_set():
                continue  # work resumed (or ended again): wait for the next quiet period
            try:
                self._release()
            except Exception as exc:  # noqa: BLE001 - giving memory back is best effort
                log.warning("giving idle memory back failed: %s", exc)
