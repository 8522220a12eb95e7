"""Precision choice everywhere a user meets it: densemap.v1, KServe, the score CLI, the
repository's per-model settings; and the device-sized memory budget."""

from __future__ import annotations

import json
import shutil

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from densemap.service._proto.densemap.v1 import densemap_pb2 as pb
from densemap.service.batch.outputs import load_result
from densemap.service.cli import main
from densemap.service.client import DensemapClient
from densemap.service.engine import (
    Engine,
    EngineConfig,
    ModelRepository,
    ScoreOptions,
    device_memory,
)
from densemap.service.engine.options import DEFAULT_MEMORY_BUDGET
from densemap.service.errors import InvalidOption
from densemap.service.server.codec import image_to_proto
from tests.support.server_harness import HOST, TINY, rgb_image, start_server

FP16 = ScoreOptions(precision="fp16")


REPORTING = EngineConfig(report_precisions=("fp16",))  # on CPU the default reports none


@pytest.fixture(scope="module")
def client(repo):
    srv, port = start_server(repo, engine=REPORTING)
    with DensemapClient(f"{HOST}:{port}", timeout=30) as densemap_client:
        yield densemap_client
    srv.stop()


def test_densemap_v1_precision_option_and_model_report(client, engines, repo):
    image = rgb_image()
    remote = client.score(image, model=TINY, precision="fp16", top_k=2)
    local = engines[TINY].score(image, ScoreOptions(precision="fp16", top_k=2))
    np.testing.assert_array_equal(remote.maps[0].scores, local.maps[0].scores)
    np.testing.assert_array_equal(remote.maps[0].top_k_indices, local.maps[0].top_k_indices)
    exact = engines[TINY].score(image).maps[0].scores
    assert not np.array_equal(local.maps[0].scores, exact)  # fp16 really ran
    model = client.get_model(TINY)
    assert model.default_precision == "fp32"
    assert model.precisions == ("fp32", "tf32", "fp16")
    (report,) = model.precision_report
    reference = Engine(repo / TINY / "model.onnx", name=TINY, config=REPORTING)
    assert report == reference.precision_report[0]
    assert report.precision == "fp16" and 0.0 < report.max_probability_deviation < 1e-2
    assert report.argmax_agreement == 1.0 and report.cells > 1


def test_densemap_v1_refuses_unknown_and_unavailable_precisions(client):
    for precision, words in (("bf16", "bfloat16 convolution"), ("fp8", "must be one of")):
        with pytest.raises(InvalidOption, match=words):  # the client's ScoreOptions
            client.score(rgb_image(), model=TINY, precision=precision)
        request = pb.ScoreRequest(model=TINY)  # a client that sends it anyway
        image_to_proto(rgb_image(), request.image)
        request.options.precision = precision
        with pytest.raises(grpc.RpcError) as caught:
            client._stub.Score(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in caught.value.details()


def test_kserve_precision_parameter(server, engines):
    _, target = server
    image = rgb_image(seed=3)
    tensor = triton.InferInput("image", list(image.shape), "UINT8")
    tensor.set_data_from_numpy(image)
    with triton.InferenceServerClient(target) as kserve:
        result = kserve.infer(TINY, [tensor], parameters={"precision": "fp16"})
        expected = engines[TINY].score(image, FP16)
        np.testing.assert_array_equal(result.as_numpy("scores"), expected.maps[0].scores)
        with pytest.raises(InferenceServerException) as caught:
            kserve.infer(TINY, [tensor], parameters={"precision": "fp8"})
    assert "INVALID_ARGUMENT" in str(caught.value.status())
    assert "precision must be one of" in caught.value.message()


def test_score_cli_precision_flag(repo, engines, tmp_path, capsys):
    image = rgb_image(seed=4)
    Image.fromarray(image).save(tmp_path / "a.png")
    out = tmp_path / "out"
    argv = ["score", str(tmp_path / "a.png"), "--out", str(out), "--models", str(repo)]
    assert main([*argv, "--model", TINY, "--precision", "fp16", "--map-dtype", "fp32"]) == 0
    result, _ = load_result(out / "a.png.npz")  # fp32 storage: the engine's values exactly
    expected = engines[TINY].score(image, FP16)
    np.testing.assert_array_equal(result.maps[0].scores, expected.maps[0].scores)
    with pytest.raises(SystemExit) as usage:  # not a choice: a usage error, exit 2
        main([*argv, "--model", TINY, "--precision", "bf16"])
    assert usage.value.code == 2
    assert "invalid choice: 'bf16'" in capsys.readouterr().err


def test_model_settings_file_sets_precision_and_warmup(repo, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(repo / TINY, root / TINY)
    settings = {"precision": "fp16", "warmup_shapes": [[30, 40]], "report_precisions": []}
    (root / TINY / "densemap.json").write_text(json.dumps(settings))
    shutil.copytree(repo / TINY, root / "typo")
    (root / "typo" / "densemap.json").write_text(json.dumps({"precison": "fp16"}))
    shutil.copytree(repo / TINY, root / "badshape")
    (root / "badshape" / "densemap.json").write_text(json.dumps({"warmup_shapes": [[0, 9]]}))
    repository = ModelRepository(root, config=EngineConfig())
    engine = repository.get(TINY)
    assert engine.default_precision == "fp16" and engine.precision_report == ()
    assert engine.config.warmup_shapes == ((30, 40),)
    image = rgb_image(seed=5)
    np.testing.assert_array_equal(
        engine.score(image).maps[0].scores, engine.score(image, FP16).maps[0].scores
    )
    assert "unknown key(s) ['precison']" in repository.errors["typo"]
    assert "EngineConfig.warmup_shapes must be >= 1" in repository.errors["badshape"]


def test_memory_budget_follows_the_device(monkeypatch):
    resolve = device_memory.resolve_memory_budget
    assert resolve(EngineConfig(), on_cuda=False) == DEFAULT_MEMORY_BUDGET
    assert resolve(EngineConfig(memory_budget=12345), on_cuda=True) == 12345
    monkeypatch.setattr(device_memory, "cuda_free_bytes", lambda device_id=0: 80 << 30)
    assert resolve(EngineConfig(), on_cuda=True) == 40 << 30  # half the free memory
    monkeypatch.setattr(device_memory, "cuda_free_bytes", lambda device_id=0: None)
    assert resolve(EngineConfig(), on_cuda=True) == DEFAULT_MEMORY_BUDGET
