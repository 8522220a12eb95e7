"""ONNX path, classifiers with several outputs: each output of a classifier exported by torch
(legacy and dynamo exporters) becomes its own dense map, equal to the classifier graph run
crop by crop in float64 (and to the torch classifier where no BatchNorm is folded);
heads that cannot be converted exactly are refused by name."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import densemap.convert as convert
from densemap.convert.export import export_classifier_onnx
from densemap.convert.from_onnx.fc_head import rewrite_fc_head
from densemap.convert.heads import HeadOptions
from densemap.convert.runtime import Float64Runner
from densemap.service.errors import ConversionError
from tests.support.convert_heads_support import (
    WINDOW,
    PooledAndFlat,
    TwoHeads,
    crop_outputs64,
    onnx_crop_outputs64,
)
from tests.support.convert_onnx_support import BOTH_EXPORTERS, GraphBuilder
from tests.support.oracle import FP64_TOLERANCE

EXPORTERS = pytest.mark.parametrize("dynamo", BOTH_EXPORTERS)
IMAGE = (1, 3, 19, 17)


def _classifier(model, names, *, dynamo):
    return export_classifier_onnx(
        model.eval(), input_size=WINDOW, in_channels=3, dynamo=dynamo, output_names=names
    )


def _assert_dense_equals(dense, expected: dict):
    maps = Float64Runner(dense).outputs(np.random.default_rng(0).standard_normal(IMAGE))
    assert list(maps) == list(expected)
    for name, reference in expected.items():
        n_h, n_w = reference.shape[1:]
        assert maps[name].shape[1] == reference.shape[0], name
        np.testing.assert_allclose(
            maps[name][0, :, :n_h, :n_w], reference, rtol=0, atol=FP64_TOLERANCE, err_msg=name
        )


@EXPORTERS
@pytest.mark.parametrize(
    ("model", "names", "folds_batchnorm"),
    [
        (lambda: TwoHeads(form="dict"), ("scores", "boxes"), False),
        (lambda: TwoHeads(form="tuple"), ("scores", "boxes"), False),
        (lambda: TwoHeads(shared=True), ("scores", "boxes"), True),
        (lambda: TwoHeads(sigmoid=True, softmax=True), ("scores", "boxes", "attributes"), False),
        (PooledAndFlat, ("scores", "boxes"), False),
    ],
    ids=["dict", "tuple", "shared-fc", "sigmoid-head", "pool+flatten"],
)
def test_every_output_equals_crops_in_fp64(model, names, folds_batchnorm, dynamo):
    model = model()
    classifier = _classifier(model, names, dynamo=dynamo)
    dense = rewrite_fc_head(classifier)
    onnx.checker.check_model(dense, full_check=True)
    assert [o.name for o in dense.graph.output] == list(names)
    image = np.random.default_rng(0).standard_normal(IMAGE)
    _assert_dense_equals(dense, onnx_crop_outputs64(classifier, image))
    if not (folds_batchnorm and dynamo):  # dynamo folds BatchNorm into fp32 weights
        _assert_dense_equals(dense, crop_outputs64(model, image, names))


@EXPORTERS
def test_written_model_has_every_head_with_kinds_and_labels(dynamo, tmp_path):
    model = TwoHeads(sigmoid=True, softmax=True)
    path = tmp_path / "classifier.onnx"
    names = ("scores", "boxes", "attributes")
    onnx.save_model(_classifier(model, names, dynamo=dynamo), str(path))
    options = HeadOptions(kinds={"boxes": "regression"}, labels={"attributes": ("hat", "mask")})
    result = convert.convert_onnx(
        path, tmp_path / "dense.onnx", strides=[1], heads=options, preprocessing="unit"
    )
    meta = result.metadata
    assert [(h.name, h.kind, h.labels) for h in meta.heads] == [
        ("scores", "probabilities", ()),
        ("boxes", "regression", ()),
        ("attributes", "sigmoid", ("hat", "mask")),
    ]
    report = convert.verify(path, result.path)
    assert report.passed and {row.head for row in report.rows} == set(names)
    variant = onnx.load(str(result.variant_paths[0]))  # stride 1: every head at every offset
    image = np.random.default_rng(0).standard_normal(IMAGE)
    fine = onnx_crop_outputs64(onnx.load(str(path)), image, stride=(1, 1))
    maps = Float64Runner(variant).outputs(image)
    for name in names:
        reference = fine[name]
        got = maps[name][0, :, : reference.shape[1], : reference.shape[2]]
        np.testing.assert_allclose(got, reference, rtol=0, atol=FP64_TOLERANCE, err_msg=name)


def test_head_names_are_refused_for_an_onnx_classifier(tmp_path):
    path = tmp_path / "classifier.onnx"
    onnx.save_model(_classifier(TwoHeads(), ("scores", "boxes"), dynamo=True), str(path))
    with pytest.raises(ConversionError, match="heads are its graph's output names"):
        convert.convert_onnx(
            path, tmp_path / "d.onnx", heads=HeadOptions(names=("a", "b")), preprocessing="unit"
        )


def _two_reads(*, second_from_earlier=False, output_map=False, mix=False, reduce=False):
    """conv -> relu -> conv (window 8: maps 2x6x6, 2x4x4); scores from the last map, boxes
    from the earlier map, or the last map itself as an output, or boxes times the 3 scores
    (another width), or boxes plus a sum over the scores (per image)."""
    g = GraphBuilder(1, seed=4)
    g.conv(2, 3)
    early = g.node("Relu")
    late = g.conv(2, 3)
    flat = g.node("Flatten", [late], axis=1)
    scores = g.node("Gemm", [flat, g.const(g.rng.standard_normal((3, 32)).astype(np.float32))],
                    transB=1)  # fmt: skip
    if second_from_earlier:
        source, features = g.node("Flatten", [early], axis=1), 2 * 6 * 6
    else:
        source, features = flat, 2 * 4 * 4
    weight = g.const(g.rng.standard_normal((4, features)).astype(np.float32))
    second = g.node("Gemm", [source, weight], transB=1)
    if mix:
        second = g.node("Mul", [second, scores])
    if reduce:
        second = g.node("Add", [second, g.node("ReduceSum", [scores], keepdims=1)])
    if output_map:
        second = late
    graph = g.model(8)
    del graph.graph.output[:]
    for name in (scores, second):
        graph.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return graph


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"second_from_earlier": True}, r"the heads read different feature maps \(Flatten node"),
        ({"output_map": True}, r"the output 'conv\d+' is not computed by a classifier head"),
        (
            {"mix": True},
            r"Mul node 'mul\d+' combines the head's features with features of "
            "another width",
        ),
        (
            {"reduce": True},
            r"ReduceSum node 'reducesum\d+' in the classifier head is not "
            "supported",
        ),
    ],
    ids=["earlier-layer", "feature-map-output", "mixes-two-heads", "sums-another-head"],
)
def test_outputs_with_no_exact_dense_form_are_refused_by_name(kwargs, message):
    with pytest.raises(ConversionError, match=message):
        rewrite_fc_head(_two_reads(**kwargs))


def test_two_hand_built_heads_on_one_flatten_equal_crops():
    classifier = _two_reads()
    dense = rewrite_fc_head(classifier)
    image = np.random.default_rng(1).standard_normal((1, 1, 13, 11))
    expected = onnx_crop_outputs64(classifier, image, window=(8, 8), stride=(1, 1))
    maps = Float64Runner(dense).outputs(image)
    for name, reference in expected.items():
        got = maps[name][0, :, : reference.shape[1], : reference.shape[2]]
        np.testing.assert_allclose(got, reference, rtol=0, atol=FP64_TOLERANCE)


def test_an_output_that_is_the_flattened_map_is_refused():
    classifier = _two_reads()
    flat = next(node for node in classifier.graph.node if node.op_type == "Flatten")
    classifier.graph.output.append(
        helper.make_tensor_value_info(flat.output[0], onnx.TensorProto.FLOAT, None)
    )
    with pytest.raises(ConversionError, match=r"the output 'flatten\d+' is the feature map"):
        rewrite_fc_head(classifier)
