"""``densemap score`` on hostile folders: links, vanished/empty/bomb files, odd names, --out."""

from __future__ import annotations

import json
import os
import struct
import zlib

from densemap.service.cli import main
from tests.support.score_fixtures import MODEL, encode, random_image


def score(capsys, repo, *argv: str) -> tuple[int, str, str]:
    code = main(["score", *argv, "--models", str(repo), "--model", MODEL])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def png_declaring(height: int, width: int) -> bytes:
    """A tiny PNG whose header declares height x width grey pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_hostile_folder_reports_each_bad_file_and_goes_on(capsys, repo, tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "good.png").write_bytes(encode(random_image(20, 24, 1), "PNG"))
    (folder / "sub" / "loop").symlink_to("..")  # a symlink loop: never followed
    (folder / "vanished.png").symlink_to(tmp_path / "gone.png")  # removed after the walk
    (folder / "empty.png").write_bytes(b"")
    os.mkfifo(folder / "pipe.png")  # a FIFO: reading it would block forever: skipped
    os.mkfifo(folder / "pipe")
    (folder / "bomb.png").write_bytes(png_declaring(100_000, 100_000))
    odd = os.path.join(os.fsencode(folder), b"bad\xff.png")  # not UTF-8
    with open(odd, "wb") as f:
        f.write(b"")
    out = tmp_path / "out"
    code, stdout, stderr = score(capsys, repo, str(folder), "--out", str(out))
    assert code == 1, stderr
    assert "scored 1, skipped 0, failed 4 of 5 images" in stdout.strip().splitlines()[-1]
    assert "Traceback" not in stdout + stderr
    rows = {
        r["relpath"]: r for r in map(json.loads, (out / "summary.jsonl").read_text().splitlines())
    }
    assert rows["good.png"]["status"] == "ok"
    assert "No such file" in rows["vanished.png"]["error"]
    assert "empty" in rows["empty.png"]["error"]
    assert "pixels" in rows["bomb.png"]["error"]
    assert rows[os.fsdecode(b"bad\xff.png")]["status"] == "failed"
    assert "vanished.png" in stderr and "bomb.png" in stderr
    assert "bad\\xff.png" in stderr  # printed, not a UnicodeEncodeError


def test_out_must_not_be_an_input_folder_or_a_file(capsys, repo, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(random_image(20, 24, 1), "PNG"))
    code, _, stderr = score(capsys, repo, str(folder), "--out", str(folder))
    assert code == 2 and "also an input folder" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in folder.iterdir()) == ["a.png"]  # nothing written
    code, _, stderr = score(capsys, repo, str(folder), "--out", str(folder / "a.png"))
    assert code == 2 and "existing file, not a folder" in stderr and "Traceback" not in stderr


def test_earlier_output_folders_inside_the_input_are_not_scored(capsys, repo, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(random_image(20, 24, 1), "PNG"))
    code, stdout, _ = score(capsys, repo, str(folder), "--out", str(folder / "run1"), "--heatmap")
    assert code == 0 and "scored 1," in stdout
    assert (folder / "run1" / "a.png.heatmap.png").is_file()
    # another --out: run1's heat-map PNGs are outputs, not images to score
    code, stdout, _ = score(capsys, repo, str(folder), "--out", str(folder / "run2"), "--heatmap")
    assert code == 0 and "scored 1, skipped 0, failed 0 of 1 images" in stdout


def test_no_image_found_is_said_not_silent(capsys, repo, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(random_image(20, 24, 1), "PNG"))
    code, stdout, stderr = score(capsys, repo, str(folder), "--out", str(tmp_path / "o"),
                                 "--glob", "*.PNG")  # fmt: skip
    assert code == 0 and "scored 0, skipped 0, failed 0 of 0 images" in stdout
    assert "no image files matching --glob *.PNG (case-sensitive)" in stderr
