"""``densemap score --ray``: Ray Data in local mode writes exactly what local mode writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from densemap.service.cli import main
from tests.support.score_fixtures import MODEL, build_mixed_folder, build_repository

pytestmark = pytest.mark.slow  # starts Ray

ray = pytest.importorskip("ray", reason="needs the 'distributed' extra (ray[data])")


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (".lock", "summary.jsonl")
    }


def _rows(root: Path) -> list[dict]:
    rows = [json.loads(line) for line in (root / "summary.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("seconds", None)  # wall time differs between runs
    return rows


def test_ray_local_mode_equals_local_mode(tmp_path, monkeypatch, capsys):
    repo = build_repository(tmp_path / "repo")
    folder = tmp_path / "in"
    expected = build_mixed_folder(folder)
    model = ["--models", str(repo), "--model", MODEL, "--heatmap", "--top-k", "2"]
    local = tmp_path / "local"
    assert main(["score", str(folder), "--out", str(local), *model]) == 1
    capsys.readouterr()

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # Ray writes its session files there
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        distributed = tmp_path / "ray"
        # "--ray PATH": with no address, the path after --ray goes back to the inputs
        code = main(["score", "--ray", str(folder), "--out", str(distributed), *model,
                     "--workers", "2"])  # fmt: skip
    finally:
        ray.shutdown()
    stdout, stderr = capsys.readouterr()
    assert code == 1
    assert "scored 5, skipped 0, failed 2 of 7" in stdout.splitlines()[-1]
    assert "corrupt.png" in stderr and "Traceback" not in stderr

    local_files, ray_files = _files(local), _files(distributed)
    assert sorted(ray_files) == sorted(local_files)
    assert sum(name.endswith(".npz") for name in ray_files) == 5
    assert sum(name.endswith(".heatmap.png") for name in ray_files) == 5
    for name, data in local_files.items():
        assert ray_files[name] == data, f"{name} differs between Ray and local mode"
    assert _rows(distributed) == _rows(local)
    assert {r["relpath"]: r["status"] for r in _rows(distributed)} == expected
