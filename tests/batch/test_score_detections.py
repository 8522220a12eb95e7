"""``densemap score --detections``: detections.jsonl, detections.coco.json, summary counts,
resume, server mode, and the usage errors, on the square model whose boxes are known."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from densemap.service.cli import main
from tests.support.paths import REPO_ROOT
from tests.support.score_fixtures import encode
from tests.support.server_harness import HOST, start_server
from tests.support.square_model import square_model, squares_image

MODEL = "squares"
IMAGES = {
    "one.png": squares_image(32, 40, [(0, 8, 16, 8)]),
    "sub/two.png": squares_image(48, 48, [(1, 4, 8, 8), (0, 28, 36, 8)]),
    "none.png": squares_image(24, 24, []),
}
BOXES = {  # relpath -> [(label, box, cell)], best first; ties ordered by class then cell
    "none.png": [],
    "one.png": [("red", [16.0, 8.0, 24.0, 16.0], [2, 4])],
    "sub/two.png": [
        ("red", [36.0, 28.0, 44.0, 36.0], [7, 9]),
        ("green", [8.0, 4.0, 16.0, 12.0], [1, 2]),
    ],
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    square_model(root / MODEL)
    return root


@pytest.fixture()
def folder(tmp_path) -> Path:
    for relpath, image in IMAGES.items():
        path = tmp_path / "in" / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(image, "PNG"))
    return tmp_path / "in"


def run(capsys, *argv):
    code = main(["score", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_outputs(out: Path) -> None:
    docs = lines(out / "detections.jsonl")
    assert [d["relpath"] for d in docs] == sorted(BOXES)
    for doc in docs:
        got = [(d["label"], d["box"], d["cell"]) for d in doc["detections"]]
        assert got == BOXES[doc["relpath"]]
        assert all(d["scale"] == 1.0 and d["scale_index"] == 0 for d in doc["detections"])
    coco = json.loads((out / "detections.coco.json").read_text())
    assert [(r["image_id"], r["category_id"], r["bbox"], r["file_name"]) for r in coco] == [
        (2, 1, [16.0, 8.0, 8.0, 8.0], "one.png"),
        (3, 1, [36.0, 28.0, 8.0, 8.0], "sub/two.png"),
        (3, 2, [8.0, 4.0, 8.0, 8.0], "sub/two.png"),
    ]
    counts = {r["relpath"]: r["detection_count"] for r in lines(out / "summary.jsonl")}
    assert counts == {relpath: len(boxes) for relpath, boxes in BOXES.items()}
    assert not any("detections" in r for r in lines(out / "summary.jsonl"))


def test_detections_files_hold_the_known_boxes_and_survive_a_resume(capsys, repo, folder, tmp_path):
    out = tmp_path / "out"
    base = [str(folder), "--out", str(out), "--models", str(repo), "--model", MODEL]
    code, stdout, stderr = run(capsys, *base, "--detections")
    assert code == 0, stderr
    check_outputs(out)
    code, stdout, _ = run(capsys, *base, "--detections")  # all skipped: files rebuilt the same
    assert code == 0 and "skipped 3" in stdout
    check_outputs(out)
    code, _, stderr = run(capsys, *base, "--detections", "--threshold", "0.99")
    assert code == 2 and "--overwrite" in stderr  # other detection settings: no mixing


def test_detections_through_a_server_equal_in_process(capsys, repo, folder, tmp_path):
    server, port = start_server(repo)
    try:
        out = tmp_path / "remote"
        code, _, stderr = run(
            capsys, str(folder), "--out", str(out), "--server", f"{HOST}:{port}", "--model",
            MODEL, "--detections",
        )  # fmt: skip
    finally:
        server.stop()
    assert code == 0, stderr
    check_outputs(out)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--threshold", "0.3"], "--threshold apply to --detections: add --detections"),
        (["--detections", "--nms-iou", "1.5"], "detections.iou must be in [0, 1], got 1.5"),
        (["--detections", "--detection-classes", "1,x"], "must be class indices"),
        (["--detections", "--detection-classes", "7"], "distinct class indices of this model"),
        (["--detections", "--max-detections", "0"], "max_count must be in 1..10000"),
    ],
)
def test_bad_detection_flags_are_one_usage_error(capsys, repo, folder, tmp_path, flags, message):
    out = tmp_path / "out"
    code, stdout, stderr = run(
        capsys, str(folder), "--out", str(out), "--models", str(repo), "--model", MODEL, *flags
    )
    assert code == 2 and message in stderr and "Traceback" not in stderr
    assert not (out / "detections.jsonl").exists()


def test_the_model_folders_box_offsets_apply_in_process(capsys, folder, tmp_path):
    root = tmp_path / "repo"
    square_model(root / MODEL)
    (root / MODEL / "densemap.json").write_text(json.dumps({"box_offsets": [0.25, 0, 0, 0.5]}))
    out = tmp_path / "out"
    code, _, stderr = run(
        capsys, str(folder), "--out", str(out), "--models", str(root), "--model", MODEL,
        "--detections",
    )  # fmt: skip
    assert code == 0, stderr
    (one,) = [d for d in lines(out / "detections.jsonl") if d["relpath"] == "one.png"]
    assert [d["box"] for d in one["detections"]] == [[18.0, 8.0, 24.0, 20.0]]


# Dies (SIGKILL) in the write thread right after the image's .npz and heat-map were renamed
# into place and before its detections.jsonl line is written: the window resume must cover.
KILLED_BEFORE_ITS_LINE = """
import os, signal, sys
from densemap.service.batch import detections_out
from densemap.service.cli import main

add = detections_out.DetectionsWriter.add

def add_or_die(self, line):
    if line["relpath"] == sys.argv[1]:
        os.kill(os.getpid(), signal.SIGKILL)
    add(self, line)

detections_out.DetectionsWriter.add = add_or_die
sys.exit(main(["score", *sys.argv[2:]]))
"""


def test_resume_redoes_an_image_killed_between_its_files_and_its_boxes(
    capsys, repo, folder, tmp_path
):
    out = tmp_path / "out"
    base = [str(folder), "--out", str(out), "--models", str(repo), "--model", MODEL,
            "--detections", "--heatmap"]  # fmt: skip
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_BEFORE_ITS_LINE, "sub/two.png", *base, "--workers", "1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / "sub/two.png.npz").is_file() and (out / "sub/two.png.heatmap.png").is_file()
    assert [d["relpath"] for d in lines(out / "detections.jsonl")] == ["none.png", "one.png"]
    appended = out / "summary.jsonl"  # as the killed run left it: appended, not yet rewritten
    assert stat.S_IMODE(appended.stat().st_mode) & 0o111 == 0  # was created executable

    code, stdout, stderr = run(capsys, *base)
    assert code == 0, stderr
    assert "scored 1, skipped 2" in stdout  # sub/two.png is redone: its boxes were missing
    check_outputs(out)
