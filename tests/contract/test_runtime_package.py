"""The runtime is an install extra: the client needs none, the engine exactly one onnxruntime.

The installed distributions are simulated by monkeypatching ``importlib.metadata`` as
service/engine/onnxruntime_package.py reads it; the client is imported in a subprocess whose
import system refuses onnxruntime (as on an install without a runtime extra).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from densemap.service.engine import onnxruntime_package
from densemap.service.errors import DensemapError, RuntimeNotInstalled
from tests.support.paths import REPO_ROOT


class FakeDistribution:
    def __init__(self, name: str, top_level: str | None = "onnxruntime\n") -> None:
        self.metadata = {"Name": name}
        self._top_level = top_level
        self.files = [Path(top_level.split()[0]) / "__init__.py"] if top_level else []

    def read_text(self, filename: str) -> str | None:
        return self._top_level if filename == "top_level.txt" else None


def installed(monkeypatch, *dists: FakeDistribution) -> None:
    others = [FakeDistribution("numpy", "numpy\n"), FakeDistribution("grpcio", "grpc\n")]
    monkeypatch.setattr(onnxruntime_package.metadata, "distributions", lambda: [*others, *dists])


def test_one_runtime_installed_is_accepted(monkeypatch):
    installed(monkeypatch, FakeDistribution("onnxruntime_gpu"))
    assert onnxruntime_package.check_installed() == "onnxruntime-gpu"
    installed(monkeypatch, FakeDistribution("onnxruntime"), FakeDistribution("onnxruntime"))
    assert onnxruntime_package.check_installed() == "onnxruntime"  # found twice on sys.path


def test_packages_of_other_modules_do_not_count(monkeypatch):
    installed(
        monkeypatch,
        FakeDistribution("onnxruntime-gpu"),
        FakeDistribution("onnxruntime-genai", "onnxruntime_genai\n"),
        FakeDistribution("onnxruntime_extensions", None),  # no top_level.txt, no files
    )
    assert onnxruntime_package.check_installed() == "onnxruntime-gpu"


def test_no_runtime_names_the_extras(monkeypatch):
    installed(monkeypatch)
    with pytest.raises(RuntimeNotInstalled) as caught:
        onnxruntime_package.import_onnxruntime()
    message = str(caught.value)
    assert "none is installed" in message
    assert "pip install 'densemap[cpu]'" in message and "'densemap[gpu]'" in message
    assert isinstance(caught.value, DensemapError) and isinstance(caught.value, ImportError)


def test_both_runtimes_name_the_uninstall(monkeypatch):
    installed(monkeypatch, FakeDistribution("onnxruntime-gpu"), FakeDistribution("onnxruntime"))
    imported = []
    monkeypatch.setattr(onnxruntime_package.importlib, "import_module", imported.append)
    with pytest.raises(RuntimeNotInstalled) as caught:
        onnxruntime_package.import_onnxruntime()
    assert imported == []  # detected before `import onnxruntime`, which both installs break
    message = str(caught.value)
    assert "onnxruntime and onnxruntime-gpu are both installed" in message
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in message


def test_another_package_of_the_module_counts_as_a_second_runtime(monkeypatch):
    installed(monkeypatch, FakeDistribution("onnxruntime-gpu"), FakeDistribution("ort-nightly"))
    with pytest.raises(RuntimeNotInstalled, match="onnxruntime-gpu and ort-nightly are both"):
        onnxruntime_package.check_installed()


def test_an_incomplete_module_names_the_reinstall(monkeypatch):
    """Uninstalling one of two runtimes deletes files they share: the module that is left
    lacks get_available_providers (the AttributeError users saw at every command)."""
    installed(monkeypatch, FakeDistribution("onnxruntime-gpu"))
    broken = type(sys)("onnxruntime")
    monkeypatch.setattr(onnxruntime_package.importlib, "import_module", lambda name: broken)
    monkeypatch.setattr(onnxruntime_package.metadata, "version", lambda name: "1.31.1")
    with pytest.raises(RuntimeNotInstalled) as caught:
        onnxruntime_package.import_onnxruntime()
    message = str(caught.value)
    assert "no InferenceSession or get_available_providers" in message
    assert "pip install --force-reinstall --no-deps onnxruntime-gpu==1.31.1" in message


def test_this_environment_has_one_runtime():
    assert onnxruntime_package.check_installed() in ("onnxruntime", "onnxruntime-gpu")
    assert onnxruntime_package.ort.InferenceSession is not None


BLOCK_ONNXRUNTIME = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in ("onnxruntime", "torch"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Refuse())
"""


