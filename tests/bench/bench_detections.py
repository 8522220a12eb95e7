"""Benchmark: the cost of detections on top of the map, digits model at 2048².

Run: ``.venv/bin/python tests/bench/bench_detections.py`` (or ``make bench``).
A 2048² page is tiled from the bundled digits pages (real digits, real background), scored
at stride 2 (à-trous variant) with and without ``DetectionOptions`` (the demo's settings:
NMS IoU 0.3 across classes), interleaved, fastest of each. Target: overhead <= 10%.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from bench_engine_common import THREADS, interleaved_times, machine, print_table
from PIL import Image

from densemap.service.engine import Engine, EngineConfig, ScoreOptions
from densemap.service.engine.options import DetectionOptions

DIGITS = Path(__file__).resolve().parents[2] / "models" / "digits"
SIZE = 2048


def page_2048() -> np.ndarray:
    pages = [np.asarray(Image.open(p).convert("L")) for p in sorted(DIGITS.glob("pages/*.png"))]
    canvas = np.full((SIZE, SIZE), 255, np.uint8)
    top = left = 0
    index = 0
    while top < SIZE:
        page = pages[index % len(pages)]
        index += 1
        h, w = page.shape
        if left + w > SIZE:
            top, left = top + max(p.shape[0] for p in pages), 0
            continue
        canvas[top : top + h, left : left + w] = page[: SIZE - top]
        left += w
    return canvas


def test_detection_overhead():
    engine = Engine(DIGITS / "model.onnx", config=EngineConfig(intra_op_threads=THREADS))
    image = page_2048()
    plain = ScoreOptions(output_stride=2, include_map=False, top_k=1)
    boxes = ScoreOptions(
        output_stride=2,
        include_map=False,
        top_k=1,
        detections=DetectionOptions(iou=0.3, across_classes=True),
    )
    found = len(engine.score(image, boxes).detections)
    bare_s, boxes_s = interleaved_times(
        [lambda: engine.score(image, plain), lambda: engine.score(image, boxes)], repeat=5
    )
    print_table(
        f"Detections on top of the map, digits at stride 2, {SIZE}² page ({machine()})",
        ["what", "ms", "ratio (target)"],
        [
            ["map only (top-1 per cell)", round(bare_s * 1e3, 1), "1.00"],
            [f"+ detections ({found} boxes)", round(boxes_s * 1e3, 1),
             f"{boxes_s / bare_s:.3f} (<= 1.10)"],
        ],
    )  # fmt: skip


if __name__ == "__main__":
    test_detection_overhead()
