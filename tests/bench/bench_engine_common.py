"""Shared helpers of the engine benchmarks: model cache, timing, MAC counts, tables.

Models are built once into $DENSEMAP_BENCH_DIR (default /tmp/densemap-bench) with random
weights: a mini-VGG (64x64 window, stride 8, unpadded) and VGG-16 (224 window, stride 32,
same-padded, 4096-4096-1000 head, ~553 MB of weights).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import onnx  # noqa: E402
import torch  # noqa: E402
from dense_models import (  # noqa: E402
    build_dense_model,
    make_dense_net,
    mini_vgg_layers,
    vgg16_layers,
)

from service.engine.memory import conv_macs  # noqa: E402

BENCH_DIR = Path(os.environ.get("DENSEMAP_BENCH_DIR", "/tmp/densemap-bench"))
THREADS = int(os.environ.get("DENSEMAP_BENCH_THREADS", "2"))

MINI_VGG = dict(layers=mini_vgg_layers(), window=(64, 64), channels=3, classes=10, hidden=64)
VGG16 = dict(layers=vgg16_layers(), window=(224, 224), channels=3, classes=1000, hidden=4096)


def dense_model(kind: str, *, with_atrous: tuple[int, ...] = ()) -> Path:
    """Path of the cached dense model ``kind`` ("mini_vgg" or "vgg16") with these variants."""
    spec = MINI_VGG if kind == "mini_vgg" else VGG16
    folder = BENCH_DIR / f"{kind}{''.join(f'_s{s}' for s in with_atrous)}"
    path = folder / "model.onnx"
    if not path.is_file() or not all((folder / f"model_s{s}.onnx").is_file() for s in with_atrous):
        build_dense_model(folder, with_atrous=with_atrous, **spec)
    return path


def crop_model(kind: str) -> Path:
    """The same net at window size with a dynamic batch: the classifier run on crops."""
    spec = MINI_VGG if kind == "mini_vgg" else VGG16
    path = BENCH_DIR / f"{kind}_crops.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        net = make_dense_net(**spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net,
                (torch.zeros(1, spec["channels"], *spec["window"]),),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["input"],
                output_names=["scores"],
                dynamic_axes={"input": {0: "batch"}},
            )
    return path


def macs(path: Path, height: int, width: int) -> int:
    return conv_macs(onnx.load(str(path), load_external_data=False), "input", height, width)


def best_time(function, *, repeat: int = 3) -> float:
    """Fastest wall time of ``repeat`` calls (after one untimed call).

    The minimum, not the mean: on a shared machine other processes only ever add time.
    """
    return interleaved_times([function], repeat=repeat)[0]


def interleaved_times(functions, *, repeat: int = 3) -> list[float]:
    """Fastest time of each function, running them in turns so load changes hit all alike."""
    for function in functions:
        function()
    best = [float("inf")] * len(functions)
    for _ in range(repeat):
        for index, function in enumerate(functions):
            start = time.perf_counter()
            function()
            best[index] = min(best[index], time.perf_counter() - start)
    return best


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for index, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if index == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def machine() -> str:
    return f"{os.cpu_count()} CPU threads visible, onnxruntime intra-op threads={THREADS}"
