"""Offline checks of the deployment files: hadolint, yamllint, kubernetes-validate (strict,
Kubernetes 1.31) on the base manifests, on each rendered kustomize overlay and on the RayJob's
pod templates, and the RayJob itself against the KubeRay CRD's schema (vendored in
deploy/ray/schema/: kubernetes-validate has no schema for custom resources)."""

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.support.paths import REPO_ROOT

BIN = Path(sys.executable).parent
K8S = REPO_ROOT / "deploy" / "k8s"
CORE_MANIFESTS = sorted(p for p in (K8S / "base").glob("*.yaml") if p.name != "kustomization.yaml")
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
RAYJOB = REPO_ROOT / "deploy" / "ray" / "rayjob-score.yaml"
RAYJOB_SCHEMA = REPO_ROOT / "deploy" / "ray" / "schema" / "rayjob-ray.io-v1.json"


def tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: install the dev extra (pip install -e '.[dev]')")
    return path


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)


def test_dockerfile_passes_hadolint():
    result = run(tool("hadolint"), "deploy/Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_yaml_passes_yamllint():
    result = run(tool("yamllint"), "-s", "deploy")
    assert result.returncode == 0, result.stdout + result.stderr


def validate_strictly(*paths: Path, resources: int) -> None:
    result = run(tool("kubernetes-validate"), "--strict", "-k", "1.31.0", *map(str, paths))
    output = result.stdout + result.stderr
    # An unknown apiVersion only warns: fail on WARN lines too.
    assert result.returncode == 0 and "WARN" not in output and "ERROR" not in output, output
    assert output.count("passed") == resources, output


def test_core_manifests_validate_strictly_against_kubernetes_1_31():
    assert CORE_MANIFESTS, "no manifests found under deploy/k8s/base"
    validate_strictly(*CORE_MANIFESTS, REPO_ROOT / "deploy" / "ray" / "data-pvc.yaml",
                      resources=len(CORE_MANIFESTS) + 1)  # fmt: skip


def render(folder: Path) -> list[dict]:
    """``kubectl kustomize FOLDER`` (kustomize built into kubectl), as documents."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlays are rendered with kubectl kustomize")
    result = run(kubectl, "kustomize", str(folder))
    assert result.returncode == 0, result.stderr
    return list(yaml.safe_load_all(result.stdout))


def deployment_of(documents: list[dict]) -> dict:
    (deployment,) = [d for d in documents if d["kind"] == "Deployment"]
    return deployment


def container_env(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_every_kustomization_renders_and_validates(overlay, tmp_path):
    folder = K8S / "base" if overlay == "base" else K8S / "overlays" / overlay
    documents = render(folder)
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(yaml.safe_dump_all(documents))
    validate_strictly(rendered, resources=len(documents))
    deployment = deployment_of(documents)
    env = container_env(deployment)
    assert env["DENSEMAP_DEVICE"] == "cuda"  # never a silent CPU fallback on a GPU node
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    # /metrics listens on 127.0.0.1 unless told: the pod sets every address, so the port
    # Prometheus is told to scrape answers
    assert env["DENSEMAP_METRICS_HOST"] == "0.0.0.0"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"] == 9090
    assert env.get("DENSEMAP_METRICS_PORT", "9090") == "9090"
    assert container["image"] == "densemap:0.1.0"  # kustomize's images: entry applies
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    if overlay != "no-auth":  # the token cannot be off by accident
        assert env["DENSEMAP_AUTH_TOKEN"] == {
            "secretKeyRef": {"name": "densemap-auth", "key": "token"}
        }
    else:
        assert "DENSEMAP_AUTH_TOKEN" not in env


@pytest.mark.slow
def test_overlays_do_what_they_say():
    tls = deployment_of(render(K8S / "overlays" / "tls"))
    (container,) = tls["spec"]["template"]["spec"]["containers"]
    env = container_env(tls)
    assert env["DENSEMAP_TLS_CERT"] == "/etc/densemap/tls/tls.crt"
    assert env["DENSEMAP_TLS_KEY"] == "/etc/densemap/tls/tls.key"
    volumes = {v["name"]: v for v in tls["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "densemap-tls"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # kubelet's gRPC: no TLS
        assert "grpc" not in container[probe], probe
        command = container[probe]["exec"]["command"]
        assert (
            command[:2] == ["densemap", "health"]
            and "--ca-cert=/etc/densemap/tls/ca.crt" in command
        )
    documents = render(K8S / "overlays" / "object-storage")
    assert not [d for d in documents if d["kind"] == "PersistentVolumeClaim"]
    spec = deployment_of(documents)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes["models"] and "persistentVolumeClaim" not in volumes["models"]
    (init,) = spec["initContainers"]
    assert {"name": "models", "mountPath": "/models"} in init["volumeMounts"]


def test_probe_commands_are_densemap_health_invocations():
    from densemap.service.cli import build_parser

    patch = yaml.safe_load((K8S / "overlays" / "tls" / "tls.yaml").read_text())
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        args = build_parser().parse_args(container[probe]["exec"]["command"][1:])
        assert args.command == "health" and args.server_name == "densemap"


def rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def rayjob_errors(document: dict) -> list[str]:
    schema = json.loads(RAYJOB_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]


def test_rayjob_validates_against_the_kuberay_crd_schema():
    assert rayjob_errors(rayjob()) == []


def test_the_rayjob_schema_refuses_what_kuberay_refuses():
    job = rayjob()
    cases = []
    typo = copy.deepcopy(job)
    typo["spec"]["rayClusterSpec"]["workerGroupSpec"] = typo["spec"]["rayClusterSpec"].pop(
        "workerGroupSpecs"
    )
    cases.append(typo)
    no_name = copy.deepcopy(job)
    del no_name["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    cases.append(no_name)
    text_replicas = copy.deepcopy(job)
    text_replicas["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    cases.append(text_replicas)
    text_flag = copy.deepcopy(job)
    text_flag["spec"]["shutdownAfterJobFinishes"] = "yes"
    cases.append(text_flag)
    no_template = copy.deepcopy(job)
    del no_template["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    cases.append(no_template)
    for case in cases:
        assert rayjob_errors(case), case


def test_rayjob_pod_templates_validate_strictly_and_mount_the_data(tmp_path):
    cluster = rayjob()["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    templates = []
    for index, group in enumerate(groups):
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
        claims = {v["name"]: v.get("persistentVolumeClaim", {}) for v in spec["volumes"]}
        assert claims["data"]["claimName"] == "densemap-data"
        templates.append({"apiVersion": "v1", "kind": "PodTemplate",
                          "metadata": {"name": f"group-{index}"}, "template": group["template"]})  # fmt: skip
    path = tmp_path / "templates.yaml"
    path.write_text(yaml.safe_dump_all(templates))
    validate_strictly(path, resources=len(templates))


def test_rayjob_image_and_entrypoint_match_the_readme_and_the_cli():
    from densemap.service.cli import build_parser

    readme = (REPO_ROOT / "README.md").read_text()
    built = re.findall(r"--build-arg EXTRAS=cluster -t (\S+) \.", readme)
    assert built, "README gives no build command of the Ray image"
    cluster = rayjob()["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert images == {built[0]}, (images, built)
    program, *argv = shlex.split(rayjob()["spec"]["entrypoint"])
    assert program == "densemap"
    args = build_parser().parse_args(argv)
    assert args.command == "score" and args.gpus and args.ray == "auto"
    assert args.out.startswith("/data/") and all(p.startswith("/data/") for p in args.paths)


def test_probes_use_the_health_services_the_server_registers():
    text = (K8S / "base" / "deployment.yaml").read_text()
    assert "service: readiness" in text and "service: liveness" in text
    assert "nvidia.com/gpu: 1" in text.split("limits:")[1]


@pytest.mark.slow
def test_every_densemap_variable_in_deploy_files_is_a_serve_setting():
    import re

    help_text = subprocess.run(
        [sys.executable, "-m", "densemap.service.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    ).stdout
    known = set(re.findall(r"DENSEMAP_[A-Z_]+", help_text))
    assert "DENSEMAP_PORT" in known, help_text
    used = set()
    overlays = sorted((K8S / "overlays").rglob("*.yaml"))
    for path in [REPO_ROOT / "deploy" / "Dockerfile", *CORE_MANIFESTS, *overlays]:
        used |= set(re.findall(r"DENSEMAP_[A-Z_]+", path.read_text()))
    assert used and used <= known, f"unknown settings in deploy/: {sorted(used - known)}"
