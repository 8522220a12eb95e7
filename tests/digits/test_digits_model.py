"""The SHIPPED digits model: files, metadata, exactness against its trained classifier, and
the model card's numbers recomputed from the ONNX through the engine (fixed seeds)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.support.paths import REPO_ROOT

pytest.importorskip("sklearn")

from densemap.service.contract import ModelMetadata  # noqa: E402
from densemap.service.engine import Engine, ScoreOptions  # noqa: E402
from models.digits import evaluate as digits_eval  # noqa: E402
from models.digits.card import CARD_FILE, box_rows, heldout_line, reading_rows  # noqa: E402
from models.digits.data import LABELS, STRIDE, WINDOW, load_split  # noqa: E402
from models.digits.pages import sample_pages  # noqa: E402
from tests.support.oracle import crop_by_crop, torch_classifier  # noqa: E402

FOLDER = REPO_ROOT / "models" / "digits"
MODEL = FOLDER / "model.onnx"
SIZE_LIMIT = 2 * 1024 * 1024  # bytes: model and variants together
# fp32 tolerance for the engine's map against the classifier on crops: both sum the same
# ~400 products per unit in different orders (rounding ~1e-6 relative); 1e-4 x max(1, |s|)
# as in densemap.convert.verify.
FP32_TOLERANCE = 1e-4


def _metadata() -> ModelMetadata:
    model = onnx.load(str(MODEL), load_external_data=False)
    return ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})


@pytest.fixture(scope="module")
def classifier():
    pytest.importorskip("torch")
    from models.digits.train import WEIGHTS_FILE, load_classifier

    return load_classifier(FOLDER / WEIGHTS_FILE)


@pytest.fixture(scope="module")
def report():
    return digits_eval.evaluate(MODEL)  # CPU, as the card states


def test_shipped_files_are_small_and_labelled():
    meta = _metadata()
    files = [MODEL] + [FOLDER / v.file for v in meta.variants]
    assert all(f.is_file() for f in files)
    assert sum(f.stat().st_size for f in files) < SIZE_LIMIT
    assert sorted(v.stride for v in meta.variants) == [(1, 1), (2, 2)]
    assert (FOLDER / "labels.txt").read_text().splitlines() == list(LABELS)
    assert meta.labels == LABELS
    assert meta.geometry.window == (WINDOW, WINDOW) and meta.geometry.stride == (STRIDE, STRIDE)
    assert not meta.geometry.padded
    prep = meta.preprocessing
    assert prep.color == "L" and prep.layout == "NCHW" and prep.scale == pytest.approx(1 / 255)
    assert 0.5 < prep.mean[0] < 1.0 and 0.05 < prep.std[0] < 0.5  # light paper, dark ink


@pytest.mark.slow
def test_shipped_onnx_passes_verify_against_the_trained_classifier(classifier):
    from densemap.convert import verify

    for dtype in (np.float32, np.float64):
        result = verify(classifier, MODEL, dtype=dtype)
        assert result.passed, result.table()
        assert not result.padded


@pytest.mark.parametrize("stride", [4, 2, 1])
def test_engine_maps_equal_the_classifier_on_every_crop(classifier, stride):
    """The served map (à-trous variants included) is the classifier on each window crop,
    with the engine's preprocessing, on a real sample page (the crop-by-crop oracle)."""
    prep = _metadata().preprocessing
    page = sample_pages(*_held_out())[0].image[:60, :84]  # a corner with digits
    engine = Engine(MODEL, config=digits_eval.CPU)
    logits = engine.score(page, ScoreOptions(output_stride=stride, probabilities=False))
    score_map = logits.maps[0].scores
    n_h, n_w = (60 - WINDOW) // stride + 1, (84 - WINDOW) // stride + 1
    assert score_map.shape == (len(LABELS), n_h, n_w)
    pixels = (page.astype(np.float32) * np.float32(prep.scale) - prep.mean[0]) / prep.std[0]
    classify = torch_classifier(classifier, dtype="float32")
    expected = crop_by_crop(
        classify, pixels[None, None], window=(WINDOW,) * 2, stride=(stride,) * 2, batched=True
    )[0]
    limit = FP32_TOLERANCE * max(1.0, float(np.abs(expected).max()))
    assert np.abs(score_map - expected).max() <= limit


def _held_out():
    split = load_split()
    return split.test_glyphs, split.test_labels


@pytest.mark.slow
def test_held_out_accuracy_meets_target(report):
    assert report.heldout == 450
    assert report.heldout_accuracy >= digits_eval.THRESHOLDS["heldout_accuracy"]
    assert report.background_correct / report.background_windows >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1, 2], ids=["stride4", "stride2", "stride1"])
def test_page_reading_meets_targets(report, index):
    reading = report.readings[index]
    assert reading.stride == digits_eval.STRIDES[index]
    assert reading.score.digits >= 500  # enough digits for the rate to mean something
    assert reading.score.reading_accuracy >= digits_eval.THRESHOLDS["reading_accuracy"]
    assert reading.score.blank_cells >= 1000
    assert reading.score.blank_false_positive_rate <= digits_eval.THRESHOLDS["blank_fp_rate"]
    assert reading.score.off_cells >= 10_000
    limit = digits_eval.THRESHOLDS["off_centre_fp_rate"]
    assert reading.score.off_centre_false_positive_rate <= limit
    assert reading.recall >= 0.9 and reading.precision >= 0.9
    assert not digits_eval.failures(report)


@pytest.mark.slow
def test_model_card_states_the_recomputed_numbers(report):
    card = (FOLDER / CARD_FILE).read_text(encoding="utf-8")
    assert heldout_line(report) in card
    for row in reading_rows(report) + box_rows(report):
        assert row in card


@pytest.mark.slow
def test_boxes_at_stride_2_meet_the_precision_and_recall_targets(report):
    """Engine detections (window boxes moved by densemap.json's offsets, NMS) against the
    generator's digit boxes at IoU >= 0.5 with the right label."""
    (boxes,) = [b for b in report.boxes if b.stride == 2]
    assert boxes.digits >= 500
    assert boxes.precision >= digits_eval.BOX_THRESHOLDS["precision"]
    assert boxes.recall >= digits_eval.BOX_THRESHOLDS["recall"]
    window_only = Engine(MODEL, config=digits_eval.CPU)  # without the model's box offsets
    options = ScoreOptions(output_stride=2, include_map=False, detections=digits_eval.DETECTIONS)
    page = sample_pages(*_held_out())[0]
    box = window_only.score(page.image, options).detections[0].box
    assert box[2] - box[0] == WINDOW  # the bare window, 28 px; the model's is 20 px


def test_sample_pages_are_the_recipe_output():
    from PIL import Image

    pages = sample_pages(*_held_out())
    shipped = sorted((FOLDER / "pages").glob("page_*.png"))
    assert len(shipped) == len(pages) >= 3
    for page, path in zip(pages, shipped, strict=True):
        with Image.open(path) as image:
            assert image.mode == "L"
            assert np.array_equal(np.asarray(image), page.image)
        truth = path.with_suffix(".txt").read_text().split("\n")
        assert len([line for line in truth if line]) == len(page.placements)
