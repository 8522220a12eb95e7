"""Issue 7 end to end: a torchvision-style ResNet .pth converts with the CLI and serves
dense maps through the engine, the densemap.v1 API and stock tritonclient, unchanged.

ResNet pads, so its cells are compared with the converted torch module on the same
preprocessed image (not with crops, which see zero padding at their borders).
"""

import numpy as np
import pytest
import torch

from densemap.convert import archs
from densemap.convert.from_torch.fc import fully_convolutional
from densemap.service.cli import main as densemap
from densemap.service.client import DensemapClient
from densemap.service.engine import Engine, ScoreOptions
from densemap.service.engine.image_input import preprocess
from densemap.service.server.app import create_server
from densemap.service.server.config import ServerConfig

pytestmark = pytest.mark.slow  # a ResNet converted through the CLI, then served

WINDOW = 64  # a small training size keeps the test fast; the geometry is the same as at 224
# fp32 onnxruntime vs fp32 torch through ~20 convs with BatchNorm folded by the exporter:
# differences are rounding only, relative to the size of the logits.
RTOL = 1e-4


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    root = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    model = archs.build("resnet18", num_classes=10)
    for module in model.modules():  # non-trivial BatchNorm statistics, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    model.eval()
    torch.save(model.state_dict(), root / "resnet18.pth")
    target = root / "repo" / "resnet18" / "model.onnx"
    target.parent.mkdir(parents=True)
    code = densemap(
        ["convert", "--arch", "resnet18", "--weights", str(root / "resnet18.pth")]
        + ["--num-classes", "10", "--input-size", str(WINDOW), "-o", str(target)]
        + ["--strides", "32,16"]
    )
    assert code == 0
    return model, target


def reference_map(model, engine: Engine, image: np.ndarray) -> np.ndarray:
    dense = fully_convolutional(model, input_size=WINDOW)
    image_chw = preprocess(image, engine.metadata.preprocessing)
    with torch.no_grad():
        logits = dense(torch.from_numpy(image_chw)[None]).numpy()[0]
    n_h, n_w = engine.metadata.geometry.cells(*image.shape[:2])
    return logits[:, :n_h, :n_w]


def test_resnet_pth_converts_and_the_engine_matches_the_torch_module(resnet):
    model, path = resnet
    engine = Engine(path)
    geometry = engine.metadata.geometry
    assert geometry.window == (WINDOW, WINDOW) and geometry.stride == (32, 32)
    assert geometry.padded and geometry.receptive_field[0] > WINDOW
    assert engine.supported_strides[:2] == (32, 16)
    image = np.random.default_rng(1).integers(0, 256, (WINDOW + 3 * 32 + 5, 150, 3), np.uint8)
    logits = engine.score(image, ScoreOptions(probabilities=False)).maps[0].scores
    expected = reference_map(model, engine, image)
    assert logits.shape == expected.shape == (10, 4, 3)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=RTOL * np.abs(expected).max())
    # à trous at S/2 equals the plain dense pass on its even cells (padded nets too: the
    # artificial border does not move; README, Exactness)
    fine = engine.score(image, ScoreOptions(output_stride=16, probabilities=False)).maps[0]
    assert fine.scores.shape[1:] == ((image.shape[0] - WINDOW) // 16 + 1, (150 - WINDOW) // 16 + 1)
    np.testing.assert_allclose(fine.scores[:, ::2, ::2], logits, rtol=0, atol=1e-5)


def test_resnet_serves_through_both_grpc_apis(resnet):
    tritonclient = pytest.importorskip("tritonclient.grpc")
    _model, path = resnet
    engine = Engine(path)
    image = np.random.default_rng(2).integers(0, 256, (130, 100, 3), np.uint8)
    expected = engine.score(image, ScoreOptions(output_stride=16))
    config = ServerConfig(models_dir=path.parent.parent, host="127.0.0.1", port=0, metrics_port=0)
    server, port = create_server(config)
    try:
        assert server.wait_ready(60), "the model did not load within 60 s"
        with DensemapClient(f"127.0.0.1:{port}") as client:
            assert client.ready("readiness")
            remote = client.score(image, model="resnet18", output_stride=16)
        np.testing.assert_array_equal(remote.maps[0].scores, expected.maps[0].scores)
        triton = tritonclient.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = tritonclient.InferInput("image", list(image.shape), "UINT8")
        tensor.set_data_from_numpy(image)
        reply = triton.infer("resnet18", [tensor], parameters={"output_stride": 16})
        np.testing.assert_array_equal(reply.as_numpy("scores"), expected.maps[0].scores)
    finally:
        server.stop(0)


def test_the_same_weights_through_onnx_and_preprocessing_imagenet_serve_the_same_maps(
    resnet, tmp_path, capsys
):
    # an ONNX export of these weights converted with a guessed x/255 served maps
    # 4.3 logits away from --arch resnet18's; now the preprocessing is said, not guessed
    from densemap.convert.export import export_classifier_onnx

    model, arch_path = resnet
    exported = tmp_path / "resnet18.onnx"
    proto = export_classifier_onnx(model, input_size=(WINDOW, WINDOW), in_channels=3, dynamo=False)
    exported.write_bytes(proto.SerializeToString())
    dense = tmp_path / "repo" / "resnet18" / "model.onnx"
    assert densemap(["convert", str(exported), "-o", str(dense)]) == 2
    assert "--preprocessing imagenet" in capsys.readouterr().err
    assert (
        densemap(["convert", str(exported), "-o", str(dense), "--preprocessing", "imagenet"]) == 0
    )
    from_arch, from_onnx = Engine(arch_path), Engine(dense)
    assert from_onnx.metadata.preprocessing == from_arch.metadata.preprocessing
    image = np.random.default_rng(2).integers(0, 256, (WINDOW + 2 * 32 + 7, 130, 3), np.uint8)
    options = ScoreOptions(probabilities=False)
    expected = from_arch.score(image, options).maps[0].scores
    logits = from_onnx.score(image, options).maps[0].scores
    assert logits.shape == expected.shape
    np.testing.assert_allclose(logits, expected, rtol=0, atol=RTOL * np.abs(expected).max())
