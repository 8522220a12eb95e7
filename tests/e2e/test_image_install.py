"""The image's install step, as deploy/Dockerfile writes it, in a fresh venv.

CI has no container engine, so the Dockerfile's own lines are read here: the sources its
COPY steps put in /src are copied to a folder, and its ``pip install`` command (with the
default ``RUNTIME`` and ``EXTRAS``) runs there in a fresh venv, offline: ``--no-index`` and
``--no-build-isolation`` are added, and the venv sees this environment's installed copies of
the distributions the project and its runtime extra need (and setuptools, its build
backend), nothing else. The installed ``densemap`` then answers ``--version``, lists its
subcommands and loads its engine (the runtime extra came with it). The Ray image's extra
must name ray[default] (downloading Ray is no CI step).
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO_ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
from densemap.service import __version__
from tests.support.install_support import link_distributions, required_distributions

pytestmark = pytest.mark.slow  # installs into a fresh venv

DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
# the image's default runtime, onnxruntime-gpu, exists for Linux x86_64 (the image's platform)
GPU_RUNTIME_HERE = (platform.system(), platform.machine()) == ("Linux", "x86_64")


def dockerfile_lines() -> list[str]:
    """Instructions of the Dockerfile, continuation lines joined, comments left out."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def install_step() -> tuple[list[str], str, dict[str, str]]:
    """(sources copied to /src before the install, the pip command, ARG defaults)."""
    sources, args, workdir = [], {}, None
    for line in dockerfile_lines():
        word, _, rest = line.partition(" ")
        if word == "WORKDIR":
            workdir = rest.strip()
        elif word == "ARG":
            name, _, value = rest.partition("=")
            args[name.strip()] = shlex.split(value)[0] if value.strip() else ""
        elif word == "COPY" and workdir == "/src":
            parts = rest.split()
            sources += parts[:-1]
        elif word == "RUN" and "pip install" in rest:
            (command,) = [c.strip() for c in rest.split("&&") if "pip install" in c]
            return sources, command, args
    pytest.fail("deploy/Dockerfile has no 'RUN pip install' step after 'WORKDIR /src'")


def test_the_dockerfile_install_step_works_in_a_fresh_venv(tmp_path):
    sources, command, args = install_step()
    assert {"pyproject.toml", "setup.py", "constraints.txt", "densemap", "service"} <= set(sources)
    source = tmp_path / "src"
    source.mkdir()
    for name in sources:  # what the COPY steps bring, as they bring it
        if (REPO_ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(REPO_ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy2(REPO_ROOT / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert args["RUNTIME"] == "gpu" and "${RUNTIME}" in command  # the GPU image by default
    needed = required_distributions(PYPROJECT["project"]["dependencies"])
    needed |= required_distributions(PYPROJECT["project"]["optional-dependencies"]["gpu"])
    needed |= required_distributions(PYPROJECT["build-system"]["requires"])
    assert "setuptools" in needed and not {"torch", "ray", "pytest"} & needed
    if GPU_RUNTIME_HERE:
        assert "onnxruntime-gpu" in needed and "onnxruntime" not in needed
    link_distributions(needed, tmp_path / "deps")
    (Path(site) / "densemap_test_deps.pth").write_text(f"{tmp_path / 'deps'}\n")

    # The Dockerfile's command, its ${EXTRAS...} expanded by the shell as in the build.
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    shell = f"{shlex.join(pip)} {command.removeprefix('pip ')} --no-index --no-build-isolation -q"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **args}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        ["sh", "-c", shell], cwd=source, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{shell}\n{done.stdout}\n{done.stderr}"
    version = subprocess.run(
        [str(venv / "bin" / "densemap"), "--version"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert version.stdout == f"densemap {__version__}\n", version.stderr
    usage = subprocess.run(
        [str(venv / "bin" / "densemap"), "--help"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    assert all(word in usage for word in ("serve", "score", "health")), usage
    if not GPU_RUNTIME_HERE:
        return
    engine = subprocess.run(
        [str(python), "-c", "from densemap.service.engine.onnxruntime_package import check_installed; "
         "import densemap.service.engine.engine; print(check_installed())"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert engine.stdout == "onnxruntime-gpu\n", engine.stderr


def test_the_ray_image_extra_brings_job_submission():
    """EXTRAS=cluster (README's build command of densemap-ray) installs ray[default]: the
    RayJob's submitter runs `ray job submit`, which needs the dashboard's dependencies."""
    (requirement,) = PYPROJECT["project"]["optional-dependencies"]["cluster"]
    name, extras = re.fullmatch(r"(\w+)\[([\w,]+)\].*", requirement).groups()
    assert name == "ray" and {"default", "data"} <= set(extras.split(","))
    assert "EXTRAS=cluster -t densemap-ray:0.1.0" in DOCKERFILE.read_text()
