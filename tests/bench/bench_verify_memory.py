"""Peak memory and bytes written by ``--verify`` on a VGG-11-sized ONNX classifier.

VGG-11 (torchvision's layout, written out in plain torch.nn: no torchvision needed), random
weights, 1000 classes, R = 224, exported with the legacy exporter (~507 MB of float32
weights) and converted once into $DENSEMAP_BENCH_DIR (default /tmp/densemap-bench). Then
``densemap.convert.verify(classifier, dense)`` runs in a fresh process, which reports its peak RSS
(``ru_maxrss``) and the bytes it wrote (``/proc/self/io``: ``wchar``). The table row goes
to README's benchmark table; the target is a peak under 2x the classifier's file size
beyond the interpreter and its libraries (measured as the RSS before ``verify``).

    PYTHONPATH=$PWD python -m pytest -q -s tests/bench/bench_verify_memory.py \
        -o python_files='bench_*.py'

For the code before, put its checkout on PYTHONPATH instead (the child runs in the bench
folder, so the current folder's code is not imported by accident).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import torch
from torch import nn

BENCH_DIR = Path(os.environ.get("DENSEMAP_BENCH_DIR", "/tmp/densemap-bench"))
VGG11_LAYERS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

CHILD = """
import json, resource, sys, time
import numpy as np
import psutil
from densemap.convert import verify
before = psutil.Process().memory_info().rss
start = time.perf_counter()
report = verify(sys.argv[1], sys.argv[2], progress=False)
seconds = time.perf_counter() - start
io = dict(line.split(": ") for line in open("/proc/self/io").read().split(chr(10)) if line)
print(json.dumps({
    "passed": report.passed, "seconds": seconds, "rss_before": before,
    "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "written": int(io["wchar"]), "table": report.table(),
}))
"""


def vgg11() -> nn.Module:
    """torchvision's VGG-11 (configuration A) with random weights."""
    torch.manual_seed(0)
    layers, channels = [], 3
    for width in VGG11_LAYERS:
        if width == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
            channels = width
    return nn.Sequential(
        *layers,
        nn.AdaptiveAvgPool2d(7),
        nn.Flatten(),
        nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
        nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
        nn.Linear(4096, 1000),
    ).eval()  # fmt: skip


def vgg11_files() -> tuple[Path, Path]:
    """(classifier.onnx, dense.onnx), built once."""
    from densemap.convert import convert_onnx
    from densemap.convert.export import export_classifier_onnx

    folder = BENCH_DIR / "vgg11_verify"
    classifier, dense = folder / "classifier.onnx", folder / "dense.onnx"
    if not classifier.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        proto = export_classifier_onnx(vgg11(), input_size=224, in_channels=3, dynamo=False)
        onnx.save_model(proto, str(classifier))
    if not dense.is_file():
        convert_onnx(classifier, dense, preprocessing=_preprocessing())
    return classifier, dense


def _preprocessing():
    from densemap.service.contract import Preprocessing

    return Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def measure(classifier: Path, dense: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(classifier), str(dense)],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ,
        cwd=BENCH_DIR,
    )  # cwd: the code verified is the one on PYTHONPATH, not the current folder's
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_verify_memory_on_vgg11():
    classifier, dense = vgg11_files()
    result = measure(classifier, dense)
    size = classifier.stat().st_size
    mib = 2**20
    print(result["table"])
    print(
        f"verify, VGG-11 ONNX ({size / mib:.0f} MiB): peak RSS {result['peak_rss'] / mib:.0f} MiB "
        f"({result['rss_before'] / mib:.0f} MiB before verify), wrote "
        f"{result['written'] / mib:.0f} MiB, {result['seconds']:.0f} s; "
        f"(peak - before) / model = {(result['peak_rss'] - result['rss_before']) / size:.2f}"
    )
    assert result["passed"]


if __name__ == "__main__":
    test_verify_memory_on_vgg11()
