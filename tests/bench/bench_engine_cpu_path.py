"""Benchmark: the engine's pass vs a bare onnxruntime session.

Run: ``.venv/bin/python tests/bench/bench_engine_cpu_path.py`` (or ``make bench``).

The model is a mini-VGG classifier (random weights) written by ``densemap convert`` (in-graph
cell crop, default settings), as users get it.

1. 1024², uint8 image in, top-5 out: ``Engine.score`` vs the bare session (onnxruntime
   defaults: CPU arena on) on the already-normalised float32 batch, interleaved runs,
   fastest of each. Target: engine >= 0.9x the bare session's speed. For the record, in
   the same run: the engine giving its memory back after every request (what it once did for
   every request whose peak crossed ``arena_keep_bytes``), and the
   bare session with the arena off.
2. The same at 1448² (twice the pixels), where every request's peak is over
   ``arena_keep_bytes``: a stream of them keeps the arena after the first.
3. Resident memory: RSS after steady 1024² requests, after one 4096² request (tiled at the
   1 GiB default budget) and after the next 1024² request. Target: back within 10%.
"""

from __future__ import annotations

import gc

import numpy as np
import onnxruntime as ort
import psutil
from bench_engine_common import (
    THREADS,
    converted_model,
    interleaved_times,
    machine,
    print_table,
)

from densemap.service.engine import Engine, EngineConfig, ScoreOptions, preprocess

SIZE, STREAM, BIG = 1024, 1448, 4096
OPTIONS = ScoreOptions(top_k=5, include_map=False)


def bare_session(path, *, arena: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.enable_cpu_mem_arena = arena
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def releasing(engine, image):
    """A request as the engine once ran it when its peak crossed the line: on an
    arena the previous request shrank (shrinking first, so that the arena is grown again
    for whatever runs next in the interleaved turns)."""
    engine.release_memory()
    engine.score(image, OPTIONS)


def compare(engine, path, size: int, rng) -> list[list]:
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    batch = preprocess(image, engine.metadata.preprocessing)[None]
    sessions = [bare_session(path, arena=True), bare_session(path, arena=False)]
    released_s, engine_s, bare_s, off_s = interleaved_times(
        [
            lambda: releasing(engine, image),
            lambda: engine.score(image, OPTIONS),
            lambda: sessions[0].run(None, {"input": batch}),
            lambda: sessions[1].run(None, {"input": batch}),
        ],
        repeat=5,
    )
    peak = engine.estimate_image(image, OPTIONS).peak_bytes >> 20
    keep = engine.config.arena_keep_bytes >> 20
    return [
        [f"{size}²: Engine.score (peak {peak} MiB, arena_keep_bytes {keep} MiB)",
         round(engine_s * 1e3, 1), f"{bare_s / engine_s:.2f}x bare speed (>= 0.9)"],
        [f"{size}²: Engine.score + release_memory() after each (the former policy)",
         round(released_s * 1e3, 1), f"{bare_s / released_s:.2f}x bare speed"],
        [f"{size}²: bare session, arena on (onnxruntime default)", round(bare_s * 1e3, 1),
         "1.00"],
        [f"{size}²: bare session, arena off", round(off_s * 1e3, 1),
         f"{bare_s / off_s:.2f}x bare speed"],
    ]  # fmt: skip


def test_engine_vs_bare_session_and_memory():
    path = converted_model("mini_vgg")
    engine = Engine(path, config=EngineConfig(device="cpu", intra_op_threads=THREADS))
    rng = np.random.default_rng(0)
    rows = compare(engine, path, SIZE, rng) + compare(engine, path, STREAM, rng)
    gc.collect()
    process = psutil.Process()
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    for _ in range(2):
        engine.score(image, OPTIONS)
    before = process.memory_info().rss
    big = rng.integers(0, 256, (BIG, BIG, 3), dtype=np.uint8)
    engine.score(big, OPTIONS)
    del big
    gc.collect()
    after_big = process.memory_info().rss
    engine.score(image, OPTIONS)
    after_next = process.memory_info().rss
    mib = 1 << 20
    print_table(
        f"Engine vs bare onnxruntime session, mini-VGG written by densemap convert, uint8 -> "
        f"top-5 ({machine()})",
        ["what", "ms / MiB", "ratio (target)"],
        rows + [
            ["RSS after steady 1024² requests", before // mib, "1.00"],
            [f"RSS after one {BIG}² request", after_big // mib,
             f"{after_big / before:.2f} (<= 1.10)"],
            ["RSS after the next 1024² request", after_next // mib,
             f"{after_next / before:.2f} (<= 1.10)"],
        ],
    )  # fmt: skip


if __name__ == "__main__":
    test_engine_vs_bare_session_and_memory()
