"""The server's log stream: under ``--log-json``, every line is one JSON object.

- :class:`JsonFormatter`: time, level, logger, message and any ``extra`` fields.
- Python warnings (Pillow's "Corrupt EXIF data...", "Tag data larger than file...") go to
  the log as records of logger ``py.warnings``, not as raw text on stderr.
- C libraries (libtiff, libjpeg, onnxruntime, gRPC core) write to file descriptor 2 by
  themselves. Under ``--log-json`` fd 2 becomes a pipe: a thread turns each line into a
  record of logger ``densemap.stderr``, and the log handler writes to a copy of the real
  stderr. So no raw line reaches the log stream.
- :class:`RateLimit`: warnings and C messages come once per bad request, so the same
  message (digits ignored) is logged at most once per :data:`WINDOW_SECONDS`; the next
  one says how many were left out (``suppressed``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from datetime import datetime, timezone
from typing import TextIO

WINDOW_SECONDS = 60.0
RATE_LIMITED = frozenset(("py.warnings", "densemap.stderr"))
MAX_KEYS = 1000  # distinct messages remembered; beyond, the oldest are forgotten
_DIGITS = re.compile(r"\d+")
stderr_log = logging.getLogger("densemap.stderr")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    _STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class RateLimit(logging.Filter):
    """Let the same warning or C message through once per ``window`` seconds."""

    def __init__(self, window: float = WINDOW_SECONDS, clock=time.monotonic) -> None:
        super().__init__()
        self._window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, list] = {}  # key -> [last time let through, suppressed since]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name not in RATE_LIMITED:
            return True
        key = record.name + _DIGITS.sub("#", record.getMessage())
        now = self._clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < self._window:
                seen[1] += 1
                return False
            if len(self._seen) >= MAX_KEYS:
                self._seen.pop(next(iter(self._seen)))
            self._seen[key] = [now, 0]
        if seen is not None and seen[1]:
            record.suppressed = seen[1]
            record.msg = f"{record.msg} ({seen[1]} more like it in the last {self._window:g} s)"
        return True


def _first_line(message: str) -> str:
    """Python's warning text ends with the source line: keep the message only."""
    return message.strip().splitlines()[0] if message.strip() else message


class _WarningText(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings":
            record.msg, record.args = _first_line(record.getMessage()), ()
        return True


def _pump(read_fd: int) -> None:
    with os.fdopen(read_fd, "rb") as pipe:
        for raw in pipe:
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                stderr_log.warning("%s", line)


def capture_stderr() -> TextIO:
    """Point fd 2 at a pipe read into ``densemap.stderr``; return the real stderr."""
    sys.stderr.flush()
    real = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    threading.Thread(target=_pump, args=(read_fd,), name="densemap-stderr", daemon=True).start()
    return real


def configure(*, json_lines: bool, level: int) -> None:
    """The root handler of ``densemap serve``; warnings captured, messages rate-limited."""
    if json_lines:
        handler = logging.StreamHandler(capture_stderr())
        handler.setFormatter(JsonFormatter())
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_WarningText())
    handler.addFilter(RateLimit())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)
