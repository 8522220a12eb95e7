"""Huge-kernel convs as unfold + MatMul (service/engine/fc_head_unfold.py): the same maps.

float64 (densemap.convert.runtime.Float64Runner): the rewritten graph equals the conv to 1e-12 of
its range (the same products, summed in another order). float32 (onnxruntime CPU): within
1e-5 of the range, the size of the conv's own float32 rounding (both are compared with the
float64 truth, and the rewrite may not be more than 2x further from it than the conv).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from densemap.convert.runtime import Float64Runner, OrtRunner
from densemap.service.engine import Engine, EngineConfig, ScoreOptions
from densemap.service.engine.dense import DenseNet
from densemap.service.engine.fc_head_unfold import model_source, unfold_huge_convs
from tests.support.dense_models import build_dense_model, mini_vgg_layers

CONV_CASES = {
    "plain": dict(kernel=(7, 7)),
    "padded": dict(kernel=(3, 5), pads=[1, 2, 0, 3]),
    "strided": dict(kernel=(4, 3), strides=[2, 3]),
    "dilated": dict(kernel=(3, 3), dilations=[2, 4], pads=[2, 4, 2, 4]),
    "no-bias": dict(kernel=(5, 2), bias=False),
}


def conv_model(*, kernel, pads=None, strides=None, dilations=None, bias=True, channels=6):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((9, channels, *kernel)).astype(np.float32)
    attrs = {"kernel_shape": list(kernel)}
    for name, value in (("pads", pads), ("strides", strides), ("dilations", dilations)):
        if value is not None:
            attrs[name] = value
    inits = [numpy_helper.from_array(weight, "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(9).astype(np.float32), "b"))
        inputs.append("b")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", inputs, ["conv"], **attrs),
            helper.make_node("Relu", ["conv"], ["y"]),
        ],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 9, "oh", "ow"])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("case", CONV_CASES, ids=list(CONV_CASES))
def test_unfolded_conv_gives_the_same_map(case):
    model = conv_model(**CONV_CASES[case])
    unfolded = onnx.ModelProto()
    unfolded.CopyFrom(model)
    assert unfold_huge_convs(unfolded, min_weights=1) == 1
    onnx.checker.check_model(unfolded)
    assert "Conv" not in {n.op_type for n in unfolded.graph.node}
    assert "MatMul" in {n.op_type for n in unfolded.graph.node}
    image = np.random.default_rng(1).standard_normal((1, 6, 23, 31))
    truth = Float64Runner(model)(image)
    spread = float(truth.max() - truth.min())
    rewritten64 = Float64Runner(unfolded)(image)
    assert rewritten64.shape == truth.shape
    assert np.abs(rewritten64 - truth).max() <= 1e-12 * spread
    conv32 = OrtRunner(model.SerializeToString())(image)
    rewritten32 = OrtRunner(unfolded.SerializeToString())(image)
    assert rewritten32.shape == truth.shape
    conv_error = np.abs(conv32 - truth).max()
    assert np.abs(rewritten32 - conv32).max() <= 1e-5 * spread
    assert np.abs(rewritten32 - truth).max() <= max(2 * conv_error, 1e-6 * spread)


def test_small_grouped_and_pointwise_convs_stay_convs():
    small = conv_model(kernel=(3, 3))
    assert unfold_huge_convs(small, min_weights=10_000) == 0  # 9*6*3*3 = 486 weights
    pointwise = conv_model(kernel=(1, 1))
    assert unfold_huge_convs(pointwise, min_weights=1) == 0
    grouped = conv_model(kernel=(3, 3))
    grouped.graph.node[0].attribute.append(helper.make_attribute("group", 3))
    grouped.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(np.ones((9, 2, 3, 3), np.float32), "w")
    )
    assert unfold_huge_convs(grouped, min_weights=1) == 0


@pytest.fixture(scope="module")
def vgg_model(tmp_path_factory):
    """Mini-VGG (window 64: a 5x5 head conv over 64 channels, 32,000 weights; the widest trunk conv has 18,432), with an
    à-trous variant at stride 2 (a dilated head)."""
    root = tmp_path_factory.mktemp("unfold")
    return build_dense_model(
        root, layers=mini_vgg_layers(), window=(64, 64), channels=3, classes=20,
        with_atrous=(2,),
    )  # fmt: skip


def test_session_source_unfolds_only_when_asked(vgg_model):
    def source(mode, cuda, minimum=20_000):
        return model_source(vgg_model, mode=mode, min_weights=minimum, cuda=cuda)

    assert source("cuda", cuda=False) == str(vgg_model)  # CPU default: the file as it is
    assert source("never", cuda=True) == str(vgg_model)
    assert source("always", cuda=False, minimum=10**9) == str(vgg_model)  # none that big
    for mode, cuda in (("cuda", True), ("always", False)):
        model = onnx.load_from_string(source(mode, cuda))
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("Conv") == 5 and "MatMul" in ops  # the trunk's convs stay


@pytest.mark.slow
def test_engine_with_unfolded_head_gives_the_same_maps(vgg_model, monkeypatch):
    plain = Engine(vgg_model, config=EngineConfig(warmup=False))
    unfolded = Engine(
        vgg_model,
        config=EngineConfig(
            warmup=False, fc_head_unfold="always", fc_head_unfold_min_weights=20_000
        ),
    )
    image = np.random.default_rng(2).integers(0, 256, (150, 170, 3), dtype=np.uint8)
    tiled = Engine(
        vgg_model,
        config=EngineConfig(
            warmup=False, fc_head_unfold="always", fc_head_unfold_min_weights=20_000,
            memory_budget=3_000_000,
        ),
    )  # fmt: skip
    for stride in (None, 4, 2):  # native, shift-and-stitch over the variant, the variant
        options = ScoreOptions(output_stride=stride, probabilities=False)
        reference = plain.score(image, options).maps[0].scores
        spread = float(reference.max() - reference.min())
        for engine in (unfolded, tiled):
            scores = engine.score(image, options).maps[0].scores
            assert scores.shape == reference.shape
            assert np.abs(scores - reference).max() <= 1e-5 * spread
    regions = []
    original = DenseNet.run_pass

    def counting(net, source, region, *args, **kwargs):
        regions.append(region)
        return original(net, source, region, *args, **kwargs)

    monkeypatch.setattr(DenseNet, "run_pass", counting)
    tiled.score(image, ScoreOptions())
    assert len(regions) > 1  # really tiled


def test_bad_head_unfold_setting_is_a_clear_error(vgg_model):
    from densemap.service.errors import InvalidOption

    with pytest.raises(InvalidOption, match="EngineConfig.fc_head_unfold must be one of"):
        Engine(vgg_model, config=EngineConfig(warmup=False, fc_head_unfold="gpu"))


def test_float16_copy_is_unfolded_too(vgg_model):
    """The fp16 copy of a CUDA session is made from the unfolded graph (precision.py)."""
    from densemap.service.engine.precision import to_float16

    half = onnx.load_from_string(to_float16(vgg_model, unfold_min_weights=20_000))
    ops = [n.op_type for n in half.graph.node]
    assert ops.count("Conv") == 5 and "MatMul" in ops
    image = np.random.default_rng(3).standard_normal((1, 3, 80, 96))
    exact = OrtRunner(str(vgg_model))(image)
    approximate = OrtRunner(half.SerializeToString())(image)
    assert approximate.shape == exact.shape
    spread = float(exact.max() - exact.min())
    assert np.abs(approximate.astype(np.float32) - exact).max() <= 1e-2 * spread  # float16
