"""``verify``'s reference is the classifier's own head on its own trunk's windows: exact for
padded nets too, so a rewrite that is right at R and wrong past it FAILS.

Independent references here: the classifier is cut with ``onnx.utils.Extractor`` (not
densemap's cut) and run in float64 with onnx's reference evaluator, windows sliced by hand;
unpadded nets are checked against crops of the whole classifier.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import densemap.convert as convert
from densemap.convert.pipeline import finish_dense
from densemap.convert.runtime import Float64Runner
from densemap.convert.trunk_windows import TrunkNotDense, find_cut
from densemap.convert.verify_reference import Reference
from densemap.service.cli import main
from densemap.service.errors import ConversionError
from tests.support.convert_onnx_support import GraphBuilder, keras_style_classifier
from tests.support.oracle import crop_by_crop, onnx_classifier

R = 14  # GoogLeNet-like: 14 -> conv(pad 1) 14 -> maxpool 7 -> conv 2x2 -> 6x6 trunk output
TRUNK = "relu9"  # the trunk's output tensor in googlenet_like()
SIZES = [(21, 18), (17, 23)]


def googlenet_like() -> onnx.ModelProto:
    """trunk -> AveragePool kernel 7, pads (0, 0, 1, 1), count_include_pad=0 on its 6x6 map
    (at R it averages the 36 real values: a global pool) -> Flatten -> Gemm."""
    g = GraphBuilder(3, seed=1)
    g.conv(4, 3, pad=1)
    g.node("Relu")
    g.pool("MaxPool", 2, 2)
    g.conv(5, 2)
    assert g.node("Relu") == TRUNK
    g.node("AveragePool", kernel_shape=[7, 7], pads=[0, 0, 1, 1], count_include_pad=0)
    g.node("Flatten", axis=1)
    weight = g.const(g.rng.standard_normal((3, 5)).astype(np.float32))
    g.node("Gemm", [g.current, weight, g.const(np.float32([0.1, -0.2, 0.3]), "b")], transB=1)
    return g.model(R, output_dims=[1, 3])


def dense_from(classifier: onnx.ModelProto, pool: dict) -> onnx.ModelProto:
    """The classifier's trunk, then ``pool`` (AveragePool attributes), then its Gemm as a
    1x1 conv: a dense model written by hand."""
    graph = classifier.graph
    cut = [n.output[0] for n in graph.node].index(TRUNK) + 1
    gemm = graph.node[-1]
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    weight = inits[gemm.input[1]].reshape(3, 5, 1, 1)
    nodes = list(graph.node[:cut]) + [
        helper.make_node("AveragePool", [TRUNK], ["pooled"], **pool),
        helper.make_node("Conv", ["pooled", "head_w", gemm.input[2]], ["scores"]),
    ]
    initializers = [*graph.initializer, numpy_helper.from_array(weight, "head_w")]
    dense = helper.make_graph(
        nodes, "dense", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        initializers,
    )  # fmt: skip
    return helper.make_model(dense, opset_imports=classifier.opset_import, ir_version=10)


RIGHT_POOL = {"kernel_shape": [6, 6]}  # the 36 real values, sliding with stride 1
WRONG_POOL = {"kernel_shape": [7, 7], "pads": [0, 0, 1, 1], "count_include_pad": 0}


@pytest.fixture(scope="module")
def googlenet_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("googlenet")
    classifier = googlenet_like()
    onnx.save_model(classifier, str(folder / "classifier.onnx"))
    write_as_is(dense_from(classifier, RIGHT_POOL), folder / "right.onnx")
    write_as_is(dense_from(classifier, WRONG_POOL), folder / "wrong.onnx")
    return folder


def write_as_is(dense: onnx.ModelProto, path):
    """finish_dense on a dense model written by hand: the converter's bug, by hand."""
    return finish_dense(dense, path, window=R)


