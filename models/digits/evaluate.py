"""Measure the SHIPPED digits model through densemap's engine (the model card's numbers).

    python -m models.digits.evaluate [--model models/digits/model.onnx]

Everything is recomputed from the ONNX files with :class:`densemap.service.engine.Engine` (no torch)
on data built from the held-out split with fixed seeds:

- held-out accuracy: each of the 450 held-out digits once, in a 28x28 window, centred
  within half a stride, random size 16-20 px, paper, contrast, noise and neighbours;
- mixed held-out windows: 2,000 windows drawn like the training windows (35% background:
  blank, cut-off or off-centre digits) but from held-out digits only;
- page reading, at the native stride 4 and the à-trous strides 2 and 1: 20 pages of
  256x256 px with up to 40 held-out digits each. A digit is read when the cell centred
  nearest its centre names its class; the blank false-positive rate is the share of cells
  whose window touches no digit box and that do not say background; the off-centre
  false-positive rate the share of cells whose window touches a digit but whose centre is
  a stride (4 px) or more from every digit centre, and that name a digit. Detections
  (:func:`models.digits.reading.find_digits`) are matched to digits of the same class
  within 6 px (precision, recall).
- boxes, through the engine's detections (:data:`DETECTIONS`: box offsets and NMS from the model's
  ``densemap.json``): a box matches a drawn digit of the same label with IoU >= 0.5 with
  the digit's box (its side and place from the page generator); precision and recall.

Exit status 1 when a number misses its threshold (:data:`THRESHOLDS`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from densemap.service.engine import Engine, EngineConfig, ScoreOptions
from densemap.service.engine.model_settings import apply_model_settings
from densemap.service.engine.options import DetectionOptions
from models.digits.data import BACKGROUND, load_split
from models.digits.pages import make_pages
from models.digits.reading import (
    Detection,
    Grid,
    PageScore,
    digit_box,
    find_digits,
    match_boxes,
    score_page,
)
from models.digits.windows import centred_windows, sample_windows

DEFAULT_MODEL = Path(__file__).resolve().parent / "model.onnx"
HELDOUT_SEED = 1234
WINDOWS_SEED = 1235
PAGES_SEED = 4321
MIXED_WINDOWS = 2000
EVAL_PAGES = 20
EVAL_PAGE_SHAPE = (256, 256)
EVAL_PAGE_DIGITS = 40
STRIDES = (4, 2, 1)
MATCH_RADIUS = 6.0  # px between a detection's cell centre and the digit centre (Chebyshev)
CPU = EngineConfig(device="cpu", intra_op_threads=1, warmup=False)
BOX_STRIDES = (4, 2)
BOX_MIN_IOU = 0.5
# the digits' detection settings are the model's own (densemap.json "detections": threshold
# 0.5, NMS IoU 0.3 across classes, which drops a look-alike class named by the fringe cells
# of a digit); evaluate() loads them with the model, as densemap score and serve do
DETECTIONS = DetectionOptions()
BOX_THRESHOLDS = {"precision": 0.97, "recall": 0.97}  # at stride 2
THRESHOLDS = {
    "heldout_accuracy": 0.97,
    "reading_accuracy": 0.90,
    "blank_fp_rate": 0.02,
    "off_centre_fp_rate": 0.02,
}


def _share(part: int, whole: int) -> float:
    """part / whole, NaN when there is nothing to divide by."""
    return part / whole if whole else float("nan")


@dataclass(frozen=True)
class StrideReading:
    """Page reading at one output stride."""

    stride: int
    score: PageScore
    detections: int
    matched: int

    @property
    def precision(self) -> float:
        return _share(self.matched, self.detections)

    @property
    def recall(self) -> float:
        return _share(self.matched, self.score.digits)


@dataclass(frozen=True)
class BoxReading:
    """Detection boxes at one output stride, matched at IoU >= BOX_MIN_IOU."""

    stride: int
    digits: int
    detections: int
    matched: int

    @property
    def precision(self) -> float:
        return _share(self.matched, self.detections)

    @property
    def recall(self) -> float:
        return _share(self.matched, self.digits)


def read_boxes(engine: Engine, pages, *, stride: int) -> BoxReading:
    digits = detections = matched = 0
    options = ScoreOptions(output_stride=stride, include_map=False, detections=DETECTIONS)
    for page in pages:
        found = engine.score(page.image, options).detections
        truth = [(p.label, digit_box(p.centre, p.size)) for p in page.placements]
        matched += match_boxes([(d.class_index, d.box) for d in found], truth, min_iou=BOX_MIN_IOU)
        digits += len(truth)
        detections += len(found)
    return BoxReading(stride=stride, digits=digits, detections=detections, matched=matched)


@dataclass(frozen=True)
class Report:
    heldout: int
    heldout_correct: int
    windows: int
    windows_correct: int
    background_windows: int
    background_correct: int
    readings: tuple[StrideReading, ...]
    boxes: tuple[BoxReading, ...] = ()

    @property
    def heldout_accuracy(self) -> float:
        return self.heldout_correct / self.heldout

    @property
    def windows_accuracy(self) -> float:
        return self.windows_correct / self.windows


def _classify(engine: Engine, images: np.ndarray) -> np.ndarray:
    """Class of each 28x28 window: the engine's 1x1 map, one call per window."""
    options = ScoreOptions(argmax=True, include_map=False, image_top_k=1)
    return np.array([int(engine.score(image, options).maps[0].argmax[0, 0]) for image in images])


