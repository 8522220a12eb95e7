"""Benchmark: latency of the first request of a new image shape vs the steady state.

Run: ``.venv/bin/python tests/bench/bench_engine_latency.py`` (or ``pytest <file> -s``).
The engine warms up at load; every later request of a shape it has not seen yet is timed,
then the same shape again (median of 5). Target: first <= 2x steady.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from bench_engine_common import THREADS, dense_model, machine, print_table

from densemap.service.engine import Engine, EngineConfig, ScoreOptions

SHAPES = [(480, 640), (512, 512), (600, 800), (768, 1024), (1000, 700)]


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def test_first_request_latency():
    started = time.perf_counter()
    engine = Engine(dense_model("mini_vgg"), config=EngineConfig(intra_op_threads=THREADS))
    load_seconds = time.perf_counter() - started
    rng = np.random.default_rng(0)
    rows = []
    for options in (ScoreOptions(), ScoreOptions(output_stride=4)):
        for height, width in SHAPES:
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            first = timed(lambda: engine.score(image, options))  # noqa: B023
            steady = statistics.median(
                timed(lambda: engine.score(image, options))  # noqa: B023
                for _ in range(5)
            )
            stride = options.output_stride or engine.metadata.geometry.stride[0]
            rows.append(
                [f"{height}x{width}", stride, round(first * 1e3, 1), round(steady * 1e3, 1),
                 round(first / steady, 2)]
            )  # fmt: skip
    print_table(
        f"First request of a new shape, mini-VGG (load + warm-up {load_seconds:.2f}s; {machine()})",
        ["image", "stride", "first ms", "steady ms", "first/steady"],
        rows,
    )


if __name__ == "__main__":
    test_first_request_latency()
