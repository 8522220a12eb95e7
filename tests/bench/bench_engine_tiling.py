"""Benchmark: exact tiling under a 1 GiB activation budget (mini-VGG), with peak RSS.

Run: ``.venv/bin/python tests/bench/bench_engine_tiling.py`` (or ``pytest <file> -s``).
Part 1: 3072^2, tiled (1 GiB budget) vs untiled: time ratio and identical output.
Part 2: 8192^2 in a fresh process with a 1 GiB budget: time and peak RSS against
RSS before scoring (python + onnxruntime + model + the uint8 image) + budget + output maps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
from bench_engine_common import THREADS, dense_model, interleaved_times, machine, print_table

from densemap.service.engine import Engine, EngineConfig, ScoreOptions
from densemap.service.engine.dense import DenseNet

GIB = 1 << 30
BIG_IMAGE_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np, psutil
    from densemap.service.engine import Engine, EngineConfig, ScoreOptions
    path, size, threads, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    engine = Engine(path, config=EngineConfig(intra_op_threads=threads, memory_budget=budget))
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    result = engine.score(image, ScoreOptions(image_top_k=1))
    seconds = time.perf_counter() - start
    # VmHWM, not ru_maxrss: after fork+exec ru_maxrss starts at the PARENT's high-water mark
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    peak = int(status.split()[0]) * 1024
    scores = result.maps[0].scores
    print(json.dumps(dict(seconds=seconds, before=before, peak=peak, map_bytes=scores.nbytes,
                          cells=list(scores.shape), estimate=engine.estimate_bytes(size, size),
                          timings=result.timings)))
    """
)


def count_passes(engine, image, options):
    calls = []
    original = DenseNet.run

    def counting(net, image_chw):
        calls.append(image_chw.shape[1:])
        return original(net, image_chw)

    DenseNet.run = counting
    try:
        result = engine.score(image, options)
    finally:
        DenseNet.run = original
    return result, calls


def test_tiling():
    path = dense_model("mini_vgg")
    size = 3072
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    options = ScoreOptions(probabilities=False, image_top_k=0)
    untiled = Engine(path, config=EngineConfig(intra_op_threads=THREADS, memory_budget=1 << 36))
    tiled = Engine(path, config=EngineConfig(intra_op_threads=THREADS, memory_budget=GIB))
    untiled_seconds, tiled_seconds = interleaved_times(
        [lambda: untiled.score(image, options), lambda: tiled.score(image, options)], repeat=4
    )
    reference = untiled.score(image, options).maps[0].scores
    result, passes = count_passes(tiled, image, options)
    identical = np.array_equal(reference, result.maps[0].scores)
    rows = [
        [
            f"{size}^2",
            round(untiled.estimate_bytes(size, size) / GIB, 2),
            len(passes),
            f"{max(p[0] for p in passes)}x{max(p[1] for p in passes)}",
            round(untiled_seconds, 2),
            round(tiled_seconds, 2),
            round(tiled_seconds / untiled_seconds, 3),
            round(sum(h * w for h, w in passes) / size**2, 3),
            identical,
        ]
    ]
    print_table(
        f"Tiling overhead, mini-VGG, budget 1 GiB ({machine()})",
        ["image", "untiled est. GiB", "tiles", "largest tile", "untiled s", "tiled s",
         "time ratio", "pixels ratio", "identical"],
        rows,
    )  # fmt: skip
    assert identical

    done = subprocess.run(
        [sys.executable, "-c", BIG_IMAGE_SCRIPT, str(path), "8192", str(THREADS), str(GIB)],
        capture_output=True,
        text=True,
        check=True,
    )
    big = json.loads(done.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    print_table(
        "8192^2 on mini-VGG, 1 GiB budget (fresh process)",
        ["seconds", "untiled est. GiB", "RSS before MiB", "peak RSS MiB", "peak - before MiB",
         "budget + maps MiB", "map"],
        [[
            round(big["seconds"], 1),
            round(big["estimate"] / GIB, 1),
            big["before"] // mib,
            big["peak"] // mib,
            (big["peak"] - big["before"]) // mib,
            (GIB + 3 * big["map_bytes"]) // mib,
            "x".join(map(str, big["cells"])),
        ]],
    )  # fmt: skip
    print("(maps: raw logits, probabilities and the returned copy: 3 x the float32 map)")
    print("timings:", {k: round(v, 2) for k, v in big["timings"].items()})


if __name__ == "__main__":
    test_tiling()
