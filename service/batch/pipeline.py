"""The local batch pipeline: decode ahead and write behind, so inference never waits on disk.

Three stages, two bounded thread pools::

    decode pool (N threads) -- read file, decode -->  [<= 2N decoded images in flight]
    calling thread          -- scorer.score()    -->  [<= 2N results being written]
    write pool (N threads)  -- .npz, heat-map, summary row

The calling thread scores images in input order, one at a time (the engine itself uses every
core). Both queues are bounded, so memory stays at about 4N decoded images. A failure on
one image (unreadable, undecodable, too small, write error) becomes a ``failed`` row and the
batch goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.batch.summary import failed_row
from service.batch.walk import ImageJob
from service.batch.writer import ResultWriter
from service.engine.options import ScoreOptions
from service.engine.result import ScoreMap
from service.errors import DensemapError

logger = logging.getLogger("densemap.score")


class Scorer(Protocol):
    """What the pipeline needs from a model: in-process engine or remote server."""

    model_name: str
    labels: tuple[str, ...]

    def decode(self, data: bytes) -> np.ndarray: ...

    def score(self, image: np.ndarray, options: ScoreOptions) -> ScoreMap: ...


@dataclass(frozen=True)
class PipelineConfig:
    workers: int = 4  # threads for decoding, and as many for writing
    debug: bool = False  # log a traceback for every failure


Report = Callable[[dict], None]  # called once per image with its summary row


def describe_failure(exc: BaseException) -> str:
    """One line saying why an image failed, for the log and ``summary.jsonl``."""
    if isinstance(exc, DensemapError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot read or write the file: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}"


def load_image(job: ImageJob, scorer: Scorer) -> np.ndarray:
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
) -> None:
    """Score every job, calling ``report(row)`` once per image (from any thread)."""
    workers = max(1, config.workers)
    depth = 2 * workers
    write_slots = threading.Semaphore(depth)
    decode_pool = ThreadPoolExecutor(workers, thread_name_prefix="densemap-decode")
    write_pool = ThreadPoolExecutor(workers, thread_name_prefix="densemap-write")
    pending: deque[tuple[ImageJob, Future]] = deque()
    queue = iter(jobs)

    def refill() -> None:
        while len(pending) < depth:
            job = next(queue, None)
            if job is None:
                return
            pending.append((job, decode_pool.submit(load_image, job, scorer)))

    def write(job: ImageJob, image: np.ndarray, result: ScoreMap, seconds: float) -> None:
        try:
            report(writer.write(job, image, result, seconds=seconds))
        except Exception as exc:
            _fail(job, exc, report, config.debug)
        finally:
            write_slots.release()

    try:
        refill()
        while pending:
            job, decoded = pending.popleft()
            refill()
            try:
                image = decoded.result()
                start = time.perf_counter()
                result = scorer.score(image, options)
                seconds = time.perf_counter() - start
            except Exception as exc:
                _fail(job, exc, report, config.debug)
                continue
            write_slots.acquire()
            write_pool.submit(write, job, image, result, seconds)
    finally:
        decode_pool.shutdown(wait=True, cancel_futures=True)
        write_pool.shutdown(wait=True)  # results already scored are written whole
