"""Shared helpers of the engine benchmarks: model cache, timing, MAC counts, tables.

Models are built once into $DENSEMAP_BENCH_DIR (default /tmp/densemap-bench) with random
weights: a mini-VGG (64x64 window, stride 8, unpadded) and VGG-16 (224 window, stride 32,
same-padded, 4096-4096-1000 head, ~553 MB of weights). :func:`dense_model` builds them
dense in torch (tests/support/dense_models.py); :func:`converted_model` writes the classifier with
``densemap convert`` (in-graph cell crop, optional int8 copies), as users get them.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: helpers import as tests.support.*
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from densemap.service.engine.memory import conv_macs  # noqa: E402
from tests.support.dense_models import (  # noqa: E402
    build_dense_model,
    make_dense_net,
    mini_vgg_layers,
    vgg16_layers,
)

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


def mini_vgg_classifier(seed: int = 0) -> nn.Sequential:
    """The mini-VGG as a window classifier (Flatten + Linear head), random weights."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 24, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(24, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 5 * 5, 64), nn.ReLU(), nn.Linear(64, 10),
    ).eval()  # fmt: skip


def picture(seed: int, size: tuple[int, int], channels: int = 3) -> np.ndarray:
    """A uint8 HxWxC image with structure (smooth colour blobs plus fine noise), for
    calibrating and scoring random-weight nets: not uniform noise at every pixel."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, size[0] // 32), max(2, size[1] // 32), channels))
    image = Image.fromarray(coarse.astype(np.uint8).squeeze()).resize(size[::-1])
    pixels = np.asarray(image, dtype=np.int16).reshape(*size, channels)
    noise = rng.integers(-24, 25, pixels.shape)
    return np.clip(pixels + noise, 0, 255).astype(np.uint8)


def calibration_folder(kind: str, size=(256, 256), count: int = 4) -> Path:
    """A folder of :func:`picture` PNGs (seeds 1000+) to calibrate int8 copies on."""
    folder = BENCH_DIR / f"calibration_{kind}"
    if len(list(folder.glob("*.png"))) != count:
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.fromarray(picture(1000 + index, size)).save(folder / f"{index}.png")
    return folder


def converted_model(kind: str, *, int8: bool = False) -> Path:
    """``densemap convert``'s model of the classifier ``kind`` ("mini_vgg": ONNX path;
    "vgg16": torch path, --random-weights), with int8 copies when ``int8``."""
    from densemap.convert import archs, convert_onnx, convert_torch

    folder = BENCH_DIR / f"{kind}_converted{'_int8' if int8 else ''}"
    path = folder / "model.onnx"
    if path.is_file() and (not int8 or (folder / "model.int8.onnx").is_file()):
        return path
    calibration = calibration_folder(kind) if int8 else None
    if kind == "mini_vgg":
        source = BENCH_DIR / "mini_vgg_classifier.onnx"
        source.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                mini_vgg_classifier(), (torch.zeros(1, 3, 64, 64),), str(source),
                dynamo=False, opset_version=17, input_names=["input"], output_names=["scores"],
            )  # fmt: skip
        convert_onnx(source, path, preprocessing="unit", int8_calibration=calibration)
    else:
        torch.manual_seed(0)
        model = archs.build(kind).eval()
        convert_torch(
            model, path, input_size=224, random_weights=True, int8_calibration=calibration,
            preprocessing=archs.get_spec(kind).preprocessing,
        )  # fmt: skip
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