def match_detections(detections: list[Detection], placements) -> int:
    """Greedy, most confident first: detections naming an unmatched digit within radius."""
    free = list(range(len(placements)))
    matched = 0
    for det in detections:
        for k in free:
            p = placements[k]
            close = max(abs(det.centre[0] - p.centre[0]), abs(det.centre[1] - p.centre[1]))
            if det.label == p.label and close <= MATCH_RADIUS:
                free.remove(k)
                matched += 1
                break
    return matched


def read_pages(engine: Engine, pages, *, stride: int) -> StrideReading:
    total, detections, matched = PageScore(), 0, 0
    for page in pages:
        result = engine.score(page.image, ScoreOptions(output_stride=stride))
        scale_map = result.maps[0]
        geometry = scale_map.geometry
        grid = Grid(stride=geometry.stride, window=geometry.window, origin=geometry.origin)
        probabilities = scale_map.scores
        total = total + score_page(
            probabilities.argmax(axis=0), grid, page.placements, background=BACKGROUND
        )
        found = find_digits(probabilities, grid, background=BACKGROUND)
        detections += len(found)
        matched += match_detections(found, page.placements)
    return StrideReading(stride=stride, score=total, detections=detections, matched=matched)


def evaluate(model_path: str | Path = DEFAULT_MODEL, *, config: EngineConfig = CPU) -> Report:
    """All model-card numbers, recomputed from the ONNX files through the engine (on CPU by
    default: the card states fp32 CPU numbers; a GPU may flip an argmax at a near tie)."""
    engine = Engine(model_path, config=apply_model_settings(Path(model_path).parent, config))
    split = load_split()
    test_glyphs, test_labels = split.test_glyphs, split.test_labels
    images, targets = centred_windows(
        test_glyphs, test_labels, rng=np.random.default_rng(HELDOUT_SEED)
    )
    heldout_correct = int((_classify(engine, images) == targets).sum())
    images, targets = sample_windows(
        test_glyphs, test_labels, count=MIXED_WINDOWS, rng=np.random.default_rng(WINDOWS_SEED)
    )
    predicted = _classify(engine, images)
    is_background = targets == BACKGROUND
    pages = make_pages(
        test_glyphs,
        test_labels,
        shapes=(EVAL_PAGE_SHAPE,) * EVAL_PAGES,
        counts=(EVAL_PAGE_DIGITS,) * EVAL_PAGES,
        seed=PAGES_SEED,
    )
    return Report(
        heldout=len(test_labels),
        heldout_correct=heldout_correct,
        windows=len(targets),
        windows_correct=int((predicted == targets).sum()),
        background_windows=int(is_background.sum()),
        background_correct=int((predicted[is_background] == BACKGROUND).sum()),
        readings=tuple(read_pages(engine, pages, stride=s) for s in STRIDES),
        boxes=tuple(read_boxes(engine, pages, stride=s) for s in BOX_STRIDES),
    )


def failures(report: Report) -> list[str]:
    """Numbers that miss :data:`THRESHOLDS`, as messages (empty when all pass)."""
    problems = []
    if report.heldout_accuracy < THRESHOLDS["heldout_accuracy"]:
        problems.append(f"held-out accuracy {report.heldout_accuracy:.2%} < 97%")
    for r in report.readings:
        if r.score.reading_accuracy < THRESHOLDS["reading_accuracy"]:
            problems.append(f"stride {r.stride}: reading {r.score.reading_accuracy:.2%} < 90%")
        if r.score.blank_false_positive_rate > THRESHOLDS["blank_fp_rate"]:
            problems.append(
                f"stride {r.stride}: blank false positives "
                f"{r.score.blank_false_positive_rate:.2%} > 2%"
            )
        if r.score.off_centre_false_positive_rate > THRESHOLDS["off_centre_fp_rate"]:
            problems.append(
                f"stride {r.stride}: off-centre false positives "
                f"{r.score.off_centre_false_positive_rate:.2%} > 2%"
            )
    for b in report.boxes:
        low = b.precision < BOX_THRESHOLDS["precision"] or b.recall < BOX_THRESHOLDS["recall"]
        if b.stride == 2 and low:
            problems.append(
                f"stride 2: box precision {b.precision:.2%} / recall {b.recall:.2%} < 97%"
            )
    return problems


def print_report(report: Report) -> None:
    print(
        f"held-out accuracy: {report.heldout_accuracy:.2%} "
        f"({report.heldout_correct}/{report.heldout} centred held-out digits)"
    )
    print(
        f"mixed held-out windows: {report.windows_accuracy:.2%} ({report.windows_correct}/"
        f"{report.windows}); background kept {report.background_correct}/"
        f"{report.background_windows}"
    )
    print(
        "stride  digits  read     blank cells  blank FP  off-centre cells  off-centre FP  "
        "detections  precision  recall"
    )
    for r in report.readings:
        s = r.score
        print(
            f"{r.stride:>6}  {s.digits:>6}  {s.reading_accuracy:>7.2%}  {s.blank_cells:>11}  "
            f"{s.blank_false_positive_rate:>8.3%}  {s.off_cells:>16}  "
            f"{s.off_centre_false_positive_rate:>13.3%}  {r.detections:>10}  {r.precision:>9.2%}  "
            f"{r.recall:>6.2%}"
        )
    print("boxes (engine detections, IoU >= 0.5 with the digit's box, label right):")
    for b in report.boxes:
        print(
            f"  stride {b.stride}: {b.matched}/{b.detections} boxes right = {b.precision:.2%} "
            f"precision, {b.matched}/{b.digits} digits found = {b.recall:.2%} recall"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.digits.evaluate", description=__doc__)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    args = parser.parse_args(argv)
    report = evaluate(args.model)
    print_report(report)
    problems = failures(report)
    for problem in problems:
        print(f"BELOW THRESHOLD: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
