"""service/ never imports torch: every module imports, and the CLI starts, with torch blocked."""

import subprocess
import sys
import textwrap

import pytest

from tests.support.paths import REPO_ROOT

BLOCK = """
import sys
class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, BlockTorch())
"""


def run_blocked(body: str) -> subprocess.CompletedProcess:
    script = BLOCK + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180
    )


@pytest.mark.slow
def test_every_service_module_imports_without_torch():
    done = run_blocked(
        """
        import importlib, pkgutil
        import densemap.service as service
        names = [m.name for m in pkgutil.walk_packages(service.__path__, "service.")]
        for name in names:
            importlib.import_module(name)
        assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
        print(len(names))
        """
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) > 30  # the walk really found the package's modules


def test_cli_help_and_serve_help_run_without_torch():
    done = run_blocked(
        """
        from densemap.service.cli import main
        for command in (["serve", "--help"], ["score", "--help"]):
            try:
                main(command)
            except SystemExit as exc:
                assert exc.code == 0, command
        print("ok")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("ok")
