"""Progress of a batch run: a tqdm bar on a terminal, plain log lines otherwise.

The bar shows images done, images/s, megapixels/s, ETA and failures. When stdout or
stderr is not a terminal (pipes, CI, ``nohup``), one plain line is printed every
``interval`` seconds instead. Failures are always printed, one line each, with the path
and the reason. Everything goes to stderr; the caller prints the final summary line.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def printable(text: str) -> str:
    """``text`` safe to print on any stream: bytes of file names that are not valid UTF-8
    (kept by Python as surrogate escapes) are shown as ``\\xNN`` instead of crashing print."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class Progress:
    """Counts rows as they come (thread-safe) and shows the run's progress."""

    def __init__(
        self,
        total: int,
        *,
        skipped: int = 0,
        tty: bool | None = None,
        interval: float = 10.0,
        stream: TextIO | None = None,
    ) -> None:
        self.total = total
        self.skipped = skipped
        self.scored = 0
        self.failed = 0
        self.megapixels = 0.0
        self.stream = stream or sys.stderr
        if tty is None:
            tty = sys.stdout.isatty() and self.stream.isatty()
        self.interval = interval
        self._lock = threading.Lock()
        self._start = time.perf_counter()
        self._start_cpu = time.process_time()
        self._last_line = self._start
        self._bar = None
        self._closed = False
        if tty:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, unit="img", file=self.stream, dynamic_ncols=True, smoothing=0.05
            )
            self._bar.set_postfix_str("0.0 MP/s, 0 failed")

    @property
    def done(self) -> int:
        return self.scored + self.failed

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def cpu_seconds(self) -> float:
        """CPU time of this process (all threads) since the run started."""
        return time.process_time() - self._start_cpu

    def update(self, row: dict) -> None:
        """Account for one image's summary row (``ok`` or ``failed``)."""
        with self._lock:
            if row["status"] == "failed":
                self.failed += 1
                self._say(f"densemap score: failed: {row['path']}: {row.get('error')}")
            else:
                self.scored += 1
                h, w = row.get("size") or (0, 0)
                self.megapixels += h * w / 1e6
            elapsed = self.elapsed()
            if self._bar is not None:
                self._bar.set_postfix_str(
                    f"{self.megapixels / max(elapsed, 1e-9):.1f} MP/s, {self.failed} failed",
                    refresh=False,
                )
                self._bar.update(1)
            elif time.perf_counter() - self._last_line >= self.interval:
                self._last_line = time.perf_counter()
                self._say(self.status_line())

    def _say(self, text: str) -> None:
        text = printable(text)
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def status_line(self) -> str:
        elapsed = max(self.elapsed(), 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        percent = 100.0 * self.done / self.total if self.total else 100.0
        eta_text = format_duration(eta) if eta == eta else "?"
        return (
            f"densemap score: {self.done}/{self.total} images ({percent:.0f}%) | "
            f"{rate:.2f} images/s | {self.megapixels / elapsed:.2f} MP/s | "
            f"ETA {eta_text} | {self.failed} failed"
        )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            elif self.total and self.done:
                self._say(self.status_line())

    def final_line(self, out_dir: str) -> str:
        elapsed = max(self.elapsed(), 1e-9)
        return (
            f"densemap score: scored {self.scored}, skipped {self.skipped}, failed "
            f"{self.failed} of {self.total + self.skipped} images in {elapsed:.1f} s "
            f"({self.scored / elapsed:.2f} images/s, {self.megapixels / elapsed:.2f} MP/s); "
            f"outputs in {printable(out_dir)}"
        )
