"""Benchmark: one dense pass vs the classifier on every crop (batched), with MAC ratios.

Run: ``.venv/bin/python tests/bench/bench_engine_dense.py`` (or ``pytest <file> -s``).
Set DENSEMAP_BENCH_SKIP_VGG=1 to skip VGG-16 (its export writes ~553 MB and its crops
take a while on a small CPU).
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort  # noqa: I001
from bench_engine_common import (
    THREADS,
    crop_model,
    dense_model,
    interleaved_times,
    machine,
    macs,
    print_table,
)

from densemap.service.engine import Engine, EngineConfig, ScoreOptions
from densemap.service.engine.session import CPU, session_options


def crop_batches(image_chw, window, stride, batch):
    n_h = (image_chw.shape[1] - window) // stride + 1
    n_w = (image_chw.shape[2] - window) // stride + 1
    origins = [(i * stride, j * stride) for i in range(n_h) for j in range(n_w)]
    for start in range(0, len(origins), batch):
        chunk = origins[start : start + batch]
        yield np.stack([image_chw[:, t : t + window, s : s + window] for t, s in chunk])


def run_case(kind: str, size: int, batch: int, repeat: int):
    config = EngineConfig(intra_op_threads=THREADS, memory_budget=1 << 34)
    engine = Engine(dense_model(kind), config=config)
    geometry = engine.metadata.geometry
    window, stride = geometry.window[0], geometry.stride[0]
    rng = np.random.default_rng(0)
    image_chw = rng.normal(size=(3, size, size)).astype(np.float32)
    options = ScoreOptions(probabilities=False, image_top_k=0)
    dense = engine.score(image_chw, options).maps[0].scores

    crop_path = crop_model(kind)
    session = ort.InferenceSession(
        str(crop_path), sess_options=session_options(config), providers=[CPU]
    )
    outputs = []

    def run_crops():
        outputs.clear()
        for crops in crop_batches(image_chw, window, stride, batch):
            outputs.append(session.run(None, {"input": crops})[0][:, :, 0, 0])

    dense_seconds, crop_seconds = interleaved_times(
        [lambda: engine.score(image_chw, options), run_crops], repeat=repeat
    )
    crops = np.concatenate(outputs).T.reshape(dense.shape)
    n_crops = dense.shape[1] * dense.shape[2]
    mac_dense = macs(dense_model(kind), size, size)
    mac_crops = n_crops * macs(crop_path, window, window)
    speedup = crop_seconds / dense_seconds
    mac_ratio = mac_crops / mac_dense
    return [
        kind,
        f"{size}^2",
        n_crops,
        round(mac_dense / 1e9, 2),
        round(mac_crops / 1e9, 1),
        round(dense_seconds, 3),
        round(crop_seconds, 3),
        round(speedup, 1),
        round(mac_ratio, 1),
        round(speedup / mac_ratio, 2),
        f"{np.abs(dense - crops).max():.2e}",
    ]


def test_dense_vs_crops():
    rows = [run_case("mini_vgg", 512, batch=256, repeat=3)]
    if not os.environ.get("DENSEMAP_BENCH_SKIP_VGG"):
        rows.append(run_case("vgg16", 384, batch=12, repeat=2))
    print_table(
        f"Dense vs crops ({machine()})",
        [
            "model",
            "image",
            "crops",
            "dense GMAC",
            "crops GMAC",
            "dense s",
            "crops s",
            "speed-up",
            "MAC ratio",
            "speed-up/MAC",
            "max |dense-crops|",
        ],
        rows,
    )
    print("(VGG-16 is same-padded: its dense map is not equal to crops, see README, Exactness)")


if __name__ == "__main__":
    test_dense_vs_crops()
