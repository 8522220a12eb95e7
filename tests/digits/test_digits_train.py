"""Smoke run of the digits recipe: one tiny epoch, conversion, engine load (into tmp)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from densemap.service.engine import Engine, EngineConfig, ScoreOptions  # noqa: E402
from models.digits import train  # noqa: E402
from models.digits.data import LABELS, STRIDE, WINDOW  # noqa: E402


@pytest.mark.slow
def test_train_cli_writes_a_servable_exact_model(tmp_path, capsys):
    from densemap.convert import verify

    code = train.main(
        ["--out", str(tmp_path), "--epochs", "1", "--windows", "256", "--skip-evaluation"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "PASSED" in out  # the recipe runs densemap.convert.verify
    for name in ("model.onnx", "model.s2.onnx", "model.s1.onnx", "classifier.pt"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "labels.txt").read_text().splitlines() == list(LABELS)
    assert not list(tmp_path.glob("*.tmp"))
    classifier = train.load_classifier(tmp_path / "classifier.pt")
    assert verify(classifier, tmp_path / "model.onnx").passed
    engine = Engine(tmp_path / "model.onnx", config=EngineConfig(warmup=False))
    page = np.full((WINDOW + 3 * STRIDE, WINDOW + 5 * STRIDE), 255, dtype=np.uint8)
    for stride, cells in ((STRIDE, (4, 6)), (2, (7, 11)), (1, (13, 21))):
        result = engine.score(page, ScoreOptions(output_stride=stride))
        assert result.maps[0].scores.shape == (len(LABELS), *cells)
        assert result.labels == LABELS


def test_preprocessing_matches_the_engine():
    """Training feeds the net exactly what the engine feeds the ONNX model."""
    from densemap.service.contract import Preprocessing
    from densemap.service.engine import preprocess

    prep = Preprocessing(color="L", scale=1 / 255, mean=(0.8,), std=(0.2,))
    images = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    ours = train.to_tensor(images, prep).numpy()
    for k in range(3):
        assert np.array_equal(ours[k], preprocess(images[k][:, :, None], prep))


@pytest.mark.slow
def test_training_is_seeded():
    from models.digits.data import load_split

    split = load_split()
    config = train.TrainConfig(epochs=1, windows_per_epoch=128, batch_size=32, train_glyphs=300)
    runs = [train.train_classifier(split, config=config, log=lambda _: None) for _ in range(2)]
    (first, prep_a), (second, prep_b) = runs
    assert prep_a == prep_b
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert np.array_equal(a.numpy(), b.numpy()), name
