"""The torch runtime (EngineConfig.runtime="torch") gives onnxruntime's CPU maps.

Tolerance: both runtimes compute in float32 and differ only in the order of additions
(convolution algorithms), so maps agree to float32 rounding: max |difference| <= 1e-5 of
the reference map's logit range (measured: ~3e-7 on the digits model), probabilities to
1e-5 (measured 1.1e-6); argmax indices equal wherever the reference's top two classes
differ by more than 1e-3 of the range. fp16 (a .half() copy) is held to 1e-2 of the range.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import densemap.convert as convert
from densemap.convert.torch_runtime.session import TORCH_CPU, open_torch_net
from densemap.service.engine import Engine, EngineConfig, ScoreOptions
from densemap.service.engine.dense import DenseNet
from densemap.service.errors import InvalidOption, ModelLoadError
from tests.support.dense_models import build_dense_model, mini_vgg_layers
from tests.support.paths import REPO_ROOT

DIGITS = REPO_ROOT / "models" / "digits" / "model.onnx"
RELATIVE = 1e-5


def engines(path, **config):
    ort_engine = Engine(path, config=EngineConfig(warmup=False, **config))
    torch_engine = Engine(path, config=EngineConfig(warmup=False, runtime="torch", **config))
    assert torch_engine.providers[0] == TORCH_CPU
    return ort_engine, torch_engine


def assert_same_maps(reference, other):
    assert other.shape == reference.shape
    spread = float(reference.max() - reference.min()) or 1.0
    assert np.abs(other.astype(np.float64) - reference).max() <= RELATIVE * spread


def assert_same_scores(ort_engine, torch_engine, image, strides):
    for stride in strides:
        logits = ScoreOptions(output_stride=stride, probabilities=False)
        reference = ort_engine.score(image, logits).maps[0].scores
        assert_same_maps(reference, torch_engine.score(image, logits).maps[0].scores)
        asked = ScoreOptions(output_stride=stride, top_k=3, argmax=True)
        want, got = ort_engine.score(image, asked), torch_engine.score(image, asked)
        assert np.abs(want.maps[0].scores - got.maps[0].scores).max() <= 1e-5
        top2 = np.sort(reference, axis=0)[-2:]
        clear = top2[1] - top2[0] > 1e-3 * (reference.max() - reference.min())
        assert np.array_equal(want.maps[0].argmax[clear], got.maps[0].argmax[clear])
        assert np.allclose(want.image_scores, got.image_scores, atol=1e-6)


@pytest.mark.slow
def test_digits_model_native_atrous_and_stitched():
    ort_engine, torch_engine = engines(DIGITS)
    image = np.random.default_rng(0).integers(0, 256, (120, 150), dtype=np.uint8)
    assert_same_scores(ort_engine, torch_engine, image, (None, 2, 1))


@pytest.mark.slow
def test_digits_model_tiled():
    ort_engine, torch_engine = engines(DIGITS, memory_budget=2_000_000)
    image = np.random.default_rng(1).integers(0, 256, (300, 260), dtype=np.uint8)
    assert_same_scores(ort_engine, torch_engine, image, (None, 2))


def mini_vgg_classifier() -> nn.Module:
    """A VGG-style classifier for 32x32 windows: conv blocks, a ceil-mode pool, an average
    pool, then Flatten and Linear layers (FC6/FC7/FC8 in small)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 7),
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def converted_vgg(tmp_path_factory):
    out = tmp_path_factory.mktemp("vgg") / "model.onnx"
    return convert.convert_torch(
        mini_vgg_classifier(), out, input_size=(32, 32), strides=[4, 2], preprocessing="unit"
    ).path


@pytest.mark.slow
def test_converted_mini_vgg_every_stride_and_tiles(converted_vgg):
    image = np.random.default_rng(2).integers(0, 256, (97, 130, 3), dtype=np.uint8)
    ort_engine, torch_engine = engines(converted_vgg)
    assert_same_scores(ort_engine, torch_engine, image, (None, 4, 2, 1))
    ort_tiled, torch_tiled = engines(converted_vgg, memory_budget=600_000)
    regions = []
    original = DenseNet.run_pass

    def counting(net, source, region, *args, **kwargs):
        regions.append(region)
        return original(net, source, region, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DenseNet, "run_pass", counting)
        tiled = torch_tiled.score(image, ScoreOptions(probabilities=False)).maps[0].scores
    assert len(regions) > 1  # really tiled
    whole = ort_engine.score(image, ScoreOptions(probabilities=False)).maps[0].scores
    assert_same_maps(whole, tiled)


