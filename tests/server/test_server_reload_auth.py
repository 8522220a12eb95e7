"""Repository reload (broken models keep the old one), bearer token and TLS."""

from __future__ import annotations

import shutil
import socket
import subprocess

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from densemap.service.client import DensemapClient, RemoteError
from densemap.service.engine import Engine
from densemap.service.errors import InvalidOption
from densemap.service.server.app import create_server
from tests.support.dense_models import build_dense_model
from tests.support.server_fakes import wait_until
from tests.support.server_harness import (
    GREY,
    HOST,
    SERVING,
    TINY,
    channel,
    copy_repository,
    health_of,
    rgb_image,
    start_server,
    test_config,
)

Code = grpc.StatusCode


def test_reload_keeps_working_models_and_applies_good_changes(repo, tmp_path):
    root = copy_repository(repo, tmp_path / "models")
    srv, port = start_server(root)
    image = rgb_image(seed=31)
    try:
        with (
            DensemapClient(f"{HOST}:{port}", timeout=30) as client,
            channel(f"{HOST}:{port}") as chan,
        ):
            before = client.score(image, model=TINY).maps[0].scores
            (root / TINY / "model.onnx").write_bytes(b"not an onnx model")
            (root / "broken").mkdir()
            (root / "broken" / "model.onnx").write_bytes(b"\0" * 64)
            shutil.copytree(root / GREY, root / "third")
            srv.reload()
            np.testing.assert_array_equal(client.score(image, model=TINY).maps[0].scores, before)
            assert health_of(chan, TINY) == SERVING
            assert set(client.load_failures()) == {TINY, "broken"}
            with pytest.raises(RemoteError) as caught:
                client.score(image, model="broken")
            assert caught.value.code == Code.NOT_FOUND and "failed to load" in caught.value.details
            assert {m.name for m in client.list_models()} == {TINY, GREY, "third"}
            assert health_of(chan, "third") == SERVING

            shutil.rmtree(root / GREY)
            build_dense_model(root / TINY, channels=3, classes=5, seed=9)  # a good new version
            srv.reload()
            with pytest.raises(RemoteError) as caught:
                client.score(image[:, :, :1], model=GREY)
            assert caught.value.code == Code.NOT_FOUND
            assert health_of(chan, GREY) != SERVING
            after = client.score(image, model=TINY).maps[0].scores
            assert after.shape == before.shape and not np.array_equal(after, before)
            assert set(client.load_failures()) == {"broken"}
            loaded = srv.metrics.model_loaded
            assert (
                loaded.labels(GREY)._value.get() == 0 and loaded.labels("third")._value.get() == 1
            )
    finally:
        srv.stop()


def test_poll_seconds_picks_up_new_models(repo, tmp_path):
    root = copy_repository(repo, tmp_path / "models", names=(TINY,))
    srv, port = start_server(root, poll_seconds=0.1)
    try:
        shutil.copytree(repo / GREY, root / GREY)
        wait_until(lambda: GREY in srv.models.names(), what="the poller to load the new model")
    finally:
        srv.stop()


def test_bearer_token_is_enforced_except_for_health(repo):
    srv, port = start_server(repo, auth_token="s3cret")
    target = f"{HOST}:{port}"
    image = rgb_image(seed=32)
    try:
        for token, code in ((None, Code.UNAUTHENTICATED), ("wrong", Code.UNAUTHENTICATED)):
            with DensemapClient(target, token=token, timeout=10) as client:
                with pytest.raises(RemoteError) as caught:
                    client.list_models()
                assert caught.value.code == code and "token" in caught.value.details
                with pytest.raises(RemoteError) as caught:
                    list(client.score_stream([image], model=TINY))
                assert caught.value.code == code
                assert client.ready()  # health stays open
        with DensemapClient(target, token="s3cret", timeout=10) as client:
            assert client.score(image, model=TINY).maps
        with triton.InferenceServerClient(target) as tc:
            tensor = triton.InferInput("image", list(image.shape), "UINT8")
            tensor.set_data_from_numpy(image)
            with pytest.raises(InferenceServerException) as caught:
                tc.infer(TINY, [tensor])
            assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
            result = tc.infer(TINY, [tensor], headers={"authorization": "Bearer s3cret"})
            expected = Engine(repo / TINY / "model.onnx").score(image).maps[0].scores
            np.testing.assert_array_equal(result.as_numpy("scores"), expected)
    finally:
        srv.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(repo, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"]
        + ["-addext", f"subjectAltName=IP:{HOST}"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    srv, port = start_server(repo, tls_cert=cert, tls_key=key)
    try:
        roots = cert.read_bytes()
        with DensemapClient(f"{HOST}:{port}", root_certificates=roots, timeout=10) as client:
            assert client.score(rgb_image(), model=TINY).maps
        with DensemapClient(f"{HOST}:{port}", timeout=3) as plaintext:
            with pytest.raises(RemoteError) as caught:
                plaintext.list_models()
            assert caught.value.code == Code.UNAVAILABLE
    finally:
        srv.stop()


def test_missing_or_junk_tls_files_say_which_flag(repo, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases = {"--tls-cert": (tmp_path / "missing.pem", junk), "PEM certificate": (junk, junk)}
    for word, (cert, key) in cases.items():
        with pytest.raises(InvalidOption) as caught:
            create_server(test_config(repo, tls_cert=cert, tls_key=key))
        assert word in str(caught.value) and "Traceback" not in str(caught.value)


def test_metrics_port_in_use_is_a_clear_start_up_error(repo):
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        config = test_config(repo, metrics_port=taken.getsockname()[1])
        with pytest.raises(InvalidOption) as caught:
            create_server(config)
    assert "--metrics-port" in str(caught.value)
