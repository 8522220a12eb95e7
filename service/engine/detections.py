"""Detections on top of the score maps: threshold, window boxes, NMS per class across scales.

For each requested scale the engine fetches the probability map of the detection classes
(the caller's own map when it already is one: float32 probabilities of every class, else a
second postprocess output of the same passes). Every cell (i, j) whose probability of a
class is >= the threshold is a candidate of that class; its box is the cell's window in
original-image pixels, moved by the box offsets (:class:`DetectionOptions`). Greedy NMS
(:mod:`densemap.service.engine.nms`) then runs per class over the candidates of all scales together,
and the best ``max_count`` survivors are returned. Rules: docs/engine.md "Detections".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from densemap.service.engine.nms import nms_per_class
from densemap.service.engine.options import BACKGROUND_LABEL, DetectionDefaults, DetectionOptions
from densemap.service.engine.result import Detection, MapGeometry
from densemap.service.errors import InvalidOption


@dataclass(frozen=True)
class DetectionPlan:
    """Validated detection options for one model."""

    classes: tuple[int, ...]
    threshold: float
    iou: float
    max_count: int
    box_offsets: tuple[float, float, float, float]
    across_classes: bool = False


def default_classes(labels: tuple[str, ...], num_classes: int) -> tuple[int, ...]:
    """Every class but the one labelled ``background`` (if any)."""
    return tuple(c for c in range(num_classes) if c >= len(labels) or labels[c] != BACKGROUND_LABEL)


def detection_classes(
    options: DetectionOptions, *, labels: tuple[str, ...], num_classes: int
) -> tuple[int, ...]:
    """The classes to report for this model; InvalidOption naming the fix. The options
    checked their own values (DetectionOptions); this checks what depends on the model."""
    if options.classes is None:
        classes = default_classes(labels, num_classes)
        if not classes:
            raise InvalidOption(
                "detections.classes is empty (the model's only class is background): give "
                "the class indices to report"
            )
        return classes
    if max(options.classes) >= num_classes:
        raise InvalidOption(
            f"detections.classes {list(options.classes)} must be distinct class indices of "
            f"this model (0..{num_classes - 1})"
        )
    return options.classes


def _given(value, default):
    """A request's value, or the model's where it left the field None."""
    return default if value is None else value


def plan_detections(
    options: DetectionOptions,
    *,
    labels: tuple[str, ...],
    num_classes: int,
    box_offsets: tuple[float, float, float, float],
    defaults: DetectionDefaults = DetectionDefaults(),
) -> DetectionPlan:
    """The detection plan for this model; the fields ``options`` leaves None are the
    model's ``defaults`` (EngineConfig.detections) and ``box_offsets``
    (EngineConfig.box_offsets). DetectionOptions and DetectionDefaults checked their own
    values; this checks only the classes, which depend on the model."""
    return DetectionPlan(
        classes=detection_classes(options, labels=labels, num_classes=num_classes),
        threshold=_given(options.threshold, defaults.threshold),
        iou=_given(options.iou, defaults.iou),
        max_count=_given(options.max_count, defaults.max_count),
        box_offsets=_given(options.box_offsets, box_offsets),
        across_classes=_given(options.across_classes, defaults.across_classes),
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
