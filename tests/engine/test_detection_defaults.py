"""A model's own detection settings (densemap.json "detections"): read and checked at load,
applied to every detection field a request leaves unset (engine, densemap score, the
densemap.v1 codec), never over a value the request gives.

The bundled digits model keeps the demo's settings there (threshold 0.5, NMS IoU 0.3
across classes), so ``densemap score --detections`` reads its pages as the demo does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from densemap.service._proto.densemap.v1 import densemap_pb2 as pb
from densemap.service.cli import main
from densemap.service.engine import Engine, EngineConfig, ScoreOptions
from densemap.service.engine.model_settings import apply_model_settings
from densemap.service.engine.options import DetectionDefaults, DetectionOptions
from densemap.service.errors import ModelLoadError
from densemap.service.server.detection_codec import (
    detection_options_from_proto,
    detection_options_to_proto,
)
from models.digits.demo import read_truth
from models.digits.reading import match_boxes
from tests.support.paths import REPO_ROOT

DIGITS = REPO_ROOT / "models" / "digits"
PAGES = sorted((DIGITS / "pages").glob("page_*.png"))
DIGITS_SETTINGS = DetectionDefaults(threshold=0.5, iou=0.3, across_classes=True)
CPU = EngineConfig(device="cpu", warmup=False)

pytestmark = pytest.mark.skipif(
    not (DIGITS / "model.onnx").is_file() or not PAGES, reason="digits model not built"
)


def settings_folder(tmp_path: Path, settings: dict) -> Path:
    (tmp_path / "densemap.json").write_text(json.dumps(settings))
    return tmp_path


def test_the_digits_model_keeps_the_demos_settings():
    config = apply_model_settings(DIGITS, EngineConfig())
    assert config.detections == DIGITS_SETTINGS


def test_partial_settings_keep_the_defaults_for_the_rest(tmp_path):
    folder = settings_folder(tmp_path, {"detections": {"iou": 0.25, "max_count": 7}})
    got = apply_model_settings(folder, EngineConfig()).detections
    assert got == DetectionDefaults(iou=0.25, max_count=7)
    assert (got.threshold, got.across_classes) == (DetectionDefaults().threshold, False)


@pytest.mark.parametrize(
    "value, message",
    [
        ({"iou": 1.5}, r"detections.iou must be in \[0, 1\], got 1.5"),
        ({"threshold": "high"}, r"detections.threshold must be a number, got 'high'"),
        ({"max_count": 0}, r"detections.max_count must be in 1..10000, got 0"),
        ({"max_count": 2.5}, r"detections.max_count must be an int, got 2.5"),
        ({"across_classes": "yes"}, r"detections.across_classes must be True or False"),
        ({"iou": None}, r"detections.iou must be given, got None"),
        ({"nms_iou": 0.3}, r"detections must be an object with any of the keys"),
        ([0.3], r"detections must be an object"),
    ],
)
def test_bad_settings_are_load_errors_naming_the_key(tmp_path, value, message):
    folder = settings_folder(tmp_path, {"detections": value})
    with pytest.raises(ModelLoadError, match=message) as caught:
        apply_model_settings(folder, EngineConfig())
    assert str(folder / "densemap.json") in str(caught.value)


@pytest.fixture(scope="module")
def engines():
    """The digits net with its settings, and without (the global defaults)."""
    model = DIGITS / "model.onnx"
    own = Engine(model, config=EngineConfig(device="cpu", warmup=False, detections=DIGITS_SETTINGS))
    return own, Engine(model, config=CPU)


def boxes(engine: Engine, detections: DetectionOptions) -> list[list]:
    options = ScoreOptions(output_stride=2, include_map=False, detections=detections)
    return [engine.score(page.read_bytes(), options).detections for page in PAGES]


def test_unset_fields_take_the_models_settings_and_given_ones_win(engines):
    own, plain = engines
    model_default = boxes(own, DetectionOptions())
    assert model_default == boxes(
        plain, DetectionOptions(threshold=0.5, iou=0.3, across_classes=True)
    )
    given = boxes(own, DetectionOptions(iou=0.5, across_classes=False))
    assert given == boxes(plain, DetectionOptions())  # what the request says wins
    assert given != model_default  # the settings change what is found on these pages


def test_the_densemap_v1_codec_leaves_unset_fields_to_the_model():
    sent = pb.DetectionOptions()
    detection_options_to_proto(DetectionOptions(iou=0.4), sent)
    assert sent.HasField("iou") and not sent.HasField("threshold")
    assert not sent.HasField("across_classes") and not sent.HasField("max_count")
    assert detection_options_from_proto(sent) == DetectionOptions(iou=0.4)
    detection_options_to_proto(DetectionOptions(across_classes=False, max_count=3), sent)
    got = detection_options_from_proto(sent)
    assert (got.across_classes, got.max_count, got.iou) == (False, 3, 0.4)


def score_pages(capsys, out: Path, *flags: str) -> tuple[list, float]:
    """(detections per page, box precision on the pages) of ``densemap score``."""
    argv = ["score", str(DIGITS / "pages"), "--glob", "*.png", "--out", str(out),
            "--output-stride", "2", "--save", "none", "--detections", *flags]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    lines = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    found = {doc["relpath"]: doc["detections"] for doc in lines}
    pages = [found[page.name] for page in PAGES]
    correct = sum(
        match_boxes(
            [(d["class_index"], d["box"]) for d in page_found], read_truth(page), min_iou=0.5
        )
        for page, page_found in zip(PAGES, pages, strict=True)
    )
    return pages, correct / sum(len(p) for p in pages)


def test_densemap_score_detections_gives_the_demos_precision(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("DENSEMAP_MODELS", raising=False)  # the bundled repository: digits
    default, precision = score_pages(capsys, tmp_path / "default")
    demo_flags = ("--threshold", "0.5", "--nms-iou", "0.3", "--across-classes")
    assert score_pages(capsys, tmp_path / "flags", *demo_flags) == (default, precision)
    old, old_precision = score_pages(
        capsys, tmp_path / "old", "--nms-iou", "0.5", "--no-across-classes"
    )
    assert old != default and precision > old_precision
