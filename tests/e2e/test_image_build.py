"""``make image`` builds the server image where a container engine exists.

CI has none (docker without a daemon, no podman or buildah): then this test is skipped and
says so; tests/e2e/test_image_install.py checks the image's install step in a fresh venv
instead. Where an engine runs, the build pulls the CUDA base image (several GB): slow.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.support.paths import REPO_ROOT


def engine() -> str | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "info"], capture_output=True, timeout=60).returncode == 0:
        return "docker"
    return next((name for name in ("podman", "buildah") if shutil.which(name)), None)


def test_build_script_refuses_clearly_without_an_engine(tmp_path):
    if engine() is not None:
        pytest.skip("a container engine exists here: test_make_image_builds covers the script")
    done = subprocess.run(
        ["sh", str(REPO_ROOT / "deploy" / "build-image.sh"), "densemap:test"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 3 and "no container engine here" in done.stderr, done.stderr


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_make_image_builds_and_the_image_serves_help():
    found = engine()
    if found is None:
        pytest.skip("no container engine here (docker has no daemon; no podman or buildah)")
    done = subprocess.run(["make", "image"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=3500)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "image densemap:0.1.0:" in done.stdout and "image densemap-ray:0.1.0:" in done.stdout
    if found != "buildah":  # buildah builds, it does not run
        run = [found, "run", "--rm", "--entrypoint", "densemap", "densemap:0.1.0", "--version"]
        version = subprocess.run(run, capture_output=True, text=True, timeout=300)
        assert version.stdout.startswith("densemap "), version.stderr
