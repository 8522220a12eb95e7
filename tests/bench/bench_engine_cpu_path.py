"""Benchmark (issue: GPU serving, CPU rows): the engine's pass vs a bare onnxruntime session.

Run: ``.venv/bin/python tests/bench/bench_engine_cpu_path.py`` (or ``make bench``).

1. mini-VGG at 1024², uint8 image in, top-5 out: ``Engine.score`` vs the bare session
   (onnxruntime defaults: CPU arena on) on the already-normalised float32 batch, interleaved
   runs, fastest of each. Target: engine >= 0.9x the bare session's speed.
2. Resident memory: RSS after steady 1024² requests, after one 4096² request (tiled at the
   1 GiB default budget) and after the next 1024² request. Target: back within 10%.
3. The same pass with the arena off (the engine's former setting), for the record.
"""

from __future__ import annotations

import gc

import numpy as np
import onnxruntime as ort
import psutil
from bench_engine_common import THREADS, dense_model, interleaved_times, machine, print_table

from service.engine import Engine, EngineConfig, ScoreOptions, preprocess

SIZE, BIG = 1024, 4096


def bare_session(path, *, arena: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.enable_cpu_mem_arena = arena
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_engine_vs_bare_session_and_memory():
    path = dense_model("mini_vgg")
    engine = Engine(path, config=EngineConfig(device="cpu", intra_op_threads=THREADS))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    batch = preprocess(image, engine.metadata.preprocessing)[None]
    sessions = [bare_session(path, arena=True), bare_session(path, arena=False)]
    options = ScoreOptions(top_k=5, include_map=False)
    engine_s, bare_s, off_s = interleaved_times(
        [
            lambda: engine.score(image, options),
            lambda: sessions[0].run(None, {"input": batch}),
            lambda: sessions[1].run(None, {"input": batch}),
        ],
        repeat=5,
    )
    sessions.clear()  # their arenas must not count in the RSS rows
    gc.collect()
    process = psutil.Process()
    for _ in range(2):
        engine.score(image, options)
    before = process.memory_info().rss
    big = rng.integers(0, 256, (BIG, BIG, 3), dtype=np.uint8)
    engine.score(big, options)
    del big
    gc.collect()
    after_big = process.memory_info().rss
    engine.score(image, options)
    after_next = process.memory_info().rss
    mib = 1 << 20
    print_table(
        f"Engine vs bare onnxruntime session, mini-VGG {SIZE}² uint8 -> top-5 ({machine()})",
        ["what", "ms / MiB", "ratio (target)"],
        [
            ["Engine.score (device graphs, shared CPU arena)", round(engine_s * 1e3, 1),
             f"{bare_s / engine_s:.2f}x bare speed (>= 0.9)"],
            ["bare session, arena on (onnxruntime default)", round(bare_s * 1e3, 1), "1.00"],
            ["bare session, arena off (engine before)", round(off_s * 1e3, 1),
             f"{bare_s / off_s:.2f}x bare speed"],
            ["RSS after steady 1024² requests", before // mib, "1.00"],
            [f"RSS after one {BIG}² request", after_big // mib,
             f"{after_big / before:.2f} (<= 1.10)"],
            ["RSS after the next 1024² request", after_next // mib,
             f"{after_next / before:.2f} (<= 1.10)"],
        ],
    )  # fmt: skip


if __name__ == "__main__":
    test_engine_vs_bare_session_and_memory()
