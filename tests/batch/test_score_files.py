"""The files of ``densemap score`` when the disk is full or ``--out`` is read-only, and the
modes it creates them with."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from densemap.service.batch import outputs, writer
from densemap.service.batch.summary import SummaryWriter
from densemap.service.cli import main
from tests.support.score_fixtures import MODEL, build_plain_folder

IMAGES = 12
DISK_FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("in")
    build_plain_folder(root, IMAGES, size=(40, 48))
    return root


def score(capsys, folder: Path, out: Path, repo: Path, *flags: str):
    code = main(["score", str(folder), "--out", str(out), "--models", str(repo),
                 "--model", MODEL, *flags])  # fmt: skip
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]


def resumes_to_the_end(capsys, folder: Path, out: Path, repo: Path, *flags: str) -> None:
    """Space freed: the rerun finishes the run, every image ok or skipped."""
    code, stdout, stderr = score(capsys, folder, out, repo, *flags)
    assert code == 0, stderr
    assert len(rows(out)) == IMAGES
    assert all(r["status"] in ("ok", "skipped") for r in rows(out))
    if "--detections" in flags:
        coco = json.loads((out / "detections.coco.json").read_text())
        lines = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
        assert len(lines) == IMAGES
        # the COCO list holds the same boxes as the lines, after the resume too
        boxes = [(line["relpath"], d["score"]) for line in lines for d in line["detections"]]
        assert [(c["file_name"], c["score"]) for c in coco] == boxes


def test_a_full_disk_while_appending_the_summary_stops_the_run_in_one_message(
    capsys, monkeypatch, repo, folder, tmp_path
):
    append = outputs.append_bytes

    def full_for_summary_rows(fd: int, data: bytes) -> None:
        if b'"status"' in data:  # summary rows; detections lines have no status
            raise DISK_FULL
        append(fd, data)

    monkeypatch.setattr(outputs, "append_bytes", full_for_summary_rows)
    out = tmp_path / "out"
    code, stdout, stderr = score(capsys, folder, out, repo, "--detections", "--workers", "1")
    assert code == 1
    assert "Traceback" not in stderr
    assert "disk full" in stderr and str(out / "summary.jsonl") in stderr, stderr
    assert "image(s) not scored" in stderr and "rerun to resume" in stderr
    assert "(stopped: rerun to resume)" in stdout.splitlines()[-1]
    assert len(rows(out)) < IMAGES  # no image started once the disk was full
    json.loads((out / "detections.coco.json").read_text())  # written all the same

    monkeypatch.setattr(outputs, "append_bytes", append)
    resumes_to_the_end(capsys, folder, out, repo, "--detections")


@pytest.mark.parametrize("name", ["summary.jsonl", "detections.jsonl", "detections.coco.json"])
def test_a_full_disk_at_the_end_names_the_file_and_still_writes_the_others(
    capsys, monkeypatch, repo, folder, tmp_path, name
):
    write_atomic = outputs.write_atomic

    def full_for(target: Path, write, *, partial_dir: Path) -> None:
        if target.name == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        write_atomic(target, write, partial_dir=partial_dir)

    monkeypatch.setattr(outputs, "write_atomic", full_for)
    out = tmp_path / "out"
    code, stdout, stderr = score(capsys, folder, out, repo, "--detections")
    assert code == 1 and "Traceback" not in stderr
    assert f"disk full: cannot write {out / name} (No space left on device)" in stderr, stderr
    assert "not scored" not in stderr  # every image was scored: only the file is missing
    written = {"summary.jsonl", "detections.jsonl", "detections.coco.json"} - {name}
    for other in written:
        assert (out / other).read_text()  # each file is tried on its own

    monkeypatch.setattr(outputs, "write_atomic", write_atomic)
    resumes_to_the_end(capsys, folder, out, repo, "--detections")


def test_a_full_disk_on_an_output_stops_the_run_instead_of_failing_every_image(
    capsys, monkeypatch, repo, folder, tmp_path
):
    def no_space(*args, **kwargs) -> None:
        raise DISK_FULL

    monkeypatch.setattr(writer, "write_npz", no_space)
    out = tmp_path / "out"
    code, stdout, stderr = score(capsys, folder, out, repo, "--workers", "1")
    assert code == 1 and "Traceback" not in stderr
    assert "disk full: cannot write" in stderr and ".npz (No space left on device)" in stderr
    failed = [r for r in rows(out) if r["status"] == "failed"]
    assert 1 <= len(failed) < IMAGES // 2  # the images already under way, not all of them
    assert all("No space left on device" in r["error"] for r in failed)

    monkeypatch.undo()
    resumes_to_the_end(capsys, folder, out, repo)


def test_a_read_only_out_is_refused_up_front(capsys, monkeypatch, repo, folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    access = os.access

    def read_only_out(path, mode, **kwargs) -> bool:  # what access(2) says of a 0o555 folder
        if Path(path) == out and mode & os.W_OK:
            return False
        return access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", read_only_out)
    code, stdout, stderr = score(capsys, folder, out, repo)
    assert code == 2 and "Traceback" not in stderr
    assert f"output folder {out} is not writable" in stderr and "--out" in stderr
    assert list(out.iterdir()) == []  # nothing written, not even the lock


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o555 folder all the same")
def test_a_chmod_read_only_out_is_refused(capsys, repo, folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, _, stderr = score(capsys, folder, out, repo)
    finally:
        out.chmod(0o755)
    assert code == 2 and "is not writable" in stderr and "Traceback" not in stderr


@pytest.fixture()
def umask():
    """Set the process umask for one test (restored after)."""
    saved = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(saved)


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_every_file_is_created_0o644_less_the_umask(capsys, umask, repo, folder, tmp_path, mask):
    umask(mask)
    out = tmp_path / "out"
    code, _, stderr = score(capsys, folder, out, repo, "--detections", "--heatmap")
    assert code == 0, stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"summary.jsonl", "detections.coco.json", ".lock"}
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o644 & ~mask)}, modes
    appending = SummaryWriter(tmp_path / "summary.jsonl", partial_dir=tmp_path)  # while it runs
    assert stat.S_IMODE((tmp_path / "summary.jsonl").stat().st_mode) == 0o644 & ~mask
    appending.finish()
