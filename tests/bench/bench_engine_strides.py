"""Benchmark: finer output strides by an à-trous variant (one pass) vs shift-and-stitch.

Run: ``.venv/bin/python tests/bench/bench_engine_strides.py`` (or ``pytest <file> -s``).
DENSEMAP_BENCH_SKIP_VGG=1 skips VGG-16 at stride 16 (two ~553 MB exports).
"""

from __future__ import annotations

import os

import numpy as np
from bench_engine_common import THREADS, dense_model, interleaved_times, machine, macs, print_table

from densemap.service.engine import Engine, EngineConfig, ScoreOptions


def stitch_macs(path, size, stride, output_stride, window):
    k, delta = stride // output_stride, output_stride
    return sum(
        macs(path, size - p * delta, size - q * delta)
        for p in range(k)
        for q in range(k)
        if size - max(p, q) * delta >= window
    )


def run_case(kind, size, output_stride, variants, repeat):
    config = EngineConfig(intra_op_threads=THREADS, memory_budget=1 << 34)
    atrous = Engine(dense_model(kind, with_atrous=variants), config=config)
    plain = Engine(dense_model(kind), config=config)
    geometry = plain.metadata.geometry
    stride, window = geometry.stride[0], geometry.window[0]
    image_chw = np.random.default_rng(1).normal(size=(3, size, size)).astype(np.float32)
    options = ScoreOptions(output_stride=output_stride, probabilities=False, image_top_k=0)
    atrous_seconds, stitch_seconds = interleaved_times(
        [lambda: atrous.score(image_chw, options), lambda: plain.score(image_chw, options)],
        repeat=repeat,
    )
    fast = atrous.score(image_chw, options).maps[0].scores
    slow = plain.score(image_chw, options).maps[0].scores
    variant = atrous.metadata.variants[variants.index(output_stride)].file
    variant_path = dense_model(kind, with_atrous=variants).parent / variant
    mac_atrous = macs(variant_path, size, size)
    mac_stitch = stitch_macs(dense_model(kind), size, stride, output_stride, window)
    time_ratio = stitch_seconds / atrous_seconds
    mac_ratio = mac_stitch / mac_atrous
    return [
        kind,
        f"{size}^2",
        f"{stride}->{output_stride}",
        "x".join(map(str, fast.shape[1:])),
        round(mac_atrous / 1e9, 2),
        round(mac_stitch / 1e9, 2),
        round(atrous_seconds, 3),
        round(stitch_seconds, 3),
        round(time_ratio, 2),
        round(mac_ratio, 2),
        round(time_ratio / mac_ratio, 2),
        f"{np.abs(fast - slow).max():.2e}",
    ]


def test_atrous_vs_shift_and_stitch():
    rows = [
        run_case("mini_vgg", 512, 4, (4, 2), repeat=3),
        run_case("mini_vgg", 512, 2, (4, 2), repeat=3),
    ]
    if not os.environ.get("DENSEMAP_BENCH_SKIP_VGG"):
        rows.append(run_case("vgg16", 384, 16, (16,), repeat=3))
    print_table(
        f"À trous vs shift-and-stitch ({machine()})",
        [
            "model",
            "image",
            "stride",
            "cells",
            "à-trous GMAC",
            "s&s GMAC",
            "à-trous s",
            "s&s s",
            "time ratio",
            "MAC ratio",
            "time/MAC",
            "max |diff|",
        ],
        rows,
    )
    print("(VGG-16 is same-padded: shift-and-stitch moves the zero border, so border cells differ)")


if __name__ == "__main__":
    test_atrous_vs_shift_and_stitch()
