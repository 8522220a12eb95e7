"""What a client sees: no absolute server path in any status message or
in ``ListModels.failures``; the bearer scheme is case-insensitive (RFC 6750), the token is
not; ``/metrics`` (plain HTTP, no token) listens on 127.0.0.1 unless ``--metrics-host`` says
otherwise."""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request

import grpc
import pytest
import tritonclient.grpc.service_pb2 as kserve_pb
import tritonclient.grpc.service_pb2_grpc as kserve_grpc

from densemap.service._proto.densemap.v1 import densemap_pb2 as pb
from densemap.service._proto.densemap.v1 import densemap_pb2_grpc as pb_grpc
from densemap.service.client import DensemapClient, RemoteError
from densemap.service.errors import InvalidOption
from densemap.service.server.app import create_server
from densemap.service.server.auth import bearer_token
from densemap.service.server.client_paths import client_text
from tests.support.server_harness import (
    HOST,
    TINY,
    array_request,
    channel,
    copy_repository,
    free_port,
    rgb_image,
    start_server,
    test_config,
)

Code = grpc.StatusCode
TOKEN = "s3cret-Token"


# -- no server path in what a client reads ----------------------------------------------------
@pytest.fixture(scope="module")
def broken_server(repo, tmp_path_factory):
    """A server on TINY plus "broken" (junk model.onnx) and "unlabelled" (labels.txt that is
    not UTF-8): (server, channel, repository root)."""
    root = copy_repository(repo, tmp_path_factory.mktemp("secret-place") / "models", (TINY,))
    (root / "broken").mkdir()
    (root / "broken" / "model.onnx").write_bytes(b"\0" * 64)
    copy_repository(repo, root / "copy", (TINY,))
    (root / "copy" / TINY).rename(root / "unlabelled")
    (root / "copy").rmdir()
    (root / "unlabelled" / "labels.txt").write_bytes(b"\xff\xfe not utf-8")
    srv, port = start_server(root)
    with channel(f"{HOST}:{port}") as chan:
        yield srv, chan, root
    srv.stop()


def assert_no_server_path(text: str, root) -> None:
    for spelling in (str(root), str(root.resolve()), str(root.parent)):
        assert spelling not in text, text
    assert "secret-place" not in text, text


def test_list_models_failures_name_repository_relative_paths(broken_server):
    srv, chan, root = broken_server
    failures = pb_grpc.DensemapStub(chan).ListModels(pb.ListModelsRequest(), timeout=10).failures
    messages = {failure.name: failure.message for failure in failures}
    assert set(messages) == {"broken", "unlabelled"}
    assert "broken/model.onnx is not a readable ONNX model" in messages["broken"]
    assert "unlabelled/labels.txt" in messages["unlabelled"]
    for message in messages.values():
        assert_no_server_path(message, root)
    # the server log keeps the absolute path for its operator
    assert str(root) in srv.models.repository.errors["broken"]


def test_not_found_messages_carry_no_server_path(broken_server):
    srv, chan, root = broken_server
    stub, kserve = pb_grpc.DensemapStub(chan), kserve_grpc.GRPCInferenceServiceStub(chan)
    image = rgb_image()
    tensor = kserve_pb.ModelInferRequest.InferInputTensor(
        name="image", datatype="UINT8", shape=list(image.shape)
    )
    calls = {
        "Score": lambda name: stub.Score(array_request(image, model=name), timeout=10),
        "GetModel": lambda name: stub.GetModel(pb.GetModelRequest(name=name), timeout=10),
        "ModelMetadata": lambda name: kserve.ModelMetadata(
            kserve_pb.ModelMetadataRequest(name=name), timeout=10
        ),
        "ModelInfer": lambda name: kserve.ModelInfer(
            kserve_pb.ModelInferRequest(
                model_name=name, inputs=[tensor], raw_input_contents=[image.tobytes()]
            ),
            timeout=10,
        ),
    }
    for what, call in calls.items():
        for name, relative in (("broken", "broken/model.onnx"), ("unlabelled", "labels.txt")):
            with pytest.raises(grpc.RpcError) as caught:
                call(name)
            assert caught.value.code() == Code.NOT_FOUND, what
            details = caught.value.details()
            assert "failed to load" in details and relative in details, (what, details)
            assert_no_server_path(details, root)
    # a ScoreStream item's error, in its response
    (response,) = stub.ScoreStream(iter([array_request(image, model="broken")]), timeout=10)
    assert response.error.code_name == "NOT_FOUND" and "broken/model.onnx" in response.error.message
    assert_no_server_path(response.error.message, root)


