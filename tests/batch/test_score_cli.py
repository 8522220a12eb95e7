"""``densemap score`` on one machine: outputs, failures, options, heat-maps, resume, walking."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densemap.service.batch.outputs import load_result
from densemap.service.cli import main
from densemap.service.engine import Engine, ScoreOptions
from tests.support.dense_models import make_dense_net, small_layers
from tests.support.oracle import crop_by_crop, torch_classifier
from tests.support.score_fixtures import (
    LABELS,
    MODEL,
    WINDOW,
    build_mixed_folder,
    encode,
    random_image,
)


@pytest.fixture(scope="module")
def engine(repo) -> Engine:
    return Engine(repo / MODEL / "model.onnx")


@pytest.fixture()
def mixed(tmp_path) -> tuple[Path, dict[str, str]]:
    expected = build_mixed_folder(tmp_path / "in")
    return tmp_path / "in", expected


def score(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["score", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def summary_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]


def test_mixed_folder_outputs_failures_and_summary(capsys, repo, engine, mixed, tmp_path):
    folder, expected = mixed
    out = tmp_path / "out"
    code, stdout, stderr = score(capsys, str(folder), "--out", str(out), "--models", str(repo),
                                 "--model", MODEL)  # fmt: skip
    assert code == 1  # two images failed
    last = stdout.strip().splitlines()[-1]
    assert re.search(r"scored 5, skipped 0, failed 2 of 7 images", last), last
    assert "corrupt.png" in stderr and "tiny.png" in stderr
    assert "Traceback" not in stderr + stdout
    rows = summary_rows(out)
    assert [r["relpath"] for r in rows] == sorted(expected)  # text file skipped quietly
    assert {r["relpath"]: r["status"] for r in rows} == expected
    by_path = {r["relpath"]: r for r in rows}
    assert "smaller than the model's window" in by_path["tiny.png"]["error"]
    assert "cannot decode" in by_path["corrupt.png"]["error"]
    assert not (out / "notes.txt.npz").exists() and not (out / "corrupt.png.npz").exists()
    for rel, status in expected.items():
        if status != "ok":
            continue
        result, meta = load_result(out / f"{rel}.npz")
        reference = engine.score(engine.decode((folder / rel).read_bytes()), ScoreOptions())
        # stored by default as float16: the engine's map rounded to the nearest float16
        assert result.maps[0].scores.dtype == np.float16
        np.testing.assert_array_equal(
            result.maps[0].scores, reference.maps[0].scores.astype(np.float16)
        )
        np.testing.assert_array_equal(result.image_scores, reference.image_scores)
        assert result.maps[0].geometry == reference.maps[0].geometry
        assert result.labels == LABELS and meta["model"] == MODEL and meta["source"] == rel
        assert result.image_size == reference.image_size
        row = by_path[rel]
        assert row["size"] == list(reference.image_size)
        assert row["map_shape"] == [list(reference.maps[0].shape)]
        assert row["top"][0]["label"] == LABELS[reference.image_top_k[0][0]]
        assert row["outputs"] == [f"{rel}.npz"]
    assert not (out / ".partial").exists()


def test_saved_map_equals_crop_reference_in_float64(capsys, repo, mixed, tmp_path):
    """The stored map is the classifier on every window (fp64 torch reference, fp32 engine)."""
    folder, _ = mixed
    out = tmp_path / "out"
    score(capsys, str(folder / "a.png"), "--out", str(out), "--models", str(repo),
          "--model", MODEL, "--map-dtype", "fp32")  # fmt: skip
    result, _ = load_result(out / "a.png.npz")
    assert result.maps[0].scores.dtype == np.float32
    net = make_dense_net(layers=small_layers(padded=False), window=WINDOW, channels=3,
                         classes=len(LABELS), seed=1).double()  # fmt: skip
    pixels = np.asarray(Image.open(folder / "a.png").convert("RGB"), dtype=np.float64)
    image_nchw = ((pixels / 255 - 0.5) / 0.25).transpose(2, 0, 1)[None]
    logits = crop_by_crop(torch_classifier(net), image_nchw, window=WINDOW, stride=(4, 4),
                          cells=result.maps[0].shape, batched=True)[0]  # fmt: skip
    expected = torch.softmax(torch.from_numpy(logits), dim=0).numpy()
    # fp32 inference vs fp64 reference on a 5-class softmax: errors stay near 1e-7.
    np.testing.assert_allclose(result.maps[0].scores, expected, atol=2e-6, rtol=0)


def test_engine_options_reach_the_outputs(capsys, repo, engine, mixed, tmp_path):
    folder, _ = mixed
    out = tmp_path / "out"
    code, _, _ = score(capsys, str(folder / "sub"), "--out", str(out), "--models", str(repo),
                       "--model", MODEL, "--scales", "1,1.5", "--top-k", "2", "--dtype", "fp16",
                       "--logits", "--output-stride", "2")  # fmt: skip
    assert code == 0
    options = ScoreOptions(output_stride=2, scales=(1.0, 1.5), probabilities=False,
                           dtype="float16", top_k=2)  # fmt: skip
    result, meta = load_result(out / "c.png.npz")
    reference = engine.score(engine.decode((folder / "sub" / "c.png").read_bytes()), options)
    assert len(result.maps) == 2 and meta["options"]["scales"] == [1.0, 1.5]
    for mine, ref in zip(result.maps, reference.maps, strict=True):
        assert mine.scores.dtype == np.float16
        np.testing.assert_array_equal(mine.scores, ref.scores)
        np.testing.assert_array_equal(mine.top_k_indices, ref.top_k_indices)
        np.testing.assert_array_equal(mine.top_k_scores, ref.top_k_scores)
        assert mine.geometry == ref.geometry and mine.geometry.stride == (2, 2)


def test_heatmaps_have_the_image_size(capsys, repo, mixed, tmp_path):
    folder, expected = mixed
    out = tmp_path / "out"
    code, _, _ = score(capsys, str(folder), "--out", str(out), "--models", str(repo),
                       "--model", MODEL, "--heatmap")  # fmt: skip
    assert code == 1
    for rel, status in expected.items():
        heat = out / f"{rel}.heatmap.png"
        assert heat.is_file() == (status == "ok")
        if status == "ok":
            original = Image.open(folder / rel)
            assert Image.open(heat).size == original.size
    # a.png is 40x50, 12x16 windows at stride 4: 8x9 cells, centres at rows 6 ... 34 and
    # columns 8 ... 40; each paints +-2 px around its centre: rows 4-35, columns 6-41. The
    # border band (no edge cell stretched out to the border) and the tail stay original.
    picture = np.asarray(Image.open(out / "a.png.heatmap.png").convert("RGB"))
    original = np.asarray(Image.open(folder / "a.png").convert("RGB"))
    painted = np.zeros((40, 50), dtype=bool)
    painted[4:36, 6:42] = True
    np.testing.assert_array_equal(picture[~painted], original[~painted])
    assert (picture[painted] != original[painted]).any(axis=1).mean() > 0.9
    row = {r["relpath"]: r for r in summary_rows(out)}["a.png"]
    assert row["outputs"] == ["a.png.npz", "a.png.heatmap.png"]


def test_heatmap_class_by_name_and_unknown_class(capsys, repo, mixed, tmp_path):
    folder, _ = mixed
    image = folder / "sub" / "c.png"
    base = ["--models", str(repo), "--model", MODEL]
    code, _, _ = score(capsys, str(image), "--out", str(tmp_path / "fox"), *base,
                       "--heatmap-class", "fox")  # fmt: skip
    assert code == 0
    top, _, _ = score(capsys, str(image), "--out", str(tmp_path / "top"), *base, "--heatmap")
    fox = np.asarray(Image.open(tmp_path / "fox" / "c.png.heatmap.png"))
    assert fox.shape == (64, 33, 3)
    assert not np.array_equal(fox, np.asarray(Image.open(tmp_path / "top" / "c.png.heatmap.png")))
    code, _, stderr = score(capsys, str(image), "--out", str(tmp_path / "x"), *base,
                            "--heatmap-class", "zebra")  # fmt: skip
    assert code == 2 and "'zebra' is not a class" in stderr and "fox" in stderr


def test_rerun_skips_complete_outputs_and_checks_settings(capsys, repo, mixed, tmp_path):
    folder, _ = mixed
    out = tmp_path / "out"
    base = [str(folder), "--out", str(out), "--models", str(repo), "--model", MODEL]
    assert score(capsys, *base)[0] == 1
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*.npz")}
    assert len(before) == 5
    code, stdout, stderr = score(capsys, *base)
    assert code == 1 and "scored 0, skipped 5, failed 2" in stdout.splitlines()[-1]
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*.npz")} == before
    statuses = {r["relpath"]: r["status"] for r in summary_rows(out)}
    assert sorted(statuses.values()) == ["failed"] * 2 + ["skipped"] * 5
    code, _, stderr = score(capsys, *base, "--logits")
    assert code == 2 and "--overwrite" in stderr  # other options: refuse to mix outputs
    assert "(probabilities True -> False)" in stderr  # only what changed
    code, stdout, _ = score(capsys, *base, "--logits", "--overwrite")
    assert code == 1 and "scored 5, skipped 0, failed 2" in stdout
    result, meta = load_result(out / "a.png.npz")
    assert meta["options"]["probabilities"] is False and result.maps[0].scores.min() < 0


def test_debug_shows_tracebacks(capsys, caplog, repo, mixed, tmp_path):
    folder, _ = mixed
    code, _, stderr = score(capsys, str(folder / "corrupt.png"), "--out", str(tmp_path / "o"),
                            "--models", str(repo), "--model", MODEL)  # fmt: skip
    assert code == 1 and "Traceback" not in stderr + caplog.text
    code = main(["--debug", "score", str(folder / "corrupt.png"), "--out", str(tmp_path / "d"),
                 "--models", str(repo), "--model", MODEL])  # fmt: skip
    # pytest's log capture replaces the stderr handler that main() configures
    assert code == 1 and "Traceback" in capsys.readouterr().err + caplog.text


def test_glob_explicit_files_and_output_inside_input(capsys, repo, tmp_path):
    folder = tmp_path / "in"
    (folder / "x").mkdir(parents=True)
    (folder / "one.png").write_bytes(encode(random_image(20, 20, 1), "PNG"))
    (folder / "x" / "two.jpg").write_bytes(encode(random_image(20, 20, 2), "JPEG"))
    (folder / ".hidden.png").write_bytes(encode(random_image(20, 20, 3), "PNG"))
    base = ["--models", str(repo), "--model", MODEL]
    out = folder / "results"  # inside the input tree: never walked into
    code, stdout, _ = score(capsys, str(folder), "--out", str(out), *base, "--glob", "*.jpg")
    assert code == 0 and "scored 1," in stdout
    assert [r["relpath"] for r in summary_rows(out)] == ["x/two.jpg"]
    code, stdout, _ = score(capsys, str(folder), "--out", str(out), *base, "--heatmap")
    assert code == 0 and "scored 2, skipped 0" in stdout  # two.jpg lacked its heat-map
    code, _, _ = score(capsys, str(folder / "one.png"), str(folder / "x"), "--out",
                       str(tmp_path / "o2"), *base)  # fmt: skip
    assert code == 0
    assert (tmp_path / "o2" / "one.png.npz").is_file()
    assert (tmp_path / "o2" / "x" / "two.jpg.npz").is_file()
    # --glob filters folders only: a file named on the command line is always scored
    code, stdout, _ = score(capsys, str(folder / "x"), str(folder / "one.png"), "--out",
                            str(tmp_path / "o3"), *base, "--glob", "*.jpg")  # fmt: skip
    assert code == 0 and "scored 2," in stdout
    assert sorted(r["relpath"] for r in summary_rows(tmp_path / "o3")) == ["one.png", "x/two.jpg"]
    code, _, stderr = score(capsys, str(tmp_path / "missing"), "--out", str(out), *base)
    assert code == 2 and "missing" in stderr and "Traceback" not in stderr


def test_unknown_model_is_a_clear_error(capsys, repo, tmp_path):
    code, _, stderr = score(capsys, str(tmp_path), "--out", str(tmp_path / "o"), "--models",
                            str(repo), "--model", "nope")  # fmt: skip
    assert code == 2 and "'nope'" in stderr and MODEL in stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ("--output-stride", "3"),
            "output_stride 3 is not supported by model 'tiny': use one of 4, 2, 1",
        ),
        (("--output-stride", "0"), "output_stride must be >= 1, got 0"),
        (("--top-k", "20"), "top_k=20 but only 5 classes can be ranked: ask for at most 5"),
    ],
)
def test_an_option_wrong_for_every_image_is_one_usage_error(
    capsys, repo, mixed, tmp_path, flags, message
):
    folder, _ = mixed
    out = tmp_path / "out"
    code, stdout, stderr = score(capsys, str(folder), "--out", str(out), "--models", str(repo),
                                 "--model", MODEL, *flags)  # fmt: skip
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("densemap score: error: ")
    assert message in stderr and "None" not in stderr and "Traceback" not in stderr
    assert stdout == "" and not out.exists()  # refused before any image or output


def test_a_gif_in_a_folder_is_scored_from_its_first_frame(capsys, repo, engine, tmp_path):
    (tmp_path / "in").mkdir()
    frames = [Image.fromarray(random_image(40, 50, seed)).quantize(colors=16) for seed in (1, 2)]
    frames[0].save(tmp_path / "in" / "anim.gif", save_all=True, append_images=frames[1:])
    code, stdout, stderr = score(capsys, str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                                 "--models", str(repo), "--model", MODEL)  # fmt: skip
    assert code == 0 and "scored 1, skipped 0, failed 0 of 1" in stdout, stderr
    result, _ = load_result(tmp_path / "o" / "anim.gif.npz")
    first = np.asarray(frames[0].convert("RGB"))
    expected = engine.score(first).maps[0].scores.astype(np.float16)  # stored as float16
    np.testing.assert_array_equal(result.maps[0].scores, expected)


def test_only_the_model_asked_for_is_loaded(capsys, caplog, repo, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(repo, root)
    (root / "broken").mkdir()
    (root / "broken" / "model.onnx").write_bytes(b"not onnx")
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    image.write_bytes(encode(random_image(40, 50, 1), "PNG"))
    code, stdout, stderr = score(capsys, str(image.parent), "--out", str(tmp_path / "o"),
                                 "--models", str(root), "--model", MODEL)  # fmt: skip
    assert code == 0 and "scored 1," in stdout
    assert "broken" not in stderr + caplog.text  # the broken sibling was never opened


def test_default_model_is_the_bundled_digits(capsys, tmp_path):
    from densemap.service.engine.repository import MODEL_FILE, ModelRepository, default_models_dir

    model_file = default_models_dir() / "digits" / MODEL_FILE
    if not model_file.is_file():
        pytest.skip(f"the bundled digits model is not built yet ({model_file})")
    engine = ModelRepository(default_models_dir()).get("digits")
    height = engine.metadata.geometry.window[0] * 3
    width = engine.metadata.geometry.window[1] * 4
    image = tmp_path / "page.png"
    image.write_bytes(encode(random_image(height, width, 7), "PNG"))
    code, stdout, _ = score(capsys, str(image), "--out", str(tmp_path / "out"))
    assert code == 0 and "scored 1," in stdout
    result, meta = load_result(tmp_path / "out" / "page.png.npz")
    assert meta["model"] == "digits" and result.labels == engine.labels
    reference = engine.score(engine.decode(image.read_bytes()), ScoreOptions())
    expected = reference.maps[0].scores.astype(np.float16)  # stored as float16
    np.testing.assert_array_equal(result.maps[0].scores, expected)


def test_max_pixels_limits_in_process_scoring_and_names_the_flag(capsys, repo, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(random_image(40, 52, seed=5), "PNG"))  # 2080 pixels
    assert main(["score", str(folder), "--out", str(tmp_path / "small"), "--models", str(repo),
                 "--model", MODEL, "--max-pixels", "2000"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "over the limit of 2000 pixels" in err and "densemap score --max-pixels" in err, err
    assert "EngineConfig.max_pixels" in err and "Traceback" not in err  # after the flags
    assert err.index("--max-pixels") < err.index("EngineConfig.max_pixels")
    assert main(["score", str(folder), "--out", str(tmp_path / "ok"), "--models", str(repo),
                 "--model", MODEL, "--max-pixels", "2080"]) == 0  # fmt: skip
    capsys.readouterr()
    for bad, words in (
        (["--max-pixels", "0"], "EngineConfig.max_pixels must be >= 1, got 0"),
        (["--max-pixels", "9", "--server", "127.0.0.1:1"], "--max-pixels"),
    ):
        assert main(["score", str(folder), "--out", str(tmp_path / "x"), *bad]) == 2
        assert words in capsys.readouterr().err