def run_without_onnxruntime(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_ONNXRUNTIME + code],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_the_client_imports_without_onnxruntime():
    done = run_without_onnxruntime(
        "from densemap.service.client import DensemapClient, RemoteError\n"
        "from densemap.service.engine import ScoreOptions, ScoreResult, ScoreMap, EngineConfig, HeadInfo\n"
        "from densemap.service.engine.options import DetectionOptions\n"
        "from densemap.service.batch.outputs import load_result\n"
        "import densemap.service.cli; densemap.service.cli.build_parser()\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('onnxruntime', 'densemap.service.engine')))\n"
        "print(loaded)\n"
    )
    assert done.returncode == 0, done.stderr
    loaded = done.stdout
    assert "onnxruntime" not in loaded.replace("densemap.service.engine.onnxruntime_package", "")
    assert "densemap.service.engine.onnxruntime_package" not in loaded
    assert "densemap.service.engine.engine" not in loaded


def test_densemap_score_without_a_runtime_says_what_to_install(tmp_path):
    """A core-only install, simulated: no onnxruntime distribution and no module. The CLI's
    help works; scoring exits 2 with the fix, no traceback, no output folder."""
    page = REPO_ROOT / "models" / "digits" / "pages" / "page_1.png"
    out = tmp_path / "maps"
    done = run_without_onnxruntime(
        "import importlib.metadata as m\n"
        "every = m.distributions\n"
        "m.distributions = lambda: [d for d in every() if 'onnxruntime' not in d.metadata['Name']]\n"
        "from densemap.service.cli import main\n"
        f"sys.exit(main(['score', {str(page)!r}, '--out', {str(out)!r}]))\n"
    )
    assert done.returncode == 2, done.stderr
    assert "densemap score: error: densemap's engine needs onnxruntime" in done.stderr
    assert "pip install 'densemap[cpu]'" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_the_engine_package_exports_every_name_it_lists():
    import densemap.service.engine as engine

    aliases = {"ScoreMap": "ScoreResult"}  # deprecated names of the same object
    for name in engine.__all__:
        assert getattr(engine, name).__name__ == aliases.get(name, name)
    assert engine.ScoreMap is engine.ScoreResult
    assert sorted(engine.__all__) == sorted(engine._EXPORTS)
    with pytest.raises(AttributeError, match="no attribute 'Engin'"):
        engine.Engin  # noqa: B018


def test_densemap_serve_with_two_runtimes_exits_before_serving():
    """A second package of the module beside this environment's (simulated): the server does
    not start and report every model broken; it exits 2 with the uninstall command."""
    done = run_without_onnxruntime(
        "import importlib.metadata as m\n"
        "class Cpu:\n"
        "    metadata, files = {'Name': 'ort-nightly'}, []\n"
        "    def read_text(self, name): return 'onnxruntime\\n'\n"
        "every = m.distributions\n"
        "m.distributions = lambda: [*every(), Cpu()]\n"
        "from densemap.service.cli import main\n"
        "sys.exit(main(['serve', '--port', '0', '--metrics-port', '0']))\n"
    )
    assert done.returncode == 2, done.stderr
    assert "densemap serve: error: onnxruntime" in done.stderr
    assert "and ort-nightly are both installed" in done.stderr
    assert "pip uninstall -y onnxruntime" in done.stderr
    assert "serving on" not in done.stderr + done.stdout
