"""``densemap score --server``: through a running server, the same files as in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from densemap.service.cli import main
from densemap.service.server.app import create_server
from densemap.service.server.config import ServerConfig
from tests.support.score_fixtures import MODEL, build_mixed_folder


@pytest.fixture(scope="module")
def target(repo):
    config = ServerConfig(models_dir=repo, host="127.0.0.1", port=0, metrics_port=0)
    server, port = create_server(config)
    assert server.wait_ready(30), "the server did not load its models within 30 s"
    yield f"127.0.0.1:{port}"
    server.stop()


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (".lock", "summary.jsonl")
    }


def _rows(root: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (root / "summary.jsonl").read_text().splitlines()]
    return {row["relpath"]: row for row in rows}


def test_server_mode_writes_the_same_maps_as_in_process(capsys, repo, target, tmp_path):
    folder = tmp_path / "in"
    expected = build_mixed_folder(folder)
    options = ["--heatmap", "--top-k", "2", "--scales", "1,1.5", "--output-stride", "2"]
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert main(["score", str(folder), "--out", str(local), "--models", str(repo),
                 "--model", MODEL, *options]) == 1  # fmt: skip
    capsys.readouterr()
    code = main(["score", str(folder), "--out", str(remote), "--server", target,
                 "--model", MODEL, *options])  # fmt: skip
    stdout, stderr = capsys.readouterr()
    assert code == 1
    assert "scored 5, skipped 0, failed 2 of 7" in stdout.splitlines()[-1]
    assert "corrupt.png" in stderr and "tiny.png" in stderr and "Traceback" not in stderr

    local_files, remote_files = _files(local), _files(remote)
    assert sorted(remote_files) == sorted(local_files)
    for name, data in local_files.items():  # maps, geometry, labels, heat-maps: same bytes
        assert remote_files[name] == data, f"{name} differs between --server and in-process"
    local_rows, remote_rows = _rows(local), _rows(remote)
    assert {rel: row["status"] for rel, row in remote_rows.items()} == expected
    for rel, row in remote_rows.items():
        assert {k: v for k, v in row.items() if k not in ("seconds", "error")} == {
            k: v for k, v in local_rows[rel].items() if k not in ("seconds", "error")
        }
    assert "INVALID_ARGUMENT" in remote_rows["corrupt.png"]["error"]


def test_unreachable_server_is_one_clear_error(capsys, tmp_path):
    folder = tmp_path / "in"
    build_mixed_folder(folder)
    code = main(["score", str(folder), "--out", str(tmp_path / "o"), "--server",
                 "127.0.0.1:1", "--model", MODEL])  # fmt: skip
    stderr = capsys.readouterr().err
    assert code == 2 and "Traceback" not in stderr
    assert "no densemap server answers at --server 127.0.0.1:1" in stderr  # says what to do
    assert "densemap serve" in stderr


def test_an_option_wrong_for_the_served_model_is_one_usage_error(capsys, target, tmp_path):
    folder = tmp_path / "in"
    build_mixed_folder(folder)
    code = main(["score", str(folder), "--out", str(tmp_path / "o"), "--server", target,
                 "--model", MODEL, "--output-stride", "3"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and not (tmp_path / "o").exists()
    assert captured.err.strip().splitlines() == [
        "densemap score: error: output_stride 3 is not supported by model 'tiny': use one of "
        "4, 2, 1 (its stride divided by a whole number), or leave it unset for the native "
        "stride"
    ]
