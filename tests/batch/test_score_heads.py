"""``densemap score`` on a model with a class head and a box head: one ``.npz`` array per
head and scale, equal to a plain onnxruntime pass; the same files through ``--server``;
``--heads`` picks them; summary rows name them; heat-maps draw the class head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from densemap.service.batch.outputs import load_result
from densemap.service.cli import main
from densemap.service.engine import Engine, HeadInfo, ScoreOptions, preprocess
from tests.support.dense_models import BOX_LABELS, build_dense_model, build_two_head_model
from tests.support.score_fixtures import encode, random_image
from tests.support.server_harness import HOST, start_server

MODEL = "twohead"
WINDOW, STRIDE = (12, 16), 4
SIZES = {"a.png": (40, 50), "b.png": (33, 61)}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    build_two_head_model(root / MODEL, with_atrous=(2,), seed=21)
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("in")
    for seed, (name, (height, width)) in enumerate(sorted(SIZES.items())):
        (folder / name).write_bytes(encode(random_image(height, width, seed), "PNG"))
    return folder


@pytest.fixture(scope="module")
def engine(repo) -> Engine:
    return Engine(repo / MODEL / "model.onnx", name=MODEL)


def score(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["score", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def plain_boxes(repo: Path, engine: Engine, path: Path) -> np.ndarray:
    """The box head of one onnxruntime pass on the whole image, cropped to the cells."""
    image = engine.decode(path.read_bytes())
    session = ort.InferenceSession(str(repo / MODEL / "model.onnx"))
    (boxes,) = session.run(
        ["boxes"], {"input": preprocess(image, engine.metadata.preprocessing)[None]}
    )
    n_h = (image.shape[0] - WINDOW[0]) // STRIDE + 1
    n_w = (image.shape[1] - WINDOW[1]) // STRIDE + 1
    return boxes[0, :, :n_h, :n_w]


def test_npz_holds_every_head(capsys, repo, images, engine, tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = score(capsys, str(images), "--out", str(out), "--models", str(repo),
                            "--model", MODEL, "--map-dtype", "fp32", "--scales", "1,1.5")  # fmt: skip
    assert code == 0, stdout
    for name in SIZES:
        with np.load(out / f"{name}.npz") as npz:
            keys = set(npz.files)
            meta = json.loads(str(npz["meta"]))
            boxes = npz["head_boxes_0"]
        assert {"scores_0", "scores_1", "head_boxes_0", "head_boxes_1"} <= keys
        assert meta["heads"] == [
            {"name": "boxes", "kind": "regression", "labels": list(BOX_LABELS), "channels": 4}
        ]
        np.testing.assert_array_equal(boxes, plain_boxes(repo, engine, images / name))
        result, _ = load_result(out / f"{name}.npz")
        expected = engine.score((images / name).read_bytes(), ScoreOptions(scales=(1.0, 1.5)))
        assert result.heads == (HeadInfo("boxes", "regression", BOX_LABELS, 4),)
        for got, want in zip(result.maps, expected.maps, strict=True):
            np.testing.assert_array_equal(got.head_maps["boxes"], want.head_maps["boxes"])
            np.testing.assert_array_equal(got.scores, want.scores)
    rows = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert [row["heads"] for row in rows] == [
        [{"name": "boxes", "kind": "regression", "channels": 4}]
    ] * 2


def test_default_storage_rounds_heads_to_float16(capsys, repo, images, engine, tmp_path):
    out = tmp_path / "out"
    code, _, _ = score(capsys, str(images / "a.png"), "--out", str(out), "--models", str(repo),
                       "--model", MODEL, "--save", "argmax")  # fmt: skip
    assert code == 0
    with np.load(out / "a.png.npz") as npz:
        assert "scores_0" not in npz.files and "argmax_0" in npz.files
        boxes = npz["head_boxes_0"]
    assert boxes.dtype == np.float16
    expected = engine.score((images / "a.png").read_bytes()).maps[0].head_maps["boxes"]
    np.testing.assert_array_equal(boxes, expected.astype(np.float16))


def test_server_mode_writes_the_same_files(capsys, repo, images, tmp_path):
    server, port = start_server(repo)
    try:
        remote, local = tmp_path / "remote", tmp_path / "local"
        code, _, err = score(capsys, str(images), "--out", str(remote), "--server",
                             f"{HOST}:{port}", "--model", MODEL)  # fmt: skip
        assert code == 0, err
    finally:
        server.stop()
    code, _, _ = score(capsys, str(images), "--out", str(local), "--models", str(repo),
                       "--model", MODEL)  # fmt: skip
    assert code == 0
    for name in SIZES:
        assert (remote / f"{name}.npz").read_bytes() == (local / f"{name}.npz").read_bytes()


def test_heads_flag_picks_heads(capsys, repo, images, tmp_path):
    out = tmp_path / "none"
    code, _, _ = score(capsys, str(images / "a.png"), "--out", str(out), "--models", str(repo),
                       "--model", MODEL, "--heads", "none")  # fmt: skip
    assert code == 0
    with np.load(out / "a.png.npz") as npz:
        assert not [key for key in npz.files if key.startswith("head_")]
        assert "heads" not in json.loads(str(npz["meta"]))
    row = json.loads((out / "summary.jsonl").read_text())
    assert "heads" not in row
    code, _, err = score(capsys, str(images / "a.png"), "--out", str(tmp_path / "bad"),
                         "--models", str(repo), "--model", MODEL, "--heads", "landmarks")  # fmt: skip
    assert code == 2
    assert "error: the model has no head(s) ['landmarks']: its heads are ['scores', 'boxes']" in err
    assert "Traceback" not in err


def test_heatmap_draws_the_class_head(capsys, repo, images, tmp_path):
    """The two-head model's trunk and class head are the one-output model of the same seed:
    its heat-map is the same picture, byte for byte."""
    build_dense_model(tmp_path / "repo" / "one", channels=3, classes=5, seed=21)
    pictures = {}
    for model, root in ((MODEL, repo), ("one", tmp_path / "repo")):
        out = tmp_path / model
        code, _, err = score(capsys, str(images / "a.png"), "--out", str(out), "--models",
                             str(root), "--model", model, "--heatmap")  # fmt: skip
        assert code == 0, err
        pictures[model] = (out / "a.png.heatmap.png").read_bytes()
    assert pictures[MODEL] == pictures["one"]


@pytest.mark.slow
def test_ray_writes_the_same_head_arrays(capsys, repo, images, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="needs the 'distributed' extra (ray[data])")
    local, distributed = tmp_path / "local", tmp_path / "ray"
    model = ["--models", str(repo), "--model", MODEL]
    assert main(["score", str(images), "--out", str(local), *model]) == 0
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # Ray writes its session files there
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        code = main(["score", str(images), "--out", str(distributed), "--ray", *model])
    finally:
        ray.shutdown()
    assert code == 0, capsys.readouterr().err
    for name in SIZES:
        with np.load(distributed / f"{name}.npz") as npz:
            assert "head_boxes_0" in npz.files
        assert (distributed / f"{name}.npz").read_bytes() == (local / f"{name}.npz").read_bytes()
