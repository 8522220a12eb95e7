"""Benchmark: int8 vs fp32 through ``Engine.score`` on CPU, interleaved in one run.

Run: ``.venv/bin/python tests/bench/bench_engine_int8.py`` (or with pytest
``-o python_files='bench_*.py'``). Target: int8 >= 2x fp32's speed with >= 99% argmax
agreement.

Models, each written by ``densemap convert --int8-calibration`` (int8 copies calibrated
on images that are not the ones timed):

- mini-VGG classifier (random weights), 1024² image; calibrated on 4 other pictures 256².
- VGG-16 (random weights, ``--random-weights``), 512² image (a 1024² fp32 pass takes
  seconds on 2 cores); calibrated on 4 other pictures 256².
- the bundled ``digits`` model (its trained ``classifier.pt``, converted again here with
  int8 copies): its 3 sample pages (PNG bytes, one call each: small pages, where decoding
  and the request's fixed costs weigh), and the 2048² page of ``bench_detections.py``
  tiled from them; calibrated on 4 synthetic pages drawn like them with another seed (the
  agreement is the pages', not calibration's).

Agreement: share of cells whose top class is fp32's; max |dz|/range: the largest logit
deviation over the fp32 logit range (as GetModel's precision report).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from bench_detections import page_2048
from bench_engine_common import (
    BENCH_DIR,
    THREADS,
    converted_model,
    interleaved_times,
    machine,
    picture,
    print_table,
)
from PIL import Image

from densemap.service.engine import Engine, EngineConfig, ScoreOptions

ROOT = Path(__file__).resolve().parents[2]
REPEAT = int(os.environ.get("DENSEMAP_BENCH_REPEAT", "3"))
FP32 = ScoreOptions(probabilities=False, argmax=True, image_top_k=0, precision="fp32")
INT8 = ScoreOptions(probabilities=False, argmax=True, image_top_k=0, precision="int8")
TIMED = ScoreOptions(top_k=5, include_map=False)


def digits_model() -> Path:
    """The bundled digits classifier, converted with int8 copies calibrated on 4 synthetic
    pages (seed 7: not the bundled pages, whose seed is 2024)."""
    from densemap.convert import convert_torch
    from densemap.convert.pipeline import read_metadata
    from models.digits.data import load_split
    from models.digits.pages import SAMPLE_PAGE_SHAPES, make_pages
    from models.digits.train import load_classifier

    folder = BENCH_DIR / "digits_int8"
    path = folder / "model.onnx"
    if (folder / "model.int8.onnx").is_file():
        return path
    calibration = BENCH_DIR / "calibration_digits"
    calibration.mkdir(parents=True, exist_ok=True)
    split = load_split()
    pages = make_pages(
        split.test_glyphs, split.test_labels, shapes=SAMPLE_PAGE_SHAPES + ((256, 256),),
        counts=(24, 30, 28, 20), seed=7,
    )  # fmt: skip
    for index, page in enumerate(pages):
        Image.fromarray(page.image).save(calibration / f"page_{index}.png")
    shipped = read_metadata(ROOT / "models/digits/model.onnx")
    convert_torch(
        load_classifier(ROOT / "models/digits/classifier.pt"), path, input_size=28,
        in_channels=1, labels=shipped.labels, preprocessing=shipped.preprocessing,
        source="digits", int8_calibration=calibration,
    )  # fmt: skip
    return path


def agreement(engine, images) -> tuple[float, float]:
    """(argmax agreement over every cell of ``images``, max |dz|/range)."""
    same = cells = 0
    deviation = 0.0
    for image in images:
        exact = engine.score(image, FP32).maps[0]
        other = engine.score(image, INT8).maps[0]
        same += int((exact.argmax == other.argmax).sum())
        cells += exact.argmax.size
        spread = float(exact.scores.max() - exact.scores.min()) or 1.0
        deviation = max(deviation, float(np.abs(other.scores - exact.scores).max()) / spread)
    return same / cells, deviation


def row(name: str, path: Path, images, what: str) -> list:
    engine = Engine(path, config=EngineConfig(device="cpu", intra_op_threads=THREADS))
    fp32_s, int8_s = interleaved_times(
        [
            lambda: [engine.score(i, TIMED) for i in images],
            lambda: [engine.score(i, ScoreOptions(top_k=5, include_map=False, precision="int8"))
                     for i in images],
        ],
        repeat=REPEAT,
    )  # fmt: skip
    agree, deviation = agreement(engine, images)
    calibrated = engine.metadata.int8
    return [
        name, what, round(fp32_s * 1e3, 1), round(int8_s * 1e3, 1), f"{fp32_s / int8_s:.2f}x",
        f"{agree:.2%}", f"{deviation:.2e}",
        f"{calibrated.argmax_agreement:.2%} on {calibrated.images}",
    ]  # fmt: skip


def test_int8_vs_fp32():
    rows = [
        row("mini-VGG", converted_model("mini_vgg", int8=True), [picture(1, (1024, 1024))],
            "1024²"),
        row("VGG-16", converted_model("vgg16", int8=True), [picture(2, (512, 512))], "512²"),
    ]  # fmt: skip
    pages = sorted((ROOT / "models/digits/pages").glob("page_*.png"))
    page_images = [path.read_bytes() for path in pages]
    rows.append(row("digits", digits_model(), page_images, f"{len(pages)} sample pages"))
    rows.append(row("digits", digits_model(), [page_2048()], "2048² page of them"))
    print_table(
        f"int8 vs fp32 through Engine.score, top-5 out ({machine()})",
        ["model", "image", "fp32 ms", "int8 ms", "speed-up (>= 2x)", "agreement (>= 99%)",
         "max|dz|/range", "agreement at calibration"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    test_int8_vs_fp32()
