"""Engine detections on a model whose right boxes are known (tests/support/square_model.py)."""

from __future__ import annotations

import numpy as np
import pytest

from densemap.service.engine import Engine, EngineConfig, ScoreOptions
from densemap.service.engine.image_input import resize_uint8, resized_size
from densemap.service.engine.options import DetectionOptions
from densemap.service.errors import InvalidOption
from tests.engine.test_nms import plain_iou
from tests.support.paths import REPO_ROOT
from tests.support.square_model import GAIN, LEVEL, reference_map, square_model, squares_image

CPU = EngineConfig(device="cpu", warmup=False, intra_op_threads=1)
SQUARES = [(0, 8, 16, 8), (1, 32, 32, 8), (0, 40, 4, 12), (1, 0, 52, 8), (0, 52, 48, 10)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(square_model(tmp_path_factory.mktemp("squares")), config=CPU)


@pytest.fixture(scope="module")
def image():
    return squares_image(64, 72, SQUARES)


def as_tuples(detections):
    return [(d.class_index, d.label, d.box, d.scale_index, d.cell) for d in detections]


def plain_detections(result, *, classes, threshold, iou, limit, offsets=(0, 0, 0, 0)):
    """Candidates from the returned maps, then greedy NMS per class in plain Python."""
    found = []
    for s, scale_map in enumerate(result.maps):
        g = scale_map.geometry
        for c in classes:
            for i, j in zip(*np.nonzero(scale_map.scores[c] >= threshold), strict=True):
                top, left, bottom, right = g.window_at(int(i), int(j))
                w, h = right - left, bottom - top
                box = (
                    left + offsets[0] * w,
                    top + offsets[1] * h,
                    right + offsets[2] * w,
                    bottom + offsets[3] * h,
                )
                found.append((float(scale_map.scores[c, i, j]), c, s, int(i), int(j), box))
    found.sort(key=lambda f: (-f[0], f[1], f[2], f[3], f[4]))
    kept = []
    for f in found:
        if all(k[1] != f[1] or plain_iou(k[5], f[5]) <= iou for k in kept):
            kept.append(f)
    labels = result.labels
    return [(c, labels[c], box, s, (i, j)) for _, c, s, i, j, box in kept[:limit]]


def test_each_window_sized_square_is_one_box_at_its_place(engine):
    image = squares_image(64, 72, [(0, 8, 16, 8), (1, 32, 32, 8), (1, 0, 52, 8), (0, 41, 5, 9)])
    result = engine.score(image, ScoreOptions(detections=DetectionOptions()))
    # equal scores: by class, then cell; the 9 px square (rows 41-49) fills no grid window
    assert [(d.class_index, d.label, d.box, d.cell) for d in result.detections] == [
        (1, "red", (16.0, 8.0, 24.0, 16.0), (2, 4)),
        (2, "green", (52.0, 0.0, 60.0, 8.0), (0, 13)),
        (2, "green", (32.0, 32.0, 40.0, 40.0), (8, 8)),
    ]
    exact = 1 / (1 + np.exp(-GAIN * (1 - LEVEL)) + np.exp(-GAIN * LEVEL))  # softmax
    assert all(d.score == pytest.approx(exact, abs=1e-6) for d in result.detections)
    assert all(d.scale == 1.0 and d.scale_index == 0 for d in result.detections)


def test_a_bigger_square_gives_the_windows_inside_it(engine):
    image = squares_image(64, 64, [(0, 40, 4, 12)])  # windows at rows 40, 44 x cols 4, 8
    got = engine.score(image, ScoreOptions(detections=DetectionOptions(iou=0.2))).detections
    # neighbours 4 px apart have IoU 1/3 > 0.2, diagonal ones 1/7: (10, 1) suppresses
    # (10, 2) and (11, 1), but not (11, 2)
    assert [(d.box, d.cell) for d in got] == [
        ((4.0, 40.0, 12.0, 48.0), (10, 1)),
        ((8.0, 44.0, 16.0, 52.0), (11, 2)),
    ]


def test_the_map_is_the_known_function(engine, image):
    result = engine.score(image, ScoreOptions(output_stride=2))
    np.testing.assert_allclose(result.maps[0].scores, reference_map(image, 2), atol=1e-6)


@pytest.mark.parametrize(
    "threshold, iou, limit", [(0.5, 0.5, 100), (0.01, 0.3, 100), (0.001, 0.0, 5), (0.2, 1.0, 100)]
)
def test_multiscale_boxes_equal_the_plain_reference(engine, image, threshold, iou, limit):
    options = ScoreOptions(output_stride=2, scales=(1.0, 2.0, 0.75))
    result = engine.score(image, options)
    detections = DetectionOptions(threshold=threshold, iou=iou, max_count=limit)
    expected = plain_detections(result, classes=(1, 2), threshold=threshold, iou=iou, limit=limit)
    assert expected  # the reference finds something to compare
    for variant in (
        options,  # reuses the caller's float32 probability map
        ScoreOptions(output_stride=2, scales=options.scales, include_map=False),
        ScoreOptions(output_stride=2, scales=options.scales, probabilities=False, dtype="float16"),
        ScoreOptions(output_stride=2, scales=options.scales, classes=(0,), top_k=1),
    ):
        with_boxes = ScoreOptions(**{**variant.__dict__, "detections": detections})
        got = engine.score(image, with_boxes).detections
        assert as_tuples(got) == expected


def test_scale_boxes_are_in_original_pixels(engine):
    image = squares_image(64, 64, [(0, 16, 24, 16)])  # 16 px: one 8 px window at scale 0.5
    result = engine.score(
        image, ScoreOptions(scales=(0.5,), detections=DetectionOptions(threshold=0.5))
    )
    assert [(d.box, d.scale, d.cell) for d in result.detections] == [
        ((24.0, 16.0, 40.0, 32.0), 0.5, (2, 3))
    ]
    size = resized_size(64, 64, 0.5, max_pixels=CPU.max_pixels)
    small = resize_uint8(image, size)
    assert reference_map(small)[1, 2, 3] > 0.5  # blurred edges: 0.82


def test_classes_threshold_max_count_and_offsets(engine, image):
    options = DetectionOptions(classes=(2,), box_offsets=(0.25, 0.25, -0.25, -0.5))
    got = engine.score(image, ScoreOptions(detections=options)).detections
    # window + (0.25 * 8, 0.25 * 8, -0.25 * 8, -0.5 * 8); ties ordered by cell
    assert [(d.label, d.box, d.cell) for d in got] == [
        ("green", (54.0, 2.0, 58.0, 4.0), (0, 13)),
        ("green", (34.0, 34.0, 38.0, 36.0), (8, 8)),
    ]
    assert (
        len(engine.score(image, ScoreOptions(detections=DetectionOptions(max_count=1))).detections)
        == 1
    )
    assert (
        engine.score(image, ScoreOptions(detections=DetectionOptions(threshold=1.0))).detections
        == []
    )
    assert engine.score(image, ScoreOptions()).detections is None


def test_model_default_offsets_come_from_the_engine_config(tmp_path):
    image = squares_image(32, 32, [(0, 8, 16, 8)])
    config = EngineConfig(device="cpu", warmup=False, box_offsets=(0.0, 0.0, 0.5, 0.5))
    engine = Engine(square_model(tmp_path), config=config)
    got = engine.score(image, ScoreOptions(detections=DetectionOptions(classes=(1,))))
    assert [d.box for d in got.detections] == [(16.0, 8.0, 28.0, 20.0)]


@pytest.mark.parametrize(
    "options, words",
    [
        (dict(threshold=1.5), "threshold must be in [0, 1]"),
        (dict(threshold="high"), "threshold must be a number"),
        (dict(iou=-0.1), "iou must be in [0, 1]"),
        (dict(classes=(3,)), "distinct class indices of this model (0..2)"),
        (dict(classes=(1, 1)), "detections.classes holds duplicates"),
        (dict(max_count=0), "max_count must be in 1..10000"),
        (dict(max_count=2.5), "max_count must be an int"),
        (dict(box_offsets=(0, 0, -1, 0)), "box of positive size"),
        (dict(box_offsets=(0, 0)), "must be 4 numbers"),
        ("yes", "detections must be a DetectionOptions"),
    ],
)
def test_bad_detection_options_are_named(engine, image, options, words):
    """Refused by DetectionOptions when built, or by the engine (classes of this model)."""
    with pytest.raises(InvalidOption, match=None) as caught:
        found = DetectionOptions(**options) if isinstance(options, dict) else options
        engine.score(image, ScoreOptions(detections=found))
    assert words in str(caught.value)


def test_detections_from_tiles_equal_the_single_pass(monkeypatch):
    """Cells above the threshold come back sparse from each tile, placed by the tile's own
    cell offsets: tiled scoring must find exactly the single pass's boxes."""

    digits = REPO_ROOT / "models" / "digits"
    page = (digits / "pages" / "page_1.png").read_bytes()
    options = ScoreOptions(output_stride=2, detections=DetectionOptions(iou=0.3))
    whole = Engine(digits / "model.onnx", config=EngineConfig(warmup=False)).score(page, options)
    tiled_engine = Engine(
        digits / "model.onnx", config=EngineConfig(warmup=False, memory_budget=4 << 20)
    )
    from densemap.service.engine.dense import DenseNet

    passes = []
    run_pass = DenseNet.run_pass

    def counting(net, *args, **kwargs):
        passes.append(1)
        return run_pass(net, *args, **kwargs)

    monkeypatch.setattr(DenseNet, "run_pass", counting)
    tiled = tiled_engine.score(page, options)
    assert len(passes) > 1 and len(whole.detections) > 10  # really tiled, really found
    assert tiled.detections == whole.detections
