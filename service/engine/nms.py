"""Greedy non-maximum suppression on the host, in numpy (docs/engine.md "Detections").

Boxes are float arrays [N, 4] of (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0; the area of a
box is (x1 - x0) * (y1 - y0) (continuous coordinates, no "+1"). Greedy NMS takes boxes in
the given order (best first) and keeps a box unless its IoU with a box already kept is
greater than ``iou``; boxes of zero area have IoU 0 with every box. ``limit`` stops after
that many kept boxes, which gives the same first boxes as running to the end.
"""

from __future__ import annotations

import numpy as np


def iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box [4] with each of ``boxes`` [N, 4], float64 [N]."""
    width = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])
    height = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])
    overlap = np.clip(width, 0.0, None) * np.clip(height, 0.0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - overlap
    out = np.zeros(len(boxes), dtype=np.float64)
    np.divide(overlap, union, out=out, where=union > 0)
    return out


def greedy_nms(boxes: np.ndarray, iou: float, *, limit: int | None = None) -> np.ndarray:
    """Indices (into ``boxes``, in order) of the boxes greedy NMS keeps; ``boxes`` is
    sorted best first by the caller."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    remaining = np.arange(len(boxes))
    kept: list[int] = []
    while remaining.size and (limit is None or len(kept) < limit):
        best = remaining[0]
        kept.append(int(best))
        rest = remaining[1:]
        if iou >= 1.0:  # nothing can be suppressed: IoU never exceeds 1
            remaining = rest
            continue
        remaining = rest[iou_one_to_many(boxes[best], boxes[rest]) <= iou]
    return np.asarray(kept, dtype=np.int64)


def order_best_first(scores: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """Indices sorting by score, highest first, then by each of ``keys`` ascending
    (a total order, so equal scores come out the same way on every run)."""
    return np.lexsort((*reversed(keys), -np.asarray(scores, dtype=np.float64)))


def nms_per_class(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    *,
    iou: float,
    limit: int,
    tie_keys: tuple[np.ndarray, ...] = (),
    across_classes: bool = False,
) -> np.ndarray:
    """Indices of the boxes kept by greedy NMS run per class (``across_classes``: over all
    boxes at once, so a box also suppresses other classes' boxes), best first over all
    classes, at most ``limit`` of them. Ties in score are broken by class, then ``tie_keys``."""
    classes = np.asarray(classes)
    order = order_best_first(scores, classes, *tie_keys)
    if across_classes:
        return order[greedy_nms(boxes[order], iou, limit=limit)]
    kept = []
    for value in np.unique(classes):
        members = order[classes[order] == value]
        kept.append(members[greedy_nms(boxes[members], iou, limit=limit)])
    if not kept:
        return np.zeros(0, dtype=np.int64)
    chosen = np.concatenate(kept)
    ranked = order_best_first(scores[chosen], classes[chosen], *(k[chosen] for k in tie_keys))
    return chosen[ranked][:limit]
