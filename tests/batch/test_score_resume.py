"""Kill ``densemap score`` partway (SIGKILL), then resume: no partial file, nothing redone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densemap.service.batch.heatmap import LEGEND_LINE
from densemap.service.batch.outputs import load_result
from densemap.service.cli import main
from densemap.service.engine import Engine, ScoreOptions
from tests.support.paths import REPO_ROOT
from tests.support.score_fixtures import MODEL, build_plain_folder, build_repository

IMAGES = 40


def _complete_pairs(out: Path) -> dict[Path, tuple[int, bytes]]:
    """Outputs of images whose .npz AND heat-map exist, with their mtime and bytes."""
    files = {}
    for npz in out.glob("*.npz"):
        heat = npz.with_name(npz.name[: -len(".npz")] + ".heatmap.png")
        if heat.exists():
            for path in (npz, heat):
                files[path] = (path.stat().st_mtime_ns, path.read_bytes())
    return files


@pytest.mark.slow
def test_resume_after_sigkill_leaves_no_partial_file(tmp_path, capsys):
    repo = build_repository(tmp_path / "repo", slow=True)
    folder = tmp_path / "in"
    build_plain_folder(folder, IMAGES, size=(192, 192))
    out = tmp_path / "out"
    argv = [str(folder), "--out", str(out), "--models", str(repo), "--model", MODEL, "--heatmap"]
    process = subprocess.Popen(
        [sys.executable, "-m", "densemap.service.cli", "score", *argv, "--workers", "1"],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    try:
        while len(list(out.glob("*.npz"))) < 4 and time.monotonic() < deadline:
            assert process.poll() is None, "the run ended before it could be interrupted"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(30)
    killed_with = len(list(out.glob("*.npz")))
    assert 4 <= killed_with < IMAGES, killed_with

    # Every file under its final name is whole: outputs load, summary lines parse.
    for npz in out.glob("*.npz"):
        result, meta = load_result(npz)
        assert result.maps[0].scores.shape[0] == 5 and meta["source"] == npz.name[:-4]
    for heat in out.glob("*.heatmap.png"):
        with Image.open(heat) as picture:
            picture.load()
            # the image's size plus the legend band (one or two rows) below it
            assert picture.width == 192 and 192 < picture.height <= 192 + 2 * LEGEND_LINE + 4
    for line in (out / "summary.jsonl").read_text().splitlines():
        assert json.loads(line)["status"] == "ok"
    leftovers = [p for p in out.rglob("*") if p.is_file() and ".partial" in p.parts]
    before = _complete_pairs(out)
    assert before, "no image was complete when the run was killed"

    code = main(["score", *argv])
    stdout = capsys.readouterr().out
    assert code == 0
    done = len(before) // 2
    assert f"scored {IMAGES - done}, skipped {done}, failed 0" in stdout.splitlines()[-1]
    for path, (mtime, data) in before.items():  # earlier outputs untouched
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data
    assert len(list(out.glob("*.npz"))) == IMAGES
    assert len(list(out.glob("*.heatmap.png"))) == IMAGES
    assert not (out / ".partial").exists()  # the rerun removed the killed run's temp files
    assert all(not p.exists() for p in leftovers)
    rows = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert len(rows) == IMAGES
    assert sum(r["status"] == "skipped" for r in rows) == done
    assert all(r["status"] in ("ok", "skipped") for r in rows)

    engine = Engine(repo / MODEL / "model.onnx")
    for name in ("img0000.png", f"img{IMAGES - 1:04d}.png"):
        reference = engine.score(engine.decode((folder / name).read_bytes()), ScoreOptions())
        result, _ = load_result(out / f"{name}.npz")
        expected = reference.maps[0].scores.astype(np.float16)  # stored as float16
        np.testing.assert_array_equal(result.maps[0].scores, expected)
    assert os.path.exists(out / "densemap-run.json")


@pytest.mark.slow
def test_a_second_ctrl_c_stops_without_blaming_images(tmp_path):
    repo = build_repository(tmp_path / "repo", slow=True)
    folder = tmp_path / "in"
    build_plain_folder(folder, 8, size=(768, 768))  # heat-map writes take a while
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "densemap.service.cli", "score", str(folder), "--out", str(out),
         "--models", str(repo), "--model", MODEL, "--heatmap", "--workers", "2"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a suite started in the background (`make test &`) inherits SIGINT ignored, and
        # Python then leaves it ignored: give the child the default a terminal would
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("*.npz"))) < 1 and time.monotonic() < deadline:
            assert process.poll() is None, "the run ended before it could be interrupted"
            time.sleep(0.005)
        process.send_signal(signal.SIGINT)
        time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode in (130, -signal.SIGINT), stderr  # -2: stopped during exit
    assert "densemap score: failed:" not in stderr and "No such file" not in stderr, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    for line in (out / "summary.jsonl").read_text().splitlines():
        assert json.loads(line)["status"] == "ok"
