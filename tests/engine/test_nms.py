"""densemap.service.engine.nms against a plain-Python greedy NMS and hand-computed IoUs."""

from __future__ import annotations

import numpy as np
import pytest

from densemap.service.engine.nms import greedy_nms, iou_one_to_many, nms_per_class, order_best_first


def plain_iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def plain_nms(boxes, scores, classes, iou, limit, across_classes=False):
    order = sorted(range(len(scores)), key=lambda k: (-scores[k], classes[k], k))
    kept = []
    for k in order:
        if all(
            (classes[m] != classes[k] and not across_classes)
            or plain_iou(boxes[m], boxes[k]) <= iou
            for m in kept
        ):
            kept.append(k)
    return kept[:limit]


def test_iou_of_known_boxes():
    box = np.array([0.0, 0.0, 10.0, 10.0])
    others = np.array(
        [[0, 0, 10, 10], [5, 0, 15, 10], [10, 10, 20, 20], [2, 2, 4, 4], [3, 3, 3, 9]], float
    )
    np.testing.assert_allclose(iou_one_to_many(box, others), [1.0, 50 / 150, 0.0, 0.04, 0.0])


def test_greedy_nms_suppresses_above_the_threshold_only():
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [1, 0, 11, 10], [20, 20, 30, 30]], float)
    # IoU(0, 1) = 1/3, IoU(0, 2) = 9/11
    assert greedy_nms(boxes, 0.5).tolist() == [0, 1, 3]
    assert greedy_nms(boxes, 0.3).tolist() == [0, 3]
    assert greedy_nms(boxes, 1 / 3).tolist() == [0, 1, 3]  # equal to the threshold: kept
    assert greedy_nms(boxes, 1.0).tolist() == [0, 1, 2, 3]
    assert greedy_nms(boxes, 0.5, limit=2).tolist() == [0, 1]
    assert greedy_nms(np.zeros((0, 4)), 0.5).tolist() == []


@pytest.mark.parametrize("seed", range(6))
def test_nms_per_class_matches_plain_python(seed):
    rng = np.random.default_rng(seed)
    n = 300
    corner = rng.integers(0, 60, size=(n, 2)).astype(float)
    size = rng.integers(4, 20, size=(n, 2)).astype(float)
    boxes = np.concatenate([corner, corner + size], axis=1)
    scores = rng.integers(0, 20, size=n) / 20.0  # many exact ties
    classes = rng.integers(0, 3, size=n)
    for iou, limit in ((0.5, 1000), (0.2, 7), (0.0, 1000), (0.9, 50)):
        got = nms_per_class(boxes, scores, classes, iou=iou, limit=limit, tie_keys=(np.arange(n),))
        assert got.tolist() == plain_nms(boxes, scores, classes, iou, limit)
        agnostic = nms_per_class(
            boxes, scores, classes, iou=iou, limit=limit, tie_keys=(np.arange(n),),
            across_classes=True,
        )  # fmt: skip
        assert agnostic.tolist() == plain_nms(boxes, scores, classes, iou, limit, True)
        if iou < 1.0:
            assert len(agnostic) < len(got) or len(got) == limit


def test_order_breaks_ties_by_the_keys():
    scores = np.array([0.5, 0.9, 0.5, 0.5])
    first = np.array([1, 0, 0, 0])
    second = np.array([0, 0, 2, 1])
    assert order_best_first(scores, first, second).tolist() == [1, 3, 2, 0]