@pytest.mark.slow
def test_dense_test_model_with_atrous_variants_and_unfolded_head(tmp_path):
    path = build_dense_model(
        tmp_path, layers=mini_vgg_layers(padded=True), window=(64, 64), channels=3,
        classes=10, with_atrous=(4, 2), padded=True,
    )  # fmt: skip
    image = np.random.default_rng(3).integers(0, 256, (90, 111, 3), dtype=np.uint8)
    ort_engine, _ = engines(path)
    unfolded = Engine(
        path,
        config=EngineConfig(
            warmup=False,
            runtime="torch",
            fc_head_unfold="always",
            fc_head_unfold_min_weights=20_000,
        ),
    )
    assert_same_scores(ort_engine, unfolded, image, (None, 4, 2, 1))


@pytest.mark.slow
def test_channels_last_and_fp16(converted_vgg):
    config = EngineConfig(warmup=False, runtime="torch")
    plain, precisions = open_torch_net(converted_vgg, config)
    nhwc, _ = open_torch_net(converted_vgg, config, channels_last=True)
    batch = np.random.default_rng(4).standard_normal((1, 3, 70, 90)).astype(np.float32)
    name = plain.get_inputs()[0].name
    (reference,) = plain.run(None, {name: batch})
    (laid,) = nhwc.run(None, {name: batch})
    assert_same_maps(reference, laid)
    half, dtype = precisions.session_for("fp16", plain)
    assert dtype == "float16"
    (approximate,) = half.run(None, {name: batch})
    spread = reference.max() - reference.min()
    assert np.abs(approximate - reference).max() <= 1e-2 * spread  # float16: 10-bit mantissa
    ort_engine, torch_engine = engines(converted_vgg)
    image = np.random.default_rng(5).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    fp16 = ScoreOptions(probabilities=False, precision="fp16")
    exact = ort_engine.score(image, ScoreOptions(probabilities=False)).maps[0].scores
    served = torch_engine.score(image, fp16).maps[0].scores
    assert np.abs(served - exact).max() <= 1e-2 * (exact.max() - exact.min())


OPSET = 19
OP_CASES = {
    "maxpool-ceil-uneven-pads": ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 2], ceil_mode=1)),
    "maxpool-dilated": ("MaxPool", dict(kernel_shape=[3, 3], dilations=[2, 2], pads=[2, 2, 2, 2])),
    "maxpool-ceil": ("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)),
    "avgpool-excluding-pads": ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 0, 2], ceil_mode=1)),
    "avgpool-including-pads": ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 0, 2], ceil_mode=1, count_include_pad=1)),
    "avgpool-dilated": ("AveragePool", dict(kernel_shape=[2, 3], dilations=[2, 2])),
    "lrn-odd": ("LRN", dict(size=5, alpha=1e-2, beta=0.75, bias=2.0)),
    "global-average": ("GlobalAveragePool", {}),
    "softmax": ("Softmax", dict(axis=1)),
    "transpose": ("Transpose", dict(perm=[0, 2, 3, 1])),
    "leaky-relu": ("LeakyRelu", dict(alpha=0.1)),
    "hard-sigmoid": ("HardSigmoid", {}),
}  # fmt: skip


