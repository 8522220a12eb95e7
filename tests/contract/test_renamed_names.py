"""Names that say one thing (issue 23, point 4): the new names work, the old public ones
still work with a DeprecationWarning, and the engine checks options against its model
before any image (Engine.check_options)."""

from __future__ import annotations

import warnings

import pytest

from densemap.service.contract import Geometry
from densemap.service.engine import Engine, EngineConfig, ScoreMap, ScoreOptions, ScoreResult
from densemap.service.engine.options import DetectionOptions
from densemap.service.engine.result import MapGeometry
from densemap.service.errors import InvalidOption
from tests.support.paths import REPO_ROOT

DIGITS = REPO_ROOT / "models" / "digits" / "model.onnx"


def test_score_result_is_the_result_and_score_map_its_deprecated_alias():
    assert ScoreMap is ScoreResult


def test_window_at_is_rows_then_columns_and_box_its_deprecated_name():
    geometry = Geometry(window=(20, 30), stride=(4, 8), receptive_field=(20, 30))
    assert geometry.window_at(2, 3) == (8, 24, 28, 54)  # top, left, bottom, right
    placed = MapGeometry(
        stride=(4, 8),
        window=(20, 30),
        origin=(0, 0),
        receptive_field=(20, 30),
        receptive_field_offset=(0, 0),
        resize=(0.5, 2.0),
    )
    assert placed.window_at(1, 1) == (8.0, 4.0, 48.0, 19.0)
    for old, new in ((geometry.box, geometry.window_at), (placed.box, placed.window_at)):
        with pytest.warns(DeprecationWarning, match=r"\.box is deprecated: use .*\.window_at"):
            assert old(1, 2) == new(1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        geometry.window_at(0, 0)  # the new name warns nothing


@pytest.fixture(scope="module")
def digits():
    return Engine(DIGITS, config=EngineConfig(warmup=False))


@pytest.mark.parametrize(
    "options, words",
    [
        (ScoreOptions(output_stride=3), "output_stride 3 is not supported by model"),
        (ScoreOptions(top_k=99), "top_k=99 but only"),
        (ScoreOptions(classes=(99,)), r"classes \[99\] are not class indices"),
        (ScoreOptions(heads=("boxes",)), r"the model has no head\(s\) \['boxes'\]"),
        (
            ScoreOptions(detections=DetectionOptions(classes=(99,))),
            "distinct class indices of this model",
        ),
    ],
)
def test_check_options_refuses_what_the_model_cannot_take(digits, options, words):
    with pytest.raises(InvalidOption, match=words):
        digits.check_options(options)


def test_check_options_passes_what_the_model_takes(digits):
    stride = digits.supported_strides[-1]
    digits.check_options(ScoreOptions(output_stride=stride, top_k=3, argmax=True))
    digits.check_options(ScoreOptions(detections=DetectionOptions(threshold=0.9)))
    with pytest.raises(InvalidOption, match="ScoreOptions"):
        digits.check_options({"top_k": 1})
