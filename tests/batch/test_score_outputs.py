"""``densemap score --save/--map-dtype/--no-compress``, summary cell counts, resume without
``.npz``, heat-maps (colour background, boxes, class index, normalised ramp) and
``densemap render``."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densemap.service.batch.heatmap import CLASS_PALETTE, probabilities_of
from densemap.service.batch.outputs import load_result
from densemap.service.cli import main
from densemap.service.engine import Engine, ScoreOptions
from tests.support.dense_models import build_dense_model
from tests.support.score_fixtures import LABELS, MODEL, build_repository, encode, random_image
from tests.support.square_model import square_model, squares_image

IMAGES = {"a.png": (40, 50, 1), "b.png": (36, 44, 2)}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = build_repository(tmp_path_factory.mktemp("repo"))
    square_model(root / "squares")
    # a grey model with no labels: heat-maps over colour, --heatmap-class by index
    build_dense_model(root / "grey", channels=1, classes=5, labels=(), seed=2)
    return root


@pytest.fixture()
def folder(tmp_path) -> Path:
    for name, (h, w, seed) in IMAGES.items():
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(encode(random_image(h, w, seed), "PNG"))
    return tmp_path / "in"


def score(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["score", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rows(out: Path) -> dict[str, dict]:
    lines = (out / "summary.jsonl").read_text().splitlines()
    return {r["relpath"]: r for r in map(json.loads, lines)}


def reference(repo: Path, path: Path, **options):
    engine = Engine(repo / MODEL / "model.onnx")
    return engine.score(engine.decode(path.read_bytes()), ScoreOptions(**options))


def test_save_modes_keep_what_they_name(capsys, repo, folder, tmp_path):
    base = ["--models", str(repo), "--model", MODEL]
    ref = reference(repo, folder / "a.png", top_k=2).maps[0]
    out = tmp_path / "topk"
    assert score(capsys, str(folder), "--out", str(out), *base, "--save", "top-k",
                 "--top-k", "2")[0] == 0  # fmt: skip
    with np.load(out / "a.png.npz") as npz:
        assert sorted(npz.files) == ["image_scores", "labels", "meta", "top_k_indices_0",
                                     "top_k_scores_0"]  # fmt: skip
        np.testing.assert_array_equal(npz["top_k_indices_0"], ref.top_k_indices)
        np.testing.assert_array_equal(npz["top_k_scores_0"], ref.top_k_scores.astype(np.float16))
    out = tmp_path / "argmax"
    assert score(capsys, str(folder), "--out", str(out), *base, "--save", "argmax")[0] == 0
    with np.load(out / "a.png.npz") as npz:
        assert "scores_0" not in npz.files
        np.testing.assert_array_equal(npz["argmax_0"], ref.scores.argmax(axis=0))
        best = ref.scores.max(axis=0).astype(np.float16)
        np.testing.assert_array_equal(npz["argmax_scores_0"], best)
    result, _ = load_result(out / "a.png.npz")
    np.testing.assert_array_equal(result.maps[0].argmax, ref.scores.argmax(axis=0))
    out = tmp_path / "none"
    assert score(capsys, str(folder), "--out", str(out), *base, "--save", "none")[0] == 0
    assert not list(out.rglob("*.npz")) and all(r["outputs"] == [] for r in rows(out).values())


def test_fp16_compressed_by_default_fp32_plain_on_request(capsys, repo, folder, tmp_path):
    base = [str(folder / "a.png"), "--models", str(repo), "--model", MODEL]
    assert score(capsys, *base, "--out", str(tmp_path / "small"))[0] == 0
    assert score(capsys, *base, "--out", str(tmp_path / "big"), "--map-dtype", "fp32",
                 "--no-compress")[0] == 0  # fmt: skip
    small, big = tmp_path / "small" / "a.png.npz", tmp_path / "big" / "a.png.npz"
    with zipfile.ZipFile(small) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
    with zipfile.ZipFile(big) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    assert small.stat().st_size < big.stat().st_size
    ref = reference(repo, folder / "a.png").maps[0].scores
    exact, meta = load_result(big)
    np.testing.assert_array_equal(exact.maps[0].scores, ref)  # fp32: the engine's own
    assert "storage" not in meta  # fp32 plain files are the files from before --save
    rounded, meta = load_result(small)
    np.testing.assert_array_equal(rounded.maps[0].scores, ref.astype(np.float16))
    assert meta["storage"]["map_dtype"] == "fp16"


def test_save_usage_errors_exit_2(capsys, repo, folder, tmp_path):
    base = [str(folder), "--out", str(tmp_path / "o"), "--models", str(repo), "--model", MODEL]
    code, _, err = score(capsys, *base, "--save", "top-k")
    assert code == 2 and "--save top-k" in err and "add --top-k K" in err
    code, _, err = score(capsys, *base, "--save", "detections")
    assert code == 2 and "add --detections" in err
    with pytest.raises(SystemExit) as exc:
        score(capsys, *base, "--map-dtype", "fp64")
    assert exc.value.code == 2 and "fp16" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_rerun_with_other_storage_is_refused(capsys, repo, folder, tmp_path):
    base = [str(folder), "--out", str(tmp_path / "o"), "--models", str(repo), "--model", MODEL]
    assert score(capsys, *base)[0] == 0
    code, _, err = score(capsys, *base, "--map-dtype", "fp32")
    assert code == 2 and "storage" in err and "--overwrite" in err


def test_summary_counts_cells_above_the_threshold(capsys, repo, tmp_path):
    image = squares_image(48, 48, [(1, 4, 8, 8), (0, 28, 36, 8)])
    (tmp_path / "two.png").write_bytes(encode(image, "PNG"))
    out = tmp_path / "o"
    code, _, _ = score(capsys, str(tmp_path / "two.png"), "--out", str(out), "--models",
                       str(repo), "--model", "squares", "--detections")  # fmt: skip
    assert code == 0
    row = rows(out)["two.png"]
    engine = Engine(repo / "squares" / "model.onnx")
    probs = probabilities_of(engine.score(image).maps[0].scores, probabilities=False)
    counts = (probs >= 0.5).sum(axis=(1, 2))
    expected = [{"index": c, "label": lab, "cells": int(counts[c])}
                for c, lab in enumerate(("background", "red", "green")) if counts[c]]  # fmt: skip
    assert row["cell_threshold"] == 0.5 and row["cells_above"] == [expected]
    assert counts[1] >= 1 and counts[2] >= 1 and row["detection_count"] == 2


@pytest.mark.parametrize("save", ["none", "detections"])
def test_resume_without_npz_skips_finished_images(capsys, repo, tmp_path, save):
    for name, squares in (("one.png", [(0, 8, 16, 8)]), ("two.png", [(1, 4, 8, 8)])):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(encode(squares_image(32, 40, squares), "PNG"))
    argv = [str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--models", str(repo),
            "--model", "squares", "--detections", "--save", save]  # fmt: skip
    assert score(capsys, *argv)[0] == 0
    first = (tmp_path / "o" / "detections.jsonl").read_text()
    code, stdout, _ = score(capsys, *argv)
    assert code == 0 and "scored 0, skipped 2, failed 0" in stdout
    assert (tmp_path / "o" / "detections.jsonl").read_text() == first
    assert {r["status"] for r in rows(tmp_path / "o").values()} == {"skipped"}
    # an image the summary does not record as finished is scored again
    summary = tmp_path / "o" / "summary.jsonl"
    summary.write_text(summary.read_text().splitlines()[0] + "\n")
    code, stdout, _ = score(capsys, *argv)
    assert code == 0 and "scored 1, skipped 1, failed 0" in stdout
    assert (tmp_path / "o" / "detections.jsonl").read_text() == first


def test_heatmap_over_colour_image_by_class_index_on_unlabelled_model(capsys, repo, tmp_path):
    image = random_image(40, 50, 5)  # colour, scored by a grey model
    (tmp_path / "c.png").write_bytes(encode(image, "PNG"))
    base = [str(tmp_path / "c.png"), "--models", str(repo), "--model", "grey"]
    code, _, err = score(capsys, *base, "--out", str(tmp_path / "o"), "--heatmap-class", "3")
    assert code == 0, err
    picture = np.asarray(Image.open(tmp_path / "o" / "c.png.heatmap.png").convert("RGB"))
    # rows 0-3 are the border band (window 12: centres from row 6, +-2 painted): clear
    np.testing.assert_array_equal(picture[:4], image[:4])  # the colour image, not grey
    assert (picture[4:36, 6:42] != image[4:36, 6:42]).any(axis=2).mean() > 0.9
    code, _, err = score(capsys, *base, "--out", str(tmp_path / "x"), "--heatmap-class", "5")
    assert code == 2 and "no labels" in err and "0..4" in err


def test_detection_boxes_are_drawn_where_they_are(capsys, repo, tmp_path):
    image = squares_image(32, 40, [(0, 8, 16, 8)])  # a red square: box x 16-24, y 8-16
    (tmp_path / "one.png").write_bytes(encode(image, "PNG"))
    code, _, _ = score(capsys, str(tmp_path / "one.png"), "--out", str(tmp_path / "o"),
                       "--models", str(repo), "--model", "squares", "--detections",
                       "--heatmap")  # fmt: skip
    assert code == 0
    picture = np.asarray(Image.open(tmp_path / "o" / "one.png.heatmap.png").convert("RGB"))
    red = CLASS_PALETTE[1]
    assert (picture[8:10, 16:24] == red).all() and (picture[8:16, 22:24] == red).all()
    assert (picture[:8, :] == image[:8, :]).all()  # nothing drawn above the box
    assert (picture[16:28, 16:24] != image[16:28, 16:24]).any()  # its label, below


def test_render_redraws_the_heatmaps_without_scoring(capsys, repo, folder, tmp_path):
    out = tmp_path / "o"
    argv = [str(folder), "--out", str(out), "--models", str(repo), "--model", MODEL,
            "--heatmap", "--map-dtype", "fp32"]  # fmt: skip
    assert score(capsys, *argv)[0] == 0
    drawn = {p.name: p.read_bytes() for p in out.glob("*.heatmap.png")}
    for p in out.glob("*.heatmap.png"):
        p.unlink()
    assert main(["render", str(out)]) == 0
    assert "drew 2, failed 0" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.glob("*.heatmap.png")} == drawn
    assert main(["render", str(out), "--heatmap-class", "fox"]) == 0
    assert (out / "a.png.heatmap.png").read_bytes() != drawn["a.png.heatmap.png"]
    assert main(["render", str(out), "--heatmap-class", "zebra"]) == 2
    assert main(["render", str(tmp_path / "in")]) == 2
    assert "not a 'densemap score' output folder" in capsys.readouterr().err
    assert LABELS[2] == "fox"


def test_render_redraws_an_argmax_run_as_the_run_drew_it(capsys, repo, folder, tmp_path):
    """--save argmax keeps each cell's best class and its score: enough for the top-class
    picture, equal to the one drawn from the full map at scoring time (fp32 scores)."""
    out = tmp_path / "o"
    argv = [str(folder), "--out", str(out), "--models", str(repo), "--model", MODEL,
            "--heatmap", "--save", "argmax", "--map-dtype", "fp32"]  # fmt: skip
    assert score(capsys, *argv)[0] == 0
    drawn = {p.name: p.read_bytes() for p in out.glob("*.heatmap.png")}
    assert len(drawn) == 2
    for p in out.glob("*.heatmap.png"):
        p.unlink()
    assert main(["render", str(out)]) == 0
    assert "drew 2, failed 0" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.glob("*.heatmap.png")} == drawn
    assert main(["render", str(out), "--heatmap-class", "fox"]) == 2
    err = capsys.readouterr().err
    assert "argmax only (--save argmax), which draws the top class" in err
    assert "--save maps" in err


def test_render_of_a_top_k_run_says_which_save_modes_draw(capsys, repo, folder, tmp_path):
    out = tmp_path / "o"
    argv = [str(folder), "--out", str(out), "--models", str(repo), "--model", MODEL,
            "--save", "top-k", "--top-k", "2"]  # fmt: skip
    assert score(capsys, *argv)[0] == 0
    assert main(["render", str(out)]) == 1
    captured = capsys.readouterr()
    assert "drew 0, failed 2" in captured.out
    assert "rerun 'densemap score' with --save maps or --save argmax" in captured.err
