"""The server's log stream: under ``--log-json``, every line is one JSON object.

- :class:`JsonFormatter`: time, level, logger, message and any ``extra`` fields.
- Python warnings (Pillow's "Corrupt EXIF data...", "Tag data larger than file...") go to
  the log as records of logger ``py.warnings``, not as raw text on stderr.
- C libraries (libtiff, libjpeg, onnxruntime, gRPC core) write to file descriptor 2 by
  themselves. Under ``--log-json`` fd 2 becomes a pipe: a thread turns each line into a
  record of logger ``densemap.stderr``, and the log handler writes to a copy of the real
  stderr. So no raw line reaches the log stream.
- :class:`DroppingHandler`: the log never holds the server. Records are formatted in the
  caller's thread and written by one daemon thread from a bounded queue; a reader that went
  away (EPIPE) or stalls (a full pipe blocks only that thread) costs dropped records,
  counted in ``densemap_log_records_dropped_total``, never a blocked request, signal or
  shutdown. (``logging.StreamHandler`` blocks every logging thread on a full pipe, and on a
  closed one prints each failure to ``sys.stderr``: under ``--log-json`` that is the pipe
  read back into the log, a loop that filled the pipe and hung the server on SIGTERM.)
- :class:`RateLimit`: warnings and C messages come once per bad request, so the same
  message (digits ignored) is logged at most once per :data:`WINDOW_SECONDS`; the next
  one says how many were left out (``suppressed``).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import sys
import threading
import time
from datetime import datetime, timezone

WINDOW_SECONDS = 60.0
QUEUE_RECORDS = 10_000  # lines waiting for a slow log reader; beyond, new records are dropped
FLUSH_SECONDS = 2.0  # at exit, how long the last lines may wait for the log reader
RETRY_SECONDS = 0.05  # a non-blocking log fd that is full: wait this long, then drop the line
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


def capture_stderr() -> int:
    """Point fd 2 at a pipe read into ``densemap.stderr``; return a copy of the real fd 2."""
    sys.stderr.flush()
    real = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    threading.Thread(target=_pump, args=(read_fd,), name="densemap-stderr", daemon=True).start()
    return real


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:  # someone made the fd non-blocking and the pipe is full
            time.sleep(RETRY_SECONDS)
            view = view[os.write(fd, view) :]  # still full: BlockingIOError drops the line


class DroppingHandler(logging.Handler):
    """Writes formatted records to ``fd`` from a daemon thread; never blocks, never raises.

    ``emit`` only formats and enqueues (at most ``capacity`` lines wait; beyond, the record
    is dropped). Once a write fails (the reader closed the pipe: EPIPE), every record is
    dropped. ``dropped`` counts them all; when writing resumes after drops, a line says how
    many were lost. ``flush`` waits at most ``flush_seconds`` (it runs at exit).
    """

    def __init__(
        self,
        fd: int,
        *,
        capacity: int = QUEUE_RECORDS,
        flush_seconds: float = FLUSH_SECONDS,
    ) -> None:
        super().__init__()
        self.fd = fd
        self.dropped = 0
        self.broken: OSError | None = None  # the write error that ended the stream
        self._flush_seconds = flush_seconds
        self._unreported = 0  # dropped since the last line written
        self._count_lock = threading.Lock()
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=capacity)
        self._writer = threading.Thread(target=self._drain, name="densemap-log", daemon=True)
        self._writer.start()

    def _drop(self, count: int = 1) -> None:
        with self._count_lock:
            self.dropped += count
            self._unreported += count

    def _line(self, record: logging.LogRecord) -> bytes:
        try:
            text = self.format(record)
        except Exception as exc:  # a bad format string: say so, in the stream's format
            text = self.format(
                logging.makeLogRecord(
                    {"name": record.name, "levelno": logging.ERROR, "levelname": "ERROR",
                     "msg": "unformattable log record %r: %s", "args": (record.msg, exc)}
                )
            )  # fmt: skip
        return (text + "\n").encode("utf-8", errors="replace")

    def emit(self, record: logging.LogRecord) -> None:
        if self.broken is not None:
            self._drop()
            return
        try:
            self._queue.put_nowait(self._line(record))
        except queue.Full:
            self._drop()

    def _drain(self) -> None:
        while True:
            data = self._queue.get()
            try:
                if self.broken is None:
                    with self._count_lock:
                        lost, self._unreported = self._unreported, 0
                    if lost:
                        _write_all(self.fd, self._dropped_line(lost))
                    _write_all(self.fd, data)
                else:
                    self._drop()
            except BlockingIOError:
                self._drop()
            except OSError as exc:  # EPIPE (reader gone), EBADF, EIO: the stream is over
                self.broken = exc
                self._drop()
            finally:
                self._queue.task_done()

    def _dropped_line(self, count: int) -> bytes:
        return self._line(
            logging.makeLogRecord(
                {"name": "densemap.log", "levelno": logging.WARNING, "levelname": "WARNING",
                 "msg": "%d log record(s) dropped: the log reader was too slow",
                 "args": (count,), "dropped": count}
            )
        )  # fmt: skip

    def flush(self) -> None:
        """Wait (at most ``flush_seconds``) for the queued lines to be written or dropped."""
        deadline = time.monotonic() + self._flush_seconds
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._queue.all_tasks_done.wait(left)


def dropped_records() -> int:
    """Records the root logger's handlers dropped (``densemap_log_records_dropped_total``)."""
    return sum(getattr(h, "dropped", 0) for h in logging.getLogger().handlers)


def configure(*, json_lines: bool, level: int) -> None:
    """The root handler of ``densemap serve``; warnings captured, messages rate-limited."""
    if json_lines:
        handler = DroppingHandler(capture_stderr())
        handler.setFormatter(JsonFormatter())
    else:
        handler = DroppingHandler(2)  # fd 2 itself: sys.stderr may be buffered or replaced
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_WarningText())
    handler.addFilter(RateLimit())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)
