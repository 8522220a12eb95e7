"""A server told ``--device cuda`` that cannot use CUDA never becomes ready; its
start-up log says whether TLS and auth are on; ``--port 0`` picks a free metrics port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from densemap.service.cli import build_parser
from densemap.service.client import DensemapClient, RemoteError
from densemap.service.engine import session
from densemap.service.engine.options import EngineConfig
from densemap.service.serve_cli import build_config
from densemap.service.server.app import create_server
from densemap.service.server.config import ServerConfig
from tests.support.score_fixtures import build_repository

HOST = "127.0.0.1"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CUDA_WORKS = session.cuda_problem(EngineConfig(device="cuda")) is None


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repository(tmp_path_factory.mktemp("repo"))


def _health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as chan:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(chan).Check(request, timeout=10).status


@pytest.mark.slow
def test_cuda_that_does_not_load_keeps_the_server_not_ready(repo, monkeypatch, caplog):
    # the process-wide outcome of the CUDA attempt, as a node with an old driver leaves it
    monkeypatch.setattr(session, "_cuda_state", {"usable": False, "reason": "driver too old"})
    config = ServerConfig(
        models_dir=repo, host=HOST, port=0, metrics_port=0, engine=EngineConfig(device="cuda")
    )
    server, port = create_server(config)
    target = f"{HOST}:{port}"
    try:
        assert not server.wait_ready(3)
        server.reload()  # SIGHUP tries again, and fails the same way
        assert not server.wait_ready(1)
        assert _health(target, "readiness") == NOT_SERVING
        assert _health(target, "liveness") == health_pb2.HealthCheckResponse.SERVING
        with DensemapClient(target, timeout=10) as client, pytest.raises(RemoteError) as caught:
            client.list_models()
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert "--device cuda" in caught.value.details and "driver too old" in caught.value.details
        assert server.models.names() == []  # no model was loaded on the CPU instead
    finally:
        server.stop()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("will not become ready" in m and "driver too old" in m for m in errors), errors
    assert any("needed: " in m and "cuDNN 9" in m for m in errors), errors


@pytest.mark.slow
@pytest.mark.skipif(CUDA_WORKS, reason="CUDA works on this machine: nothing to refuse")
def test_densemap_serve_device_cuda_without_cuda_logs_why_and_is_not_ready(repo):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DENSEMAP_")}
    env.update(DENSEMAP_AUTH_TOKEN="t0ken", PYTHONPATH=os.getcwd())
    serve = subprocess.Popen(
        [sys.executable, "-m", "densemap.service.cli", "serve", "--models", str(repo), "--host", HOST,
         "--port", "0", "--device", "cuda", "--log-json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    records, deadline = [], time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            line = serve.stdout.readline()
            assert line, "densemap serve exited:\n" + "\n".join(map(str, records))
            if line.startswith("{"):
                records.append(json.loads(line))
                if records[-1]["level"].lower() == "error":
                    break
        (start,) = [r for r in records if "tls" in r]
        error = records[-1]
        assert start["tls"] is False and start["auth"] is True, start
        assert "TLS off, auth bearer token, device cuda" in start["message"]
        assert "will not become ready" in error["message"], error
        assert "NVIDIA driver R580 or newer" in error["message"], error
        time.sleep(1)
        assert _health(f"{HOST}:{start['port']}", "readiness") == NOT_SERVING
        assert not any(r["message"].startswith("ready") for r in records)
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(10)


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
        return True


def test_port_zero_picks_a_free_metrics_port_unless_one_is_given(monkeypatch):
    monkeypatch.delenv("DENSEMAP_METRICS_PORT", raising=False)
    monkeypatch.delenv("DENSEMAP_PORT", raising=False)
    config = build_config(build_parser().parse_args(["serve", "--host", HOST, "--port", "0"]))
    assert config.metrics_port not in (0, 9090) and _port_is_free(config.metrics_port)
    given = ["serve", "--host", HOST, "--port", "0", "--metrics-port", "0"]
    assert build_config(build_parser().parse_args(given)).metrics_port == 0
    monkeypatch.setenv("DENSEMAP_METRICS_PORT", "9191")
    config = build_config(build_parser().parse_args(["serve", "--port", "0"]))
    assert config.metrics_port == 9191
    monkeypatch.delenv("DENSEMAP_METRICS_PORT")
    assert build_config(build_parser().parse_args(["serve"])).metrics_port == 9090


def test_a_token_from_a_file_secret_loses_its_newline_and_blank_is_refused(monkeypatch):
    from densemap.service.errors import InvalidOption

    monkeypatch.setenv("DENSEMAP_AUTH_TOKEN", "s3cret\n")  # kubectl create secret --from-file
    assert build_config(build_parser().parse_args(["serve"])).auth_token == "s3cret"
    for blank in ("", "\n"):  # an empty Secret must not mean a server without auth
        monkeypatch.setenv("DENSEMAP_AUTH_TOKEN", blank)
        with pytest.raises(InvalidOption, match="set but empty"):
            build_config(build_parser().parse_args(["serve"]))
    monkeypatch.delenv("DENSEMAP_AUTH_TOKEN")
    assert build_config(build_parser().parse_args(["serve"])).auth_token is None