def _independent_reference(classifier: onnx.ModelProto, image, *, feature, stride):
    """Head on trunk windows with onnx.utils.Extractor's parts, float64, k = 1."""
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(classifier))
    trunk = extractor.extract_model(["input"], [feature])
    head = extractor.extract_model([feature], [classifier.graph.output[0].name])
    features = Float64Runner(trunk)(image)
    h = w = 6  # the trunk's output at R; windows one trunk unit apart (k = S / 2 = 1)
    cells = [(n - r) // s + 1 for n, r, s in zip(image.shape[2:], (R, R), stride, strict=True)]
    run = Float64Runner(head)
    scores = np.zeros((3, *cells))
    for i in range(cells[0]):
        for j in range(cells[1]):
            scores[:, i, j] = run(features[:, :, i : i + h, j : j + w])[0].reshape(-1)
    return scores


def test_the_cut_is_where_the_pool_makes_the_map_1x1():
    cut = find_cut(googlenet_like())
    assert (cut.feature, cut.axes, cut.size, cut.jump) == (TRUNK, (2, 3), (6, 6), (2, 2))


@pytest.mark.parametrize("size", SIZES)
def test_the_reference_equals_an_independent_one(googlenet_files, size):
    path = googlenet_files / "classifier.onnx"
    image = np.random.default_rng(0).standard_normal((1, 3, *size))
    expected = _independent_reference(onnx.load(str(path)), image, feature=TRUNK, stride=(2, 2))
    reference = Reference(path, np.float64, ["scores"], window=(R, R), channels=3)
    got = reference.trunk_windows(image, stride=(2, 2), cells=expected.shape[1:])["scores"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    dense = Float64Runner(onnx.load(str(googlenet_files / "right.onnx")))(image)[0]
    np.testing.assert_allclose(dense, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_pool_kept_7x7_fails_where_the_right_one_passes(googlenet_files, dtype):
    classifier = googlenet_files / "classifier.onnx"
    right = convert.verify(classifier, googlenet_files / "right.onnx", sizes=SIZES, dtype=dtype)
    assert right.passed and right.padded, right.table()
    wrong = convert.verify(classifier, googlenet_files / "wrong.onnx", sizes=SIZES, dtype=dtype)
    assert not wrong.passed, wrong.table()
    verdicts = {row.against.split(" (")[0]: row.verdict for row in wrong.rows}
    assert verdicts == {
        "classifier, whole window": "ok",  # at R both pools average the same 36 values
        "head on trunk windows": "FAIL",
        "crops": "info (padding)",
    }
    assert "FAILED: differences past the limit" in wrong.table()


def _padded_classifier() -> onnx.ModelProto:
    g = GraphBuilder(3, seed=2)
    g.conv(4, 3, pad=1)
    g.node("Relu")
    g.pool("MaxPool", 2, 2)
    g.conv(6, 3, pad=1)
    g.node("Relu")
    g.node("Flatten", axis=1)
    weight = g.const(g.rng.standard_normal((5, 6 * 4 * 4)).astype(np.float32) * 0.1)
    g.node("Gemm", [g.current, weight, g.const(np.zeros(5, np.float32), "b")], transB=1)
    return g.model(8, output_dims=[1, 5])


def _perturb_largest(path, out, dims):
    model = onnx.load(str(path))
    (tensor,) = [t for t in model.graph.initializer if tuple(t.dims) == dims]
    values = numpy_helper.to_array(tensor).copy()
    values.reshape(-1)[np.abs(values).argmax()] *= 1 + 1e-3
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    onnx.save_model(model, str(out))
    return out


def test_a_converted_padded_net_passes_and_a_head_weight_off_by_1e3_fails(tmp_path):
    onnx.save_model(_padded_classifier(), str(tmp_path / "c.onnx"))
    result = convert.convert_onnx(
        tmp_path / "c.onnx", tmp_path / "d.onnx", strides=[1], preprocessing="unit"
    )
    report = convert.verify(tmp_path / "c.onnx", result.path)
    assert report.passed and report.padded, report.table()
    checked = {row.against.split(" (")[0] for row in report.rows if row.limit is not None}
    assert checked == {"classifier, whole window", "head on trunk windows", "native map, every k-th cell"}  # fmt: skip
    assert "head on trunk windows: the classifier cut where its head starts" in report.table()
    wrong = _perturb_largest(result.path, tmp_path / "w.onnx", (5, 6, 4, 4))
    report = convert.verify(tmp_path / "c.onnx", wrong)
    assert not report.passed
    assert {row.verdict for row in report.rows if row.against.startswith("head")} == {"FAIL"}


def _unpadded_classifier() -> onnx.ModelProto:
    """R = 16: the stride-2 conv leaves R's last row and column unused, the floor pool its
    trunk's last unit; then Flatten -> Gemm -> Relu -> Gemm."""
    g = GraphBuilder(3, seed=3)
    g.conv(4, 3, stride=2)  # 16 -> 7, pixel 15 unused
    g.node("Relu")
    g.pool("MaxPool", 2, 2)  # 7 -> 3, unit 6 unused
    g.conv(5, 2)  # 3 -> 2
    g.node("Flatten", axis=1)
    hidden = g.const(g.rng.standard_normal((6, 20)).astype(np.float32))
    g.node("Gemm", [g.current, hidden, g.const(np.zeros(6, np.float32), "b")], transB=1)
    g.node("Relu")
    scores = g.const(g.rng.standard_normal((4, 6)).astype(np.float32))
    g.node("Gemm", [g.current, scores, g.const(np.ones(4, np.float32), "b")], transB=1)
    return g.model(16, output_dims=[1, 4])


@pytest.mark.parametrize("size", [(16, 16), (29, 22), (27, 35)])
def test_on_an_unpadded_net_the_reference_equals_crops_exactly(tmp_path, size):
    classifier = _unpadded_classifier()
    onnx.save_model(classifier, str(tmp_path / "c.onnx"))
    image = np.random.default_rng(1).standard_normal((1, 3, *size))
    cells = tuple((n - 16) // 4 + 1 for n in size)
    crops = crop_by_crop(
        onnx_classifier(classifier), image, window=(16, 16), stride=(4, 4), cells=cells
    )[0]
    reference = Reference(tmp_path / "c.onnx", np.float64, ["y"], window=(16, 16), channels=3)
    assert reference.cut.jump == (4, 4) and reference.cut.size == (2, 2)
    got = reference.trunk_windows(image, stride=(4, 4), cells=cells)["y"]
    np.testing.assert_allclose(got, crops, rtol=0, atol=1e-12)


def test_an_unpadded_net_checks_both_references(tmp_path):
    onnx.save_model(_unpadded_classifier(), str(tmp_path / "c.onnx"))
    result = convert.convert_onnx(tmp_path / "c.onnx", tmp_path / "d.onnx", preprocessing="unit")
    report = convert.verify(tmp_path / "c.onnx", result.path, dtype="float64")
    assert report.passed and not report.padded, report.table()
    assert {row.against.split(" (")[0] for row in report.rows if row.limit is not None} == {
        "classifier, whole window", "head on trunk windows", "crops",
    }  # fmt: skip


def test_an_nhwc_classifier_with_a_fixed_batch_and_reshape_head(tmp_path):
    classifier = keras_style_classifier()  # Transpose in, Transpose + Reshape([1, -1]) out
    onnx.save_model(classifier, str(tmp_path / "k.onnx"))
    reference = Reference(tmp_path / "k.onnx", np.float64, ["y"], window=(9, 13), channels=3)
    image = np.random.default_rng(2).standard_normal((1, 15, 21, 3))
    cells = (4, 5)  # stride 2: (15 - 9) // 2 + 1, (21 - 13) // 2 + 1
    got = reference.trunk_windows(image, stride=(2, 2), cells=cells)["y"]
    run = Float64Runner(classifier)
    for i in range(cells[0]):
        for j in range(cells[1]):
            crop = image[:, 2 * i : 2 * i + 9, 2 * j : 2 * j + 13, :]
            np.testing.assert_allclose(got[:, i, j], run(crop)[0], rtol=0, atol=1e-12)


def test_heads_reading_different_feature_maps_are_refused():
    g = GraphBuilder(3, seed=4)
    first = g.conv(4, 3)
    g.conv(4, 3)
    flat = g.node("Flatten", axis=1)
    one = g.node("Gemm", [flat, g.const(np.ones((2, 4 * 4 * 4), np.float32))], transB=1)
    pooled = g.node("GlobalAveragePool", [first])
    flat2 = g.node("Flatten", [pooled], axis=1)
    two = g.node("Gemm", [flat2, g.const(np.ones((3, 4), np.float32))], transB=1)
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in (one, two)]
    image = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])
    graph = helper.make_graph(g.nodes, "g", [image], outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    with pytest.raises(ConversionError, match="heads start from different feature maps"):
        find_cut(model)


def _no_dense_trunk(self, image, *, stride, cells):
    raise TrunkNotDense("the trunk holds a Reshape to a fixed shape")


def test_a_padded_net_whose_trunk_cannot_run_dense_is_not_verified(googlenet_files, monkeypatch):
    monkeypatch.setattr(Reference, "trunk_windows", _no_dense_trunk)
    classifier = googlenet_files / "classifier.onnx"
    report = convert.verify(classifier, googlenet_files / "right.onnx", sizes=SIZES)
    assert not report.passed and report.unverified
    table = " ".join(report.table().split())
    assert "no head on trunk windows: the trunk holds a Reshape to a fixed shape." in table
    assert table.endswith("NOT VERIFIED: nothing exact to compare the padded map with")


def test_an_unpadded_net_whose_trunk_cannot_run_dense_falls_back_to_crops(tmp_path, monkeypatch):
    onnx.save_model(_unpadded_classifier(), str(tmp_path / "c.onnx"))
    result = convert.convert_onnx(tmp_path / "c.onnx", tmp_path / "d.onnx", preprocessing="unit")
    monkeypatch.setattr(Reference, "trunk_windows", _no_dense_trunk)
    report = convert.verify(tmp_path / "c.onnx", result.path)
    assert report.passed, report.table()
    table = " ".join(report.table().split())
    assert "no head on trunk windows: the trunk holds a Reshape to a fixed shape." in table
    assert "Unpadded net: crops are exact and are the check." in table


@pytest.mark.parametrize(("pool", "code"), [(WRONG_POOL, 1), (RIGHT_POOL, 0)])
def test_the_cli_exits_1_on_a_wrong_padded_rewrite(googlenet_files, tmp_path, monkeypatch, capsys, pool, code):  # fmt: skip
    classifier = googlenet_files / "classifier.onnx"

    def convert_by_hand(path, output, **_):  # the converter's bug, by hand
        return write_as_is(dense_from(onnx.load(str(path)), pool), output)

    monkeypatch.setattr(convert, "convert_onnx", convert_by_hand)
    prep = {"layout": "NCHW", "color": "RGB", "scale": 1.0, "mean": [0] * 3, "std": [1] * 3}
    (tmp_path / "prep.json").write_text(json.dumps(prep))
    argv = [classifier, "-o", tmp_path / "d.onnx", "--preprocessing", tmp_path / "prep.json"]
    assert main(["convert", *map(str, argv), "--verify"]) == code
    out = capsys.readouterr().out
    assert ("head on trunk windows" in out) and (("FAIL" in out) == bool(code)), out
    assert (tmp_path / "d.onnx").exists() == (not code)


def test_a_head_the_tracer_refuses_past_the_cut_is_still_cut(googlenet_files):
    """Caffe2 style, opset 11: the pool that is global at R, a 1x1 conv head and an old
    Softmax over axis 1 (flattening C x 1 x 1 at R, which the tracer refuses on a map)."""
    g = GraphBuilder(3, seed=1)
    g.conv(4, 3, pad=1)
    g.node("Relu")
    g.pool("MaxPool", 2, 2)
    g.conv(5, 2)
    trunk = g.node("Relu")
    g.node("AveragePool", kernel_shape=[7, 7], pads=[0, 0, 1, 1], count_include_pad=0)
    g.conv(3, 1)
    g.node("Softmax", axis=1)
    classifier = g.model(R, opset=11, output_dims=[1, 3, 1, 1])
    cut = find_cut(classifier)
    assert (cut.feature, cut.size, cut.jump) == (trunk, (6, 6), (2, 2))
    path = googlenet_files / "caffe2_style.onnx"
    onnx.save_model(classifier, str(path))
    image = np.random.default_rng(3).standard_normal((1, 3, *SIZES[0]))
    expected = _independent_reference(classifier, image, feature=trunk, stride=(2, 2))
    reference = Reference(path, np.float64, ["y"], window=(R, R), channels=3)
    got = reference.trunk_windows(image, stride=(2, 2), cells=expected.shape[1:])["y"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def _strided_head_classifier() -> onnx.ModelProto:
    """Padded; the head starts at a 4x4 map of stride 2 and pools it with stride 4, so the
    dense stride is 8 and variants at 4 and 2 start on the trunk output's grid."""
    g = GraphBuilder(3, seed=5)
    g.conv(4, 3, pad=1)
    g.node("Relu")
    g.pool("MaxPool", 2, 2)
    g.conv(5, 3, pad=1)
    g.node("Relu")
    g.pool("MaxPool", 4, 4)
    g.node("Flatten", axis=1)
    weight = g.const(g.rng.standard_normal((3, 5)).astype(np.float32))
    g.node("Gemm", [g.current, weight, g.const(np.zeros(3, np.float32), "b")], transB=1)
    return g.model(8, output_dims=[1, 3])


def test_padded_variants_on_the_trunk_grid_are_checked_on_its_windows(tmp_path):
    onnx.save_model(_strided_head_classifier(), str(tmp_path / "c.onnx"))
    result = convert.convert_onnx(
        tmp_path / "c.onnx", tmp_path / "d.onnx", strides=[4, 2], preprocessing="unit"
    )
    report = convert.verify(tmp_path / "c.onnx", result.path, dtype="float64")
    assert report.passed and report.padded, report.table()
    exact = [(row.net, row.cells) for row in report.rows if row.against.startswith("head on")]
    assert exact == [
        ("", (4, 3)), ("", (2, 4)),
        ("d.s4.onnx", (8, 6)), ("d.s4.onnx", (3, 8)),
        ("d.s2.onnx", (15, 11)), ("d.s2.onnx", (5, 15)),
    ]  # fmt: skip
    assert max(row.max_diff for row in report.rows if row.limit is not None) < 1e-12
    variant = result.variant_paths[1]
    weights = [t for t in onnx.load(str(variant)).graph.initializer if len(t.dims) == 4]
    _perturb_largest(variant, variant, tuple(weights[1].dims))
    report = convert.verify(tmp_path / "c.onnx", result.path, dtype="float64")
    failed = {(row.net, row.against.split(" (")[0]) for row in report.rows if not row.ok}
    assert ("d.s2.onnx", "head on trunk windows") in failed, report.table()
    assert all(net == "d.s2.onnx" for net, _ in failed)
