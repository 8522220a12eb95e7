"""``densemap score --ray`` against a real Ray head (``ray start --head``) and quiet Ray runs.

The head runs on 127.0.0.1 with its own temp dir, HOME and ports; the fixture starts it in
its own process group and always kills that group, so no Ray process outlives the tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from densemap.service.cli import main
from densemap.service.score_cli import RAY_CLIENT_REFUSED
from tests.batch.test_ray_score import _files, _rows
from tests.support.paths import REPO_ROOT
from tests.support.score_fixtures import MODEL, build_mixed_folder, build_repository

pytestmark = pytest.mark.slow  # starts a Ray head

pytest.importorskip("ray", reason="needs the 'distributed' extra (ray[data])")

RAY = Path(sys.executable).with_name("ray")
# Lines Ray printed on every --ray run before densemap passed max_restarts=0 and kept
# Ray's token-auth default without its warning.
NOISE = (
    "max_restarts > 0",
    "Token authentication",
    "Progress bars disabled",
    "ray_remote_args",
    "Traceback",
)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PYTHONPATH=str(REPO_ROOT), RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def _stop(head: subprocess.Popen) -> None:
    """SIGTERM the head's process group, then SIGKILL whatever is left of it."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            return
        try:
            head.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
    try:  # the leader may be gone while its children linger: the group goes in any case
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def ray_head():
    """A one-node cluster: ``ray start --head --num-cpus 2 --include-dashboard false``."""
    if not RAY.exists():
        pytest.skip(f"no ray command next to {sys.executable}")
    temp = Path(tempfile.mkdtemp(prefix="dmray", dir="/tmp"))  # short: Unix socket paths
    gcs, client, dashboard, agent = _free_ports(4)
    log = (temp / "head.log").open("wb")
    env = _env(temp / "home", RAY_AUTH_MODE="disabled")
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--num-cpus", "2",
         "--include-dashboard", "false", "--disable-usage-stats",
         "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--ray-client-server-port", str(client), "--dashboard-port", str(dashboard),
         "--dashboard-agent-listen-port", str(agent), "--temp-dir", str(temp / "ray")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not any((temp / "ray").glob("session_*/sockets/raylet")):
            if head.poll() is not None or time.monotonic() > deadline:
                tail = (temp / "head.log").read_text(errors="replace")[-1500:]
                pytest.skip(f"`ray start --head` did not start a head within 90 s:\n{tail}")
            time.sleep(0.5)
        time.sleep(2)  # the raylet registers with the GCS just after creating its socket
        yield {"gcs": f"127.0.0.1:{gcs}", "env": env}
    finally:
        _stop(head)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _score(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "densemap.service.cli", "score", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


@pytest.fixture
def scored_locally(tmp_path, capsys):
    repo = build_repository(tmp_path / "repo")
    expected = build_mixed_folder(tmp_path / "in")
    model = ["--models", str(repo), "--model", MODEL, "--heatmap", "--top-k", "2"]
    assert main(["score", str(tmp_path / "in"), "--out", str(tmp_path / "local"), *model]) == 1
    capsys.readouterr()
    return model, expected


def test_gcs_address_of_a_real_head_equals_local_mode(ray_head, scored_locally, tmp_path):
    model, expected = scored_locally
    done = _score(
        [str(tmp_path / "in"), "--out", str(tmp_path / "ray"), "--ray", ray_head["gcs"], *model],
        ray_head["env"], tmp_path,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "scored 5, skipped 0, failed 2 of 7" in done.stdout.splitlines()[-1]
    assert "Ray: 7 image(s) on 1 actor(s)" in done.stderr
    for line in NOISE:
        assert line not in done.stderr, done.stderr

    local, distributed = _files(tmp_path / "local"), _files(tmp_path / "ray")
    assert sorted(distributed) == sorted(local)
    for name, data in local.items():
        assert distributed[name] == data, f"{name} differs between the Ray head and local mode"
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "local")
    assert {r["relpath"]: r["status"] for r in _rows(tmp_path / "ray")} == expected


def test_local_ray_run_is_quiet(scored_locally, tmp_path):
    """``--ray`` with no address starts a local cluster: Ray's default token auth, no noise."""
    model, _ = scored_locally
    home = Path(tempfile.mkdtemp(prefix="dmhome", dir="/tmp"))
    try:
        done = _score(
            [str(tmp_path / "in"), "--out", str(tmp_path / "ray"), "--ray", *model],
            _env(home), tmp_path,
        )  # fmt: skip
        assert (home / ".ray" / "auth_token").is_file()  # token auth stayed on
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert done.returncode == 1, done.stderr
    assert "scored 5, skipped 0, failed 2 of 7" in done.stdout.splitlines()[-1]
    for line in NOISE:
        assert line not in done.stderr, done.stderr
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_ray_client_address_is_refused_with_the_forms_that_work(how, tmp_path, monkeypatch, capsys):
    address = "ray://127.0.0.1:10001"
    (tmp_path / "in").mkdir()
    if how == "flag":
        args, named = ["--ray", address], f"--ray {address}"
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
        args, named = ["--ray"], f"RAY_ADDRESS={address}"
    code = main(["score", str(tmp_path / "in"), "--out", str(tmp_path / "out"), *args])
    stderr = capsys.readouterr().err
    assert code == 2
    assert stderr == "densemap score: error: " + RAY_CLIENT_REFUSED.format(address=named) + "\n"
    assert "--ray HOST:PORT" in stderr and "ray job submit" in stderr
    assert not (tmp_path / "out").exists()
