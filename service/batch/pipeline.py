"""The local batch pipeline: decode ahead and write behind, so inference never waits on disk.

Three stages, two bounded thread pools::

    decode pool (N threads) -- read file, decode -->  [<= 2N decoded images in flight]
    score pool (1 thread)   -- scorer.score()    -->  [<= 2N results being written]
    write pool (N threads)  -- .npz, heat-map, summary row

Images are scored in input order, one at a time by default (the engine itself uses every
core); a remote server takes several calls at once. Both queues are bounded, so memory stays at about 4N decoded images. A failure on
one image (unreadable, undecodable, too small, write error) becomes a ``failed`` row and the
batch goes on; a disk full is no image's fault: its image fails, and the run's ``halt`` is
set, after which no image starts (the run's own files failing set it too).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from densemap.service.batch.outputs import DISK_FULL, Halt, not_written
from densemap.service.batch.summary import failed_row
from densemap.service.batch.walk import ImageJob
from densemap.service.batch.writer import ResultWriter
from densemap.service.engine.options import ScoreOptions
from densemap.service.engine.result import ScoreResult
from densemap.service.errors import DensemapError

logger = logging.getLogger("densemap.score")
HELPER_NICENESS = 10  # decode and write threads yield to inference (Linux per-thread nice)


class Scorer(Protocol):
    """What the pipeline needs from a model: in-process engine or remote server.

    ``decode`` turns file bytes into what ``score`` takes (and the writer draws heat-maps
    on): a uint8 HxWxC array in the model's colour order, or the bytes themselves when
    the server decodes. ``cancel`` is polled by the engine between passes and tiles.
    """

    model_name: str
    labels: tuple[str, ...]

    def decode(self, data: bytes) -> np.ndarray | bytes: ...

    def score(
        self, image, options: ScoreOptions, *, cancel: Callable[[], bool] | None = None
    ) -> ScoreResult: ...


@dataclass(frozen=True)
class PipelineConfig:
    workers: int = 4  # threads for decoding, and as many for writing
    concurrency: int = 1  # score calls at once (1 for an engine using every core)
    debug: bool = False  # log a traceback for every failure


Report = Callable[[dict], None]  # called once per image with its summary row


def describe_failure(exc: BaseException) -> str:
    """One line saying why an image failed, for the log and ``summary.jsonl``."""
    if isinstance(exc, DensemapError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot read or write the file: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}"


def lower_thread_priority() -> None:
    """Run this thread at nice +10 (Linux): decoding and writing fill the cycles inference
    leaves idle instead of delaying inference threads that wait on each other."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HELPER_NICENESS)
        except OSError:
            pass


def load_image(job: ImageJob, scorer: Scorer):
    with open(job.source, "rb") as f:
        data = f.read()
    return scorer.decode(data)


def _fail(job: ImageJob, exc: BaseException, report: Report, debug: bool) -> None:
    if debug:
        logger.error("traceback for %s", job.source, exc_info=exc)
    report(failed_row(job, describe_failure(exc)))


def run_pipeline(
    jobs: Iterable[ImageJob],
    *,
    scorer: Scorer,
    writer: ResultWriter,
    options: ScoreOptions,
    report: Report,
    config: PipelineConfig = PipelineConfig(),
    halt: Halt | None = None,
) -> None:
    """Score every job, calling ``report(row)`` once per image (from any thread).

    On an exception in the calling thread (Ctrl-C), running score calls are cancelled,
    results already computed are written whole, then the exception propagates. With a
    ``halt``, a disk full sets it, and once it is set no image starts (those started
    finish); without (Ray actors: every image of a batch gets its row) none is skipped.
    """
    halted = halt if halt is not None else (lambda: False)
    workers = max(1, config.workers)
    depth = 2 * workers
    concurrency = max(1, config.concurrency)
    score_slots = threading.Semaphore(concurrency)
    write_slots = threading.Semaphore(depth)
    stop = threading.Event()
    decode_pool = ThreadPoolExecutor(
        workers, thread_name_prefix="densemap-decode", initializer=lower_thread_priority
    )
    score_pool = ThreadPoolExecutor(concurrency, thread_name_prefix="densemap-score")
    write_pool = ThreadPoolExecutor(
        workers, thread_name_prefix="densemap-write", initializer=lower_thread_priority
    )
    pending: deque[tuple[ImageJob, Future]] = deque()
    queue = iter(jobs)

    def refill() -> None:
        while len(pending) < depth:
            job = next(queue, None)
            if job is None:
                return
            pending.append((job, decode_pool.submit(load_image, job, scorer)))

    def write(job: ImageJob, image, result: ScoreResult, seconds: float) -> None:
        try:
            report(writer.write(job, image, result, seconds=seconds))
        except Exception as exc:
            if halt is not None and isinstance(exc, OSError) and exc.errno in DISK_FULL:
                halt.set(not_written(exc.filename or job.relpath, exc))
            # A second Ctrl-C tears the output folder's temp files down under running
            # writes: a run being stopped does not blame its images (a rerun redoes them).
            if not stop.is_set():
                _fail(job, exc, report, config.debug)
        finally:
            write_slots.release()

    def score(job: ImageJob, image) -> None:
        try:
            start = time.perf_counter()
            result = scorer.score(image, options, cancel=stop.is_set)
            seconds = time.perf_counter() - start
            write_slots.acquire()
            write_pool.submit(write, job, image, result, seconds)
        except Exception as exc:
            if not stop.is_set():  # a run being stopped does not blame its images
                _fail(job, exc, report, config.debug)
        finally:
            score_slots.release()

    try:
        refill()
        while pending and not halted():
            job, decoded = pending.popleft()
            refill()
            try:
                image = decoded.result()
            except Exception as exc:
                _fail(job, exc, report, config.debug)
                continue
            score_slots.acquire()
            score_pool.submit(score, job, image)
    except BaseException:
        stop.set()
        raise
    finally:
        decode_pool.shutdown(wait=True, cancel_futures=True)
        score_pool.shutdown(wait=True)
        write_pool.shutdown(wait=True)  # results already scored are written whole
