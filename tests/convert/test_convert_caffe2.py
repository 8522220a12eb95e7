"""Issue 18: Caffe2-style ONNX classifiers (IR 3, opset 9, weights listed as inputs)
convert exactly or are refused with the true reason.

Every map is checked cell by cell in float64 against the classifier's own computation:
crop by crop for unpadded trunks, and, for a padded trunk, the classifier's own head
(cut from its graph) on every window of its own trunk's output over the whole image,
which is what a dense pass must equal when zero padding makes crops differ.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import densemap.convert as convert
from densemap.convert.runtime import Float64Runner
from densemap.service.contract import Preprocessing
from densemap.service.errors import ConversionError
from tests.support.caffe2_graphs import (
    GOOGLENET_FEATURES,
    channel_split_classifier,
    densenet_style_classifier,
    flatten_then_softmax_classifier,
    googlenet_style_classifier,
    opset6_classifier,
    reshaped_weight_classifier,
    shuffle_classifier,
    spatial_batchnorm_classifier,
    spatial_softmax_classifier,
    squeezenet_style_classifier,
    strided_global_pool_classifier,
)
from tests.support.convert_onnx_support import dense64
from tests.support.oracle import cell_counts, crop_by_crop, onnx_classifier

UNIT = Preprocessing(scale=1 / 255)
CASES = {
    "reshape-of-initializer weight": reshaped_weight_classifier,
    "ConstantOfShape bias": lambda: reshaped_weight_classifier(constant_of_shape_bias=True),
    "SqueezeNet: conv head, GAP, old Softmax": squeezenet_style_classifier,
    "DenseNet: GAP, 1x1 conv, 4-D output": densenet_style_classifier,
    "DenseNet with an old Softmax": lambda: densenet_style_classifier(softmax=True),
    "DenseNet with a Flatten": lambda: densenet_style_classifier(flatten=True),
    "GoogLeNet: 7x7 average, pads 0,0,1,1": googlenet_style_classifier,
    "GoogLeNet, count_include_pad=1": lambda: googlenet_style_classifier(count_include_pad=1),
    "GoogLeNet, a 7x7 max pool": lambda: googlenet_style_classifier(op="MaxPool"),
    "a 7x7 conv with pads 0,0,1,1 on 6x6": lambda: googlenet_style_classifier(op="Conv"),
    "channel split by Slice, opset 9": channel_split_classifier,
    "channel split by Slice, opset 11": lambda: channel_split_classifier(opset=11),
    "channel shuffle in an IR-3 graph": shuffle_classifier,
    "a 4x4 average at stride 4 on a 4x4 map": strided_global_pool_classifier,
    "MXNet: GAP, 1x1 conv, Flatten, Softmax": flatten_then_softmax_classifier,
    "opset 6 (BatchNormalization is_test, Gemm broadcast)": opset6_classifier,
    "GAP, Flatten, Softmax (no FC), opset 13": lambda: flatten_then_softmax_classifier(
        conv=False, opset=13
    ),
}


def _convert(classifier: onnx.ModelProto, tmp_path, **options):
    onnx.save(classifier, str(tmp_path / "classifier.onnx"))
    return convert.convert_onnx(
        tmp_path / "classifier.onnx", tmp_path / "dense.onnx", preprocessing=UNIT, **options
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_caffe2_style_classifier_equals_crops_cell_by_cell(case, tmp_path):
    classifier, window = CASES[case]()
    assert classifier.ir_version == 3 and len(classifier.graph.input) > 1
    result = _convert(classifier, tmp_path)
    written = onnx.load(str(result.path))
    assert [value.name for value in written.graph.input] == ["input"]  # weights are weights
    assert not result.metadata.geometry.padded  # no padding reaches a cell at R
    size = (window[0] + 2 * result.metadata.geometry.stride[0] + 3, window[1] + 11)
    image = np.random.default_rng(5).standard_normal((1, 3, *size))
    n = cell_counts(size, window, result.metadata.geometry.stride)
    expected = crop_by_crop(
        onnx_classifier(classifier),
        image,
        window=window,
        stride=result.metadata.geometry.stride,
        cells=n,
    )[0]
    score_map = dense64(written, image)[0]
    assert score_map.shape == expected.shape
    np.testing.assert_allclose(score_map, expected, rtol=0, atol=1e-9)
    report = convert.verify(tmp_path / "classifier.onnx", result.path, dtype="float64")
    assert report.passed, report.table()


def test_an_opset_6_classifier_verifies_in_float32_as_the_cli_does(tmp_path):
    # verify's float32 rows run the classifier's own trunk and head on onnxruntime, which
    # needs the file upgraded past opset 6 as conversion does
    classifier, _window = opset6_classifier()
    result = _convert(classifier, tmp_path)
    report = convert.verify(tmp_path / "classifier.onnx", result.path)
    assert report.passed, report.table()


def test_googlenet_pool_is_a_six_by_six_average_not_the_seven_by_seven_it_is_written_as(
    tmp_path,
):
    # at R the 7x7 pool with pads (0, 0, 1, 1) averages the 6x6 map; kept as written it
    # averages 49 real values at every inner cell of a larger image (20% off)
    classifier, window = googlenet_style_classifier()
    written = onnx.load(str(_convert(classifier, tmp_path).path))
    pools = [node for node in written.graph.node if node.op_type == "AveragePool"]
    assert len(pools) == 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in pools[0].attribute}
    assert list(attrs["kernel_shape"]) == [6, 6] and not any(attrs.get("pads", [0]))
    assert list(attrs["strides"]) == [1, 1]


def _extract(model: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    from onnx.utils import Extractor

    part = Extractor(onnx.shape_inference.infer_shapes(model)).extract_model(inputs, outputs)
    for dim, name in zip(part.graph.input[0].type.tensor_type.shape.dim, "NCHW", strict=True):
        if name != "C":
            dim.Clear()
            dim.dim_param = name
    del part.graph.value_info[:]
    return part


def test_padded_trunk_equals_its_head_on_trunk_windows(tmp_path):
    classifier, window = googlenet_style_classifier(trunk_pad=1)
    result = _convert(classifier, tmp_path)
    assert result.metadata.geometry.padded
    model = onnx.ModelProto()
    model.CopyFrom(classifier)
    weights = {init.name for init in model.graph.initializer}
    image_only = [value for value in model.graph.input if value.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(image_only)
    model.ir_version = 4
    output = model.graph.output[0].name
    trunk = _extract(model, ["input"], [GOOGLENET_FEATURES])
    head = _extract(model, [GOOGLENET_FEATURES], [output])
    for dim, value in zip(
        head.graph.input[0].type.tensor_type.shape.dim, (1, 6, 6, 6), strict=True
    ):
        dim.Clear()
        dim.dim_value = value
    size = (window[0] + 13, window[1] + 7)
    image = np.random.default_rng(7).standard_normal((1, 3, *size))
    features = Float64Runner(trunk)(image)
    n = cell_counts(size, window, result.metadata.geometry.stride)
    run_head = Float64Runner(head)
    expected = np.zeros((5, *n))
    for i in range(n[0]):  # the trunk's stride is 2 and the map's 2: one feature per cell
        for j in range(n[1]):
            expected[:, i, j] = run_head(
                np.ascontiguousarray(features[:, :, i : i + 6, j : j + 6])
            )[0]
    score_map = dense64(onnx.load(str(result.path)), image)[0]
    np.testing.assert_allclose(score_map, expected, rtol=0, atol=1e-9)


def test_softmax_over_the_classes_keeps_its_kind(tmp_path):
    classifier, _ = squeezenet_style_classifier()
    result = _convert(classifier, tmp_path)
    assert result.metadata.output_kind == "probabilities"
    classifier, _ = flatten_then_softmax_classifier()
    (tmp_path / "f").mkdir()
    assert _convert(classifier, tmp_path / "f").metadata.output_kind == "probabilities"
    classifier, _ = densenet_style_classifier()
    (tmp_path / "d").mkdir()
    assert _convert(classifier, tmp_path / "d").metadata.output_kind == "logits"


def test_old_softmax_over_space_is_refused_as_per_image(tmp_path):
    classifier, _ = spatial_softmax_classifier()
    with pytest.raises(ConversionError, match="Softmax node .* over the spatial axes too"):
        _convert(classifier, tmp_path)
    assert not (tmp_path / "dense.onnx").exists()


def test_strided_global_pool_keeps_its_stride_and_a_trous_refines_it(tmp_path):
    # S is the product of the strides (2 x 4); the a-trous variant at 2 slides the 4x4 pool
    # at every trunk position, each cell the classifier on its window (float64 crops)
    classifier, window = strided_global_pool_classifier()
    result = _convert(classifier, tmp_path, strides=[2])
    assert result.metadata.geometry.stride == (8, 8)
    size = (window[0] + 13, window[1] + 9)
    image = np.random.default_rng(8).standard_normal((1, 3, *size))
    n = cell_counts(size, window, (2, 2))
    expected = crop_by_crop(
        onnx_classifier(classifier), image, window=window, stride=(2, 2), cells=n
    )[0]
    fine = dense64(onnx.load(str(result.variant_paths[0])), image)[0]
    np.testing.assert_allclose(fine, expected, rtol=0, atol=1e-9)


def test_batchnorm_with_statistics_per_position_is_refused(tmp_path):
    classifier, _ = spatial_batchnorm_classifier()
    with pytest.raises(ConversionError, match="statistics of its own .spatial=0."):
        _convert(classifier, tmp_path)
