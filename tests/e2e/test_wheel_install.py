"""A new user's install: build the wheel, install it into a fresh venv without torch, run it.

The fresh venv gets the wheel (``--no-deps``, no index) and links to this environment's
installed copies of exactly the distributions the wheel's metadata requires with the
runtime extra of the onnxruntime installed here (``gpu`` on Linux x86_64; transitively,
other extras left out): no download, and torch, ray and
the dev tools stay out. ``densemap score`` and ``densemap serve`` then run from an empty
folder with no ``DENSEMAP_MODELS``, so they can only find the ``digits`` model inside the
wheel. A second venv gets the core dependencies only (a client app's install): the client
imports and ``densemap score`` says which extra brings the runtime.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from densemap.service import __version__
from densemap.service.batch.outputs import load_result
from densemap.service.client import DensemapClient
from densemap.service.engine.onnxruntime_package import check_installed
from tests.support.install_support import link_distributions, required_distributions
from tests.support.paths import REPO_ROOT

PAGE = REPO_ROOT / "models" / "digits" / "pages" / "page_1.png"
SOURCES = ("pyproject.toml", "setup.py", "README.md", "densemap", "service", "convert", "models")

pytestmark = [
    pytest.mark.slow,  # builds a wheel and a fresh venv
    pytest.mark.skipif(
        not (REPO_ROOT / "models" / "digits" / "model.onnx").is_file(),
        reason="digits model not built",
    ),
]


def run(*argv, **kwargs) -> subprocess.CompletedProcess:
    # a fresh user's environment: no PYTHONPATH pointing back at the checkout
    env = {k: v for k, v in kwargs.pop("env", os.environ).items() if k != "PYTHONPATH"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, **kwargs)
    assert done.returncode == 0, f"{argv}\n{done.stdout}\n{done.stderr}"
    return done


def build_wheel(tmp: Path) -> Path:
    """The wheel of a copy of the sources (the checkout gets no build/ or egg-info)."""
    source = tmp / "src"
    source.mkdir()
    for name in SOURCES:
        if (REPO_ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(REPO_ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy2(REPO_ROOT / name, source / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
        "-w", str(tmp / "dist"), str(source))  # fmt: skip
    (wheel,) = (tmp / "dist").glob("densemap-*.whl")
    return wheel


def required_by(wheel: Path, extras: tuple[str, ...] = ()) -> set[str]:
    """Names of the distributions the wheel needs with ``extras``, transitively."""
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        lines = archive.read(metadata).decode().splitlines()
    return required_distributions(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")),
        extras,
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def make_venv(wheel: Path, names: set[str], tmp: Path) -> Path:
    """A fresh venv with the wheel and links to the installed copies of ``names``."""
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
        "--no-index", str(wheel))  # fmt: skip
    site = run(str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
    link_distributions(names, tmp / "deps")
    (Path(site.stdout.strip()) / "densemap_test_deps.pth").write_text(f"{tmp / 'deps'}\n")
    return venv


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """With the runtime extra of the onnxruntime installed here (gpu on Linux x86_64)."""
    runtime = check_installed()  # the distribution this environment links to
    names = required_by(wheel, ("gpu" if runtime == "onnxruntime-gpu" else "cpu",))
    assert runtime in names and not {"onnxruntime", "onnxruntime-gpu"} - {runtime} & names
    assert not {"torch", "ray", "pytest"} & names
    return make_venv(wheel, names, tmp_path_factory.mktemp("runtime"))


@pytest.fixture(scope="module")
def client_venv(wheel, tmp_path_factory) -> Path:
    names = required_by(wheel)
    assert not {"onnxruntime", "onnxruntime-gpu", "torch", "ray"} & names
    return make_venv(wheel, names, tmp_path_factory.mktemp("client"))


def fresh_env() -> dict[str, str]:
    drop = ("DENSEMAP_MODELS", "PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    return {k: v for k, v in os.environ.items() if k not in drop}


def test_the_wheel_installs_one_import_name(wheel):
    with zipfile.ZipFile(wheel) as archive:
        files = set(archive.namelist())
    names = {name.split("/", 1)[0] for name in files}
    (dist_info,) = [n for n in names if n.endswith(".dist-info")]
    assert names - {dist_info} == {"densemap"}, names
    assert {"densemap/__init__.py", "densemap/__main__.py", "densemap/service/cli.py",
            "densemap/convert/__init__.py",
            "densemap/service/bundled_models/digits/model.onnx"} <= files  # fmt: skip
    assert not any(f.startswith("densemap/service/bundled_models/digits/") and f.endswith(".py")
                   for f in files), "the digits recipes stay out of the wheel"  # fmt: skip


def test_the_wheel_holds_the_model_and_runs_without_torch(venv, tmp_path):
    python = str(venv / "bin" / "python")
    probe = run(python, "-c", "import densemap, importlib.util as u; print(densemap.__file__); "
                "print(u.find_spec('torch'), u.find_spec('ray'), u.find_spec('service'))",
                cwd=tmp_path)  # fmt: skip
    where, missing = probe.stdout.splitlines()
    assert where.startswith(str(venv)) and missing == "None None None"
    version = run(str(venv / "bin" / "densemap"), "--version", cwd=tmp_path, env=fresh_env())
    assert version.stdout == f"densemap {__version__}\n"
    module = run(python, "-m", "densemap", "--version", cwd=tmp_path, env=fresh_env())
    assert module.stdout == version.stdout
    api = run(python, "-c", "from densemap import Engine, EngineConfig, ScoreOptions, "
              "DensemapClient, convert; print(Engine.__module__, DensemapClient.__module__, "
              "convert.__name__)", cwd=tmp_path, env=fresh_env())  # fmt: skip
    assert api.stdout.split() == [
        "densemap.service.engine.engine", "densemap.service.client", "densemap.convert"]  # fmt: skip


def test_score_from_an_empty_folder_uses_the_bundled_model(venv, tmp_path):
    shutil.copy2(PAGE, tmp_path / "page.png")
    done = run(str(venv / "bin" / "densemap"), "score", "page.png", "--out", "m",
               cwd=tmp_path, env=fresh_env())  # fmt: skip
    assert "scored 1, skipped 0, failed 0 of 1 images" in done.stdout.splitlines()[-1]
    result, meta = load_result(tmp_path / "m" / "page.png.npz")
    assert meta["model"] == "digits" and result.labels[:3] == ("0", "1", "2")
    assert result.maps[0].scores.shape[0] == 11


def test_serve_from_an_empty_folder_serves_the_bundled_model(venv, tmp_path):
    serve = subprocess.Popen(
        [str(venv / "bin" / "densemap"), "serve", "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "0", "--log-json"],
        cwd=tmp_path, env=fresh_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        port, deadline, lines = None, time.monotonic() + 120, []
        while time.monotonic() < deadline:
            line = serve.stdout.readline()
            assert line, "densemap serve exited:\n" + "".join(lines)
            lines.append(line)
            record = json.loads(line) if line.startswith("{") else {}
            port = record.get("port", port)
            if record.get("message", "").startswith("ready"):
                break
        assert record["models"] == ["digits"], lines
        with DensemapClient(f"127.0.0.1:{port}", timeout=60) as client:
            result = client.score(PAGE.read_bytes(), model="digits", top_k=1)
        assert result.maps[0].scores.shape[0] == 11
        assert np.isclose(result.maps[0].scores.sum(axis=0), 1.0, atol=1e-4).all()
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(10)


def test_the_core_install_has_a_client_and_names_the_runtime_extra(client_venv, tmp_path):
    """Without a runtime extra: the client and the CLI's help work; scoring names the fix."""
    python = str(client_venv / "bin" / "python")
    probe = run(python, "-c", "import importlib.util as u, densemap.service.batch.outputs; "
                "from densemap import DensemapClient, ScoreOptions; "
                "print(u.find_spec('onnxruntime'))", cwd=tmp_path, env=fresh_env())  # fmt: skip
    assert probe.stdout == "None\n"
    run(str(client_venv / "bin" / "densemap"), "score", "--help", cwd=tmp_path, env=fresh_env())
    shutil.copy2(PAGE, tmp_path / "page.png")
    done = subprocess.run(
        [str(client_venv / "bin" / "densemap"), "score", "page.png", "--out", "m"],
        cwd=tmp_path, env=fresh_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "densemap score: error:" in done.stderr and "densemap[cpu]" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "m").exists()
