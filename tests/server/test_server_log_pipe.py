"""A log reader that goes away or stalls never blocks the server.

Before: with stdout/stderr into a closed pipe, ``densemap serve --log-json`` ignored two
SIGTERMs. ``logging.StreamHandler`` printed each failed write (EPIPE) to ``sys.stderr``,
which under ``--log-json`` is the pipe read back into the log: the reading thread wrote into
its own pipe until it was full, holding the handler's lock, and every logging thread (the
one that drains on SIGTERM too) waited on it forever. A stalled reader (a full pipe) blocked
every thread that logged, scoring included.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from densemap.service.client import DensemapClient
from densemap.service.server.log_stream import DroppingHandler, JsonFormatter
from tests.support.server_harness import HOST, TINY, free_port, rgb_image

EXIT_SECONDS = 5.0  # SIGTERM with nothing in flight: the flush waits at most 2 s of it
SMALL_PIPE = 4096  # F_SETPIPE_SZ: a stalled reader's pipe fills after a dozen debug lines


def serve(repo, port: int, write_fd: int, *flags: str, metrics: int = 0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "densemap.service.cli", "serve", *flags, "--models", str(repo),
         "--host", HOST, "--port", str(port), "--metrics-port", str(metrics),
         "--log-level", "debug"],
        stdout=write_fd, stderr=write_fd, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def read_until_ready(read_fd: int, process: subprocess.Popen, timeout: float = 60.0) -> str:
    """The log text up to the "ready" line (the reader is still there at start-up)."""
    text, deadline = b"", time.monotonic() + timeout
    while b"ready:" not in text:
        assert process.poll() is None, f"densemap serve exited early: {text.decode()}"
        assert time.monotonic() < deadline, f"not ready within {timeout} s: {text.decode()}"
        text += os.read(read_fd, 65536)
    return text.decode()


def score_many(port: int, count: int) -> float:
    """Score ``count`` small images (each one debug line); the slowest call's seconds."""
    slowest = 0.0
    with DensemapClient(f"{HOST}:{port}", timeout=10) as client:
        for seed in range(count):
            start = time.monotonic()
            assert client.score(rgb_image(24, 24, seed), model=TINY).maps
            slowest = max(slowest, time.monotonic() - start)
    return slowest


def dropped_records(metrics_port: int) -> float:
    url = f"http://{HOST}:{metrics_port}/metrics"
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line.startswith("densemap_log_records_dropped_total "):
            return float(line.split()[-1])
    raise AssertionError("no densemap_log_records_dropped_total in /metrics")


def stop_within(process: subprocess.Popen, seconds: float) -> float:
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(seconds) == 0
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        raise AssertionError(f"densemap serve still running {seconds} s after SIGTERM") from None
    return time.monotonic() - start


@pytest.mark.slow
@pytest.mark.parametrize("log_json", [True, False], ids=["log-json", "plain"])
def test_sigterm_stops_the_server_when_its_log_reader_is_gone(repo, log_json):
    port, metrics = free_port(), free_port()
    read_fd, write_fd = os.pipe()
    flags = ["--log-json"] if log_json else []
    process = serve(repo, port, write_fd, *flags, metrics=metrics)
    os.close(write_fd)
    try:
        read_until_ready(read_fd, process)
        os.close(read_fd)  # the log reader goes away: every later write gets EPIPE
        read_fd = -1
        assert score_many(port, 40) < 2.0  # each call logs a line into the broken pipe
        assert dropped_records(metrics) >= 40
        assert stop_within(process, EXIT_SECONDS) < EXIT_SECONDS
    finally:
        if read_fd >= 0:
            os.close(read_fd)
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.slow
def test_a_stalled_log_reader_never_blocks_scoring_or_sigterm(repo):
    port = free_port()
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, SMALL_PIPE)
    process = serve(repo, port, write_fd, "--log-json")
    os.close(write_fd)
    try:
        read_until_ready(read_fd, process)
        # The reader stays but reads no more: 200 debug lines are ~20x the pipe's capacity.
        assert score_many(port, 200) < 2.0
        assert stop_within(process, EXIT_SECONDS) < EXIT_SECONDS
        tail = b""
        while chunk := os.read(read_fd, 65536):
            tail += chunk
    finally:
        os.close(read_fd)
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert all(json.loads(line) for line in tail.decode().splitlines())  # whole lines only


def log_record(n: int) -> logging.LogRecord:
    return logging.makeLogRecord(
        {"name": "densemap.test", "levelno": logging.INFO, "levelname": "INFO",
         "msg": "line %d %s", "args": (n, "x" * 200)}
    )  # fmt: skip


def retire(handler: DroppingHandler, read_fd: int, write_fd: int) -> None:
    """Break the handler's pipe before closing its fd (the number could be reused)."""
    if read_fd >= 0:
        os.close(read_fd)
    handler.handle(log_record(-1))
    handler.flush()
    assert handler.broken is not None
    os.close(write_fd)


def test_the_handler_drops_records_into_a_closed_pipe_without_a_word_to_stderr(capfd):
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    handler = DroppingHandler(write_fd)
    handler.setFormatter(JsonFormatter())
    try:
        start = time.monotonic()
        for n in range(1000):
            handler.handle(log_record(n))
        handler.flush()
        assert time.monotonic() - start < 1.0
        assert handler.broken is not None and handler.broken.errno == errno.EPIPE
        assert handler.dropped == 1000
    finally:
        retire(handler, -1, write_fd)
    assert capfd.readouterr().err == ""  # StreamHandler printed a traceback per record


def test_the_handler_never_blocks_on_a_full_pipe_and_says_what_it_dropped():
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, SMALL_PIPE)
    handler = DroppingHandler(write_fd, capacity=50, flush_seconds=0.2)
    handler.setFormatter(JsonFormatter())
    try:
        start = time.monotonic()
        for n in range(5000):
            handler.handle(log_record(n))
        assert time.monotonic() - start < 2.0  # StreamHandler blocks at the first full pipe
        flushed = time.monotonic()
        handler.flush()  # the reader stalls: flush gives up after flush_seconds
        assert time.monotonic() - flushed < 1.0
        assert handler.broken is None and handler.dropped > 4000
        os.set_blocking(read_fd, False)
        text = b""
        deadline = time.monotonic() + 10
        while b"dropped" not in text and time.monotonic() < deadline:
            try:
                text += os.read(read_fd, 65536)  # the reader catches up: writing resumes
            except BlockingIOError:
                time.sleep(0.01)
            handler.handle(log_record(-1))
    finally:
        retire(handler, read_fd, write_fd)
    lines = [json.loads(line) for line in text.decode().split("\n")[:-1]]  # whole lines
    notes = [line for line in lines if line["logger"] == "densemap.log"]
    assert notes and notes[0]["dropped"] > 0 and notes[0]["level"] == "warning"