def run_both(nodes, inits=(), output_type=TensorProto.FLOAT):
    graph = helper.make_graph(
        nodes, "ops",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 17, 23])],
        [helper.make_tensor_value_info("y", output_type, ["n", "c", "h", "w"])],
        list(inits),
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)
    onnx.checker.check_model(model)
    x = np.random.default_rng(6).standard_normal((1, 6, 17, 23)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (want,) = session.run(["y"], {"x": x})
    from densemap.convert.torch_runtime.session import TorchGraph, TorchSession

    graph = TorchGraph(model, device=torch.device("cpu"), float_dtype=torch.float32,
                       channels_last=False)  # fmt: skip
    (got,) = TorchSession(graph, model, device=torch.device("cpu"), dtype="float32").run(
        ["y"], {"x": x}
    )
    return want, got


@pytest.mark.parametrize("case", OP_CASES, ids=list(OP_CASES))
def test_op_matches_onnxruntime(case):
    op, attrs = OP_CASES[case]
    want, got = run_both([helper.make_node(op, ["x"], ["y"], **attrs)])
    assert_same_maps(want, got)


def test_normalisations_pads_and_crop_subgraph_match_onnxruntime():
    rng = np.random.default_rng(7)
    consts = {
        "w": rng.standard_normal((8, 3, 3, 2)).astype(np.float32),
        "scale": rng.random(8).astype(np.float32) + 0.5,
        "shift": rng.standard_normal(8).astype(np.float32),
        "mean": rng.standard_normal(8).astype(np.float32),
        "var": rng.random(8).astype(np.float32) + 0.1,
        "pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64),
        "low": np.array(-0.5, np.float32), "high": np.array(1.5, np.float32),
        "two": np.array([2], np.int64), "zero": np.array([0], np.int64),
        "minus": np.array([3], np.int64), "axes": np.array([2, 3], np.int64),
    }  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], group=2, pads=[1, 0, 2, 1], strides=[1, 2]),
        helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["b"]),
        helper.make_node("Clip", ["b", "low", "high"], ["k"]),
        helper.make_node("Pad", ["k", "pads"], ["p"], mode="reflect"),
        helper.make_node("Shape", ["p"], ["shape"]),
        helper.make_node("Gather", ["shape", "two"], ["height"], axis=0),
        helper.make_node("Sub", ["height", "minus"], ["end"]),
        helper.make_node("Concat", ["end", "end"], ["ends"], axis=0),
        helper.make_node("Concat", ["zero", "zero"], ["starts"], axis=0),
        helper.make_node("Slice", ["p", "starts", "ends", "axes"], ["cropped"]),
        helper.make_node("LayerNormalization", ["cropped", "scale_w"], ["y"], axis=-1),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    # LayerNormalization over the last axis (width): its scale has that axis' size
    want, _ = run_both(nodes[:-1] + [helper.make_node("Identity", ["cropped"], ["y"])], inits)
    width = want.shape[-1]
    inits.append(numpy_helper.from_array(rng.random(width).astype(np.float32), "scale_w"))
    want, got = run_both(nodes, inits)
    assert_same_maps(want, got)


def test_unsupported_op_is_refused_by_name(tmp_path):
    path = build_dense_model(tmp_path)
    model = onnx.load(str(path))
    last = model.graph.node[-1]
    renamed = last.output[0] + "_raw"
    last.output[0] = renamed
    model.graph.node.append(helper.make_node("Hardmax", [renamed], [model.graph.output[0].name]))
    onnx.save(model, str(path))
    with pytest.raises(ModelLoadError, match="no Hardmax.*--runtime ort"):
        Engine(path, config=EngineConfig(warmup=False, runtime="torch"))
    with pytest.raises(InvalidOption, match="EngineConfig.runtime must be one of"):
        Engine(path, config=EngineConfig(warmup=False, runtime="tensorflow"))


def test_without_torch_the_error_says_what_to_install():
    script = f"""
import sys
class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, BlockTorch())
from densemap.service.engine import Engine, EngineConfig
from densemap.service.errors import ModelLoadError
try:
    Engine({str(DIGITS)!r}, config=EngineConfig(warmup=False, runtime="torch"))
except ModelLoadError as exc:
    print(exc)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'densemap[torch]'" in done.stdout


def test_densemap_json_chooses_the_runtime_per_model(tmp_path):
    import json
    import shutil

    from densemap.service.engine.repository import ModelRepository

    for name, runtime in (("digits_torch", "torch"), ("digits_ort", None), ("bad", "tvm")):
        folder = tmp_path / name
        shutil.copytree(DIGITS.parent, folder, ignore=shutil.ignore_patterns("*.py", "pages"))
        settings = json.loads((folder / "densemap.json").read_text())
        if runtime is not None:
            settings["runtime"] = runtime
        (folder / "densemap.json").write_text(json.dumps(settings))
    repository = ModelRepository(tmp_path, config=EngineConfig(warmup=False))
    assert repository.get("digits_torch").providers[0] == TORCH_CPU
    assert repository.get("digits_ort").providers[0] == "CPUExecutionProvider"
    assert "runtime must be one of ('ort', 'torch'), got 'tvm'" in repository.errors["bad"]


def test_int8_is_refused_on_the_torch_runtime_not_run_as_fp32():
    from densemap.convert.torch_runtime.session import TorchPrecisions
    from densemap.service.errors import InvalidOption

    precisions = TorchPrecisions(None, torch.device("cpu"), False)
    with pytest.raises(InvalidOption, match="not available with --runtime torch"):
        precisions.session_for("int8", fp32=None)
