"""Offline checks of the deployment files: hadolint, yamllint, kubernetes-validate."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CORE_MANIFESTS = sorted(
    p for p in (ROOT / "deploy" / "k8s").glob("*.yaml") if p.name != "kustomization.yaml"
)


def tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: install the dev extra (pip install -e '.[dev]')")
    return path


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_dockerfile_passes_hadolint():
    result = run(tool("hadolint"), "deploy/Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_yaml_passes_yamllint():
    result = run(tool("yamllint"), "-s", "deploy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_core_manifests_validate_strictly_against_kubernetes_1_31():
    assert CORE_MANIFESTS, "no manifests found under deploy/k8s"
    result = run(tool("kubernetes-validate"), "--strict", "-k", "1.31.0", *map(str, CORE_MANIFESTS))
    output = result.stdout + result.stderr
    # An unknown apiVersion only warns: fail on WARN lines too.
    assert result.returncode == 0 and "WARN" not in output and "ERROR" not in output, output
    assert output.count("passed") == len(CORE_MANIFESTS), output


def test_probes_use_the_health_services_the_server_registers():
    text = (ROOT / "deploy" / "k8s" / "deployment.yaml").read_text()
    assert "service: readiness" in text and "service: liveness" in text
    assert "nvidia.com/gpu: 1" in text.split("limits:")[1]


def test_every_densemap_variable_in_deploy_files_is_a_serve_setting():
    import re

    help_text = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    ).stdout
    known = set(re.findall(r"DENSEMAP_[A-Z_]+", help_text))
    assert "DENSEMAP_PORT" in known, help_text
    used = set()
    for path in [ROOT / "deploy" / "Dockerfile", *CORE_MANIFESTS]:
        used |= set(re.findall(r"DENSEMAP_[A-Z_]+", path.read_text()))
    assert used and used <= known, f"unknown settings in deploy/: {sorted(used - known)}"