def test_client_text_keeps_relative_paths_and_drops_absolute_ones(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (root / "linked").symlink_to(tmp_path / "elsewhere")
    cases = {
        f"{root}/a/model.onnx is not a readable ONNX model": "a/model.onnx is not a readable",
        f"model 'x' is not in the repository {root}; available: a": "repository <models>;",
        f"cannot read labels file '{root}/a/labels.txt': bad": "file 'a/labels.txt': bad",
        f"cannot read {tmp_path}/elsewhere/model.onnx: gone": "cannot read .../model.onnx: gone",
        f"{root}2/b.onnx": ".../b.onnx",
        "missing /usr/lib/x86_64-linux-gnu/libcuda.so.1": "missing .../libcuda.so.1",
    }
    for message, expected in cases.items():
        assert expected in client_text(message, root), (message, client_text(message, root))
        assert str(tmp_path) not in client_text(message, root)
    resolved = str((root / "linked").resolve())
    assert client_text(f"{resolved}/m.onnx", root).endswith("/m.onnx")
    assert str(tmp_path) not in client_text(f"{resolved}/m.onnx", root)
    for kept in ("see https://example.com/a/b", "output_stride 4/8", "tiny/model.onnx", "-"):
        assert client_text(kept, root) == kept
    relative = client_text("models/a/model.onnx", "models")  # a relative root leaks nothing
    assert relative == "models/a/model.onnx"


# -- the bearer scheme ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def token_server(repo):
    srv, port = start_server(repo, auth_token=TOKEN)
    with channel(f"{HOST}:{port}") as chan:
        yield pb_grpc.DensemapStub(chan)
    srv.stop()


@pytest.mark.parametrize(
    "value",
    [
        f"Bearer {TOKEN}",
        f"bearer {TOKEN}",
        f"BEARER {TOKEN}",
        f"bEaReR {TOKEN}",
        f"Bearer  {TOKEN}",
    ],
)
def test_the_bearer_scheme_is_case_insensitive(token_server, value):
    response = token_server.ListModels(
        pb.ListModelsRequest(), metadata=[("authorization", value)], timeout=10
    )
    assert TINY in {model.name for model in response.models}


@pytest.mark.parametrize(
    "value, words",
    [
        (f"Bearer {TOKEN.lower()}", "token is wrong"),  # the token stays case-sensitive
        (f"Bearer {TOKEN.upper()}", "token is wrong"),
        (f"Bearer{TOKEN}", "not a bearer token"),
        (f"Basic {TOKEN}", "not a bearer token"),
        (TOKEN, "not a bearer token"),
        ("Bearer", "token is wrong"),
        ("", "not a bearer token"),
    ],
)
def test_a_wrong_token_or_scheme_is_unauthenticated(token_server, value, words):
    with pytest.raises(grpc.RpcError) as caught:
        token_server.ListModels(
            pb.ListModelsRequest(), metadata=[("authorization", value)], timeout=10
        )
    assert caught.value.code() == Code.UNAUTHENTICATED
    assert words in caught.value.details()


def test_bearer_token_parses_the_scheme_case_insensitively():
    assert bearer_token("bearer abc") == b"abc" and bearer_token(b"BEARER  abc") == b"abc"
    assert bearer_token("Bearer AbC") == b"AbC"
    assert bearer_token("Bearerabc") is None and bearer_token("Token abc") is None


def test_the_python_client_still_authenticates(repo):
    srv, port = start_server(repo, auth_token=TOKEN)
    try:
        with DensemapClient(f"{HOST}:{port}", token=TOKEN, timeout=10) as client:
            assert client.list_models()
        with DensemapClient(f"{HOST}:{port}", token=TOKEN.lower(), timeout=10) as client:
            with pytest.raises(RemoteError) as caught:
                client.list_models()
            assert caught.value.code == Code.UNAUTHENTICATED
    finally:
        srv.stop()


# -- /metrics stays on this host unless told ------------------------------------------------------
def metrics_text(host: str, port: int) -> str:
    return urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()


def refused(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(5)
        return sock.connect_ex((host, port)) != 0


OTHER_LOOPBACK = "127.0.0.2"  # another address of this host: 127.0.0.1 alone must not answer
needs_linux = pytest.mark.skipif(
    sys.platform != "linux", reason="127.0.0.2 is an address of this host on Linux only"
)


@needs_linux
def test_metrics_listen_on_127_0_0_1_by_default_even_with_grpc_on_every_address(repo):
    srv, port = start_server(repo, host="0.0.0.0", metrics_port=free_port())
    try:
        assert srv.config.metrics_host == "127.0.0.1"
        assert "densemap_model_loaded" in metrics_text("127.0.0.1", srv.metrics_port)
        assert refused(OTHER_LOOPBACK, srv.metrics_port)  # the metrics port: this host only
        assert not refused(OTHER_LOOPBACK, port)  # gRPC: every address, as asked
    finally:
        srv.stop()


@needs_linux
def test_metrics_host_exposes_the_endpoint_where_asked(repo):
    srv, _port = start_server(repo, metrics_host="0.0.0.0", metrics_port=free_port())
    try:
        assert "densemap_model_loaded" in metrics_text(OTHER_LOOPBACK, srv.metrics_port)
    finally:
        srv.stop()


def test_a_bad_metrics_host_is_a_clear_start_up_error(repo):
    config = test_config(repo, metrics_host="no-such-host.invalid", metrics_port=free_port())
    with pytest.raises(InvalidOption) as caught:
        create_server(config)
    assert "--metrics-host" in str(caught.value)
    with pytest.raises(InvalidOption):
        test_config(repo, metrics_host=" ")
    with pytest.raises(urllib.error.URLError):
        metrics_text("127.0.0.1", config.metrics_port)  # nothing was left listening
