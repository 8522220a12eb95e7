"""Detections on top of the score maps: threshold, window boxes, NMS per class across scales.

For each requested scale the engine fetches the probability map of the detection classes
(the caller's own map when it already is one: float32 probabilities of every class, else a
second postprocess output of the same passes). Every cell (i, j) whose probability of a
class is >= the threshold is a candidate of that class; its box is the cell's window in
original-image pixels, moved by the box offsets (:class:`DetectionOptions`). Greedy NMS
(:mod:`service.engine.nms`) then runs per class over the candidates of all scales together,
and the best ``max_count`` survivors are returned. Rules: docs/engine.md "Detections".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from service.engine.nms import nms_per_class
from service.engine.options import (
    BACKGROUND_LABEL,
    MAX_DETECTIONS,
    DetectionDefaults,
    DetectionOptions,
)
from service.engine.result import Detection, MapGeometry
from service.errors import InvalidOption


@dataclass(frozen=True)
class DetectionPlan:
    """Validated detection options for one model."""

    classes: tuple[int, ...]
    threshold: float
    iou: float
    max_count: int
    box_offsets: tuple[float, float, float, float]
    across_classes: bool = False


def _number(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise InvalidOption(f"detections.{name} must be a number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidOption(f"detections.{name} must be in [{low:g}, {high:g}], got {value!r}")
    return value


def _flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidOption(f"detections.{name} must be True or False, got {value!r}")
    return bool(value)


def default_classes(labels: tuple[str, ...], num_classes: int) -> tuple[int, ...]:
    """Every class but the one labelled ``background`` (if any)."""
    return tuple(c for c in range(num_classes) if c >= len(labels) or labels[c] != BACKGROUND_LABEL)


def _given(value, default):
    return default if value is None else value


def plan_detections(
    options: DetectionOptions,
    *,
    labels: tuple[str, ...],
    num_classes: int,
    box_offsets: tuple[float, float, float, float],
    defaults: DetectionDefaults = DetectionDefaults(),
) -> DetectionPlan:
    """Check ``options`` against the model, its fields left None taken from the model's
    ``defaults`` (and ``box_offsets``); raise InvalidOption naming the fix."""
    if not isinstance(options, DetectionOptions):
        raise InvalidOption(
            f"detections must be a DetectionOptions or None, got {type(options).__name__}"
        )
    if options.classes is None:
        classes = default_classes(labels, num_classes)
    else:
        classes = tuple(options.classes)
        bad = [c for c in classes if not isinstance(c, (int, np.integer)) or isinstance(c, bool)]
        bad += [c for c in classes if c not in bad and not 0 <= c < num_classes]
        if bad or len(set(classes)) != len(classes):
            raise InvalidOption(
                f"detections.classes {list(classes)} must be distinct class indices of this "
                f"model (0..{num_classes - 1})"
            )
        classes = tuple(int(c) for c in classes)
    if not classes:
        raise InvalidOption(
            "detections.classes is empty (the model's only class is background): give the "
            "class indices to report"
        )
    count = defaults.max_count if options.max_count is None else options.max_count
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
        raise InvalidOption(f"detections.max_count must be an int, got {count!r}")
    if not 1 <= count <= MAX_DETECTIONS:
        raise InvalidOption(f"detections.max_count must be in 1..{MAX_DETECTIONS}, got {count}")
    given = box_offsets if options.box_offsets is None else options.box_offsets
    try:
        offsets = tuple(_number("box_offsets", v, -10.0, 10.0) for v in given)
    except TypeError:
        offsets = ()
    if len(offsets) != 4 or 1 + offsets[2] - offsets[0] <= 0 or 1 + offsets[3] - offsets[1] <= 0:
        raise InvalidOption(
            f"detections.box_offsets must be 4 numbers (dx1, dy1, dx2, dy2) in window sizes "
            f"that leave a box of positive size (1 + dx2 - dx1 > 0, 1 + dy2 - dy1 > 0), "
            f"got {given!r}"
        )
    return DetectionPlan(
        classes=classes,
        threshold=_number("threshold", _given(options.threshold, defaults.threshold), 0.0, 1.0),
        iou=_number("iou", _given(options.iou, defaults.iou), 0.0, 1.0),
        max_count=int(count),
        box_offsets=offsets,
        across_classes=_flag(
            "across_classes", _given(options.across_classes, defaults.across_classes)
        ),
    )


@dataclass(frozen=True)
class Candidates:
    """Cells above the threshold at one scale (arrays of equal length)."""

    boxes: np.ndarray  # [N, 4] float64 x0, y0, x1, y1 in original-image pixels
    scores: np.ndarray  # [N] float32
    classes: np.ndarray  # [N] class indices
    rows: np.ndarray
    cols: np.ndarray
    scale_index: int
    scale: float


def candidates(above, plan: DetectionPlan, geometry: MapGeometry, scale_index: int) -> Candidates:
    """Boxes of the cells at or above the threshold, ``above`` = (detection-class index,
    row, column, probability) as the device found them (MapAssembly.above)."""
    channel, rows, cols, probabilities = above
    top = (geometry.origin[0] + rows * geometry.stride[0]) / geometry.resize[0]
    left = (geometry.origin[1] + cols * geometry.stride[1]) / geometry.resize[1]
    height = geometry.window[0] / geometry.resize[0]
    width = geometry.window[1] / geometry.resize[1]
    dx1, dy1, dx2, dy2 = plan.box_offsets
    boxes = np.stack(
        [
            left + dx1 * width,
            top + dy1 * height,
            left + width + dx2 * width,
            top + height + dy2 * height,
        ],
        axis=1,
    ).astype(np.float64)
    return Candidates(
        boxes=boxes.reshape(-1, 4),
        scores=np.asarray(probabilities, dtype=np.float32),
        classes=np.asarray(plan.classes, dtype=np.int64)[channel],
        rows=rows,
        cols=cols,
        scale_index=scale_index,
        scale=float(geometry.scale),
    )


def select(
    found: list[Candidates], plan: DetectionPlan, labels: tuple[str, ...]
) -> list[Detection]:
    """NMS per class over the candidates of every scale; best first, at most max_count.
    Equal scores are ordered by class, scale index, row, then column."""
    if not found:
        return []
    boxes = np.concatenate([c.boxes for c in found])
    scores = np.concatenate([c.scores for c in found])
    classes = np.concatenate([c.classes for c in found])
    scale_index = np.concatenate([np.full(len(c.scores), c.scale_index) for c in found])
    rows = np.concatenate([c.rows for c in found])
    cols = np.concatenate([c.cols for c in found])
    scales = {c.scale_index: c.scale for c in found}
    kept = nms_per_class(
        boxes,
        scores,
        classes,
        iou=plan.iou,
        limit=plan.max_count,
        tie_keys=(scale_index, rows, cols),
        across_classes=plan.across_classes,
    )
    return [
        Detection(
            class_index=int(classes[k]),
            label=labels[classes[k]] if classes[k] < len(labels) else str(int(classes[k])),
            score=float(scores[k]),
            box=tuple(float(v) for v in boxes[k]),
            scale=scales[int(scale_index[k])],
            scale_index=int(scale_index[k]),
            cell=(int(rows[k]), int(cols[k])),
        )
        for k in kept
    ]
