"""Torch path, classifiers with several heads: every output becomes its own dense map, equal
to crop-by-crop evaluation of that output of the classifier (fp64, CPU), named and typed in
the metadata; verify checks each head; what has no exact dense form is refused by name."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import densemap.convert as convert
from densemap.convert.from_torch.fc import convert_classifier, fully_convolutional
from densemap.convert.heads import HeadOptions
from densemap.convert.runtime import Float64Runner
from densemap.service.contract import Head, ModelMetadata
from densemap.service.errors import ConversionError
from tests.support.convert_heads_support import (
    STRIDE,
    WINDOW,
    PooledAndFlat,
    TwoHeads,
    crop_outputs64,
    output_arrays,
)
from tests.support.oracle import FP64_TOLERANCE

IMAGE = (1, 3, 19, 17)  # 4 x 3 cells at stride 2


def _image(seed=0):
    return np.random.default_rng(seed).standard_normal(IMAGE)


def _metadata(path) -> ModelMetadata:
    model = onnx.load(str(path))
    return ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})


def _assert_maps_equal_crops(maps: dict, expected: dict, tolerance=FP64_TOLERANCE):
    assert set(maps) == set(expected)
    for name, reference in expected.items():
        n_h, n_w = reference.shape[1:]
        got = maps[name][0, :, :n_h, :n_w]
        assert got.shape == reference.shape, name
        assert np.abs(got - reference).max() <= tolerance, name


@pytest.mark.parametrize(
    ("model", "names", "returns"),
    [
        (lambda: TwoHeads(form="dict"), ("scores", "boxes"), dict),
        (lambda: TwoHeads(form="tuple"), ("scores", "boxes"), tuple),
        (lambda: TwoHeads(form="dict", shared=True), ("scores", "boxes"), dict),
        (lambda: TwoHeads(form="tuple", shared=True), ("scores", "boxes"), tuple),
        (lambda: TwoHeads(sigmoid=True, softmax=True), ("scores", "boxes", "attributes"), dict),
        (PooledAndFlat, ("scores", "boxes"), dict),
    ],
    ids=["dict", "tuple", "shared-fc-dict", "shared-fc-tuple", "sigmoid-head", "pool+flatten"],
)
def test_every_head_equals_crops_in_fp64(model, names, returns):
    model = model()
    image = _image()
    expected = crop_outputs64(model, image, names)
    dense = fully_convolutional(model.double(), input_size=WINDOW)
    with torch.no_grad():
        result = dense(torch.from_numpy(image))
    assert type(result) is returns  # the dense module keeps the forward's structure
    _assert_maps_equal_crops(output_arrays(result, names), expected)


def test_conversion_reports_each_output():
    result = convert_classifier(TwoHeads(sigmoid=True, softmax=True), input_size=WINDOW)
    assert result.channels == (3, 4, 2)
    assert result.final_activations == ("softmax", None, "sigmoid")
    assert result.head_names() == ("scores", "boxes", "attributes")
    tuple_result = convert_classifier(TwoHeads(form="tuple"), input_size=WINDOW)
    assert tuple_result.head_names() == ("output0", "output1")
    assert tuple_result.head_names(("cls", "box")) == ("cls", "box")


@pytest.mark.slow
def test_written_model_names_every_head_and_its_variant_is_exact(tmp_path):
    # no BatchNorm here: the dynamo exporter folds it into the weights in float32
    model = TwoHeads(form="tuple")
    options = HeadOptions(
        names=("faces", "boxes"),
        kinds={"boxes": "regression"},
        labels={"boxes": ("dx", "dy", "dw", "dh")},
    )
    result = convert.convert_torch(
        model, tmp_path / "dense.onnx", input_size=WINDOW, labels=("a", "b", "c"),
        strides=(2, 1), heads=options, preprocessing="unit",
    )  # fmt: skip
    meta = _metadata(result.path)
    assert meta.heads == (
        Head("faces", "logits", ("a", "b", "c")),
        Head("boxes", "regression", ("dx", "dy", "dw", "dh")),
    )
    assert meta.version == 2
    dense = onnx.load(str(result.path))
    assert [o.name for o in dense.graph.output] == ["faces", "boxes"]
    image = _image(1)
    expected = crop_outputs64(model, image, ("faces", "boxes"))
    _assert_maps_equal_crops(Float64Runner(dense).outputs(image), expected)
    # the stride-1 à-trous variant: every head equals the classifier at every pixel offset
    variant = onnx.load(str(result.variant_paths[0]))
    assert _metadata(result.variant_paths[0]).heads == meta.heads
    fine = crop_outputs64(model, image, ("faces", "boxes"), stride=(1, 1))
    _assert_maps_equal_crops(Float64Runner(variant).outputs(image), fine)


@pytest.mark.slow
def test_kinds_are_inferred_and_the_first_classifying_head_is_primary(tmp_path):
    model = TwoHeads(sigmoid=True, softmax=True)
    options = HeadOptions(kinds={"boxes": "regression"})
    result = convert.convert_torch(
        model, tmp_path / "d.onnx", input_size=WINDOW, heads=options, preprocessing="unit"
    )
    assert [(h.name, h.kind) for h in result.metadata.heads] == [
        ("scores", "probabilities"),
        ("boxes", "regression"),
        ("attributes", "sigmoid"),
    ]
    assert result.final_activation == "softmax"
    assert result.final_activations == {
        "scores": "softmax", "boxes": None, "attributes": "sigmoid",
    }  # fmt: skip
    primary = HeadOptions(kinds={"boxes": "regression"}, primary="attributes")
    result = convert.convert_torch(
        model, tmp_path / "p.onnx", input_size=WINDOW, heads=primary, preprocessing="unit"
    )
    assert [h.name for h in result.metadata.heads] == ["attributes", "scores", "boxes"]
    assert result.metadata.output_name == "attributes"
    assert result.metadata.output_kind == "sigmoid"


@pytest.mark.slow
def test_verify_compares_each_head_with_its_own_output(tmp_path):
    model = TwoHeads(form="dict", shared=True)
    options = HeadOptions(kinds={"boxes": "regression"})
    result = convert.convert_torch(
        model, tmp_path / "d.onnx", input_size=WINDOW, heads=options, preprocessing="unit"
    )
    report = convert.verify(model, result.path)  # fp32: the export folds BatchNorm in fp32
    assert report.passed
    assert {row.head for row in report.rows} == {"scores", "boxes"}
    assert len(report.rows) == 2 * 5  # whole window + two sizes x (trunk windows, crops)
    table = report.table().splitlines()
    assert table[1].split()[2:4] == ["head", "compared"]
    assert [line.split()[2] for line in table[2:12]] == ["scores", "boxes"] * 5
    # a wrong box head is caught on the boxes rows only
    dense = onnx.load(str(result.path))
    producers = {out: node for node in dense.graph.node for out in node.output}
    producer = producers["boxes"]
    while producer.op_type != "Conv":  # back through the in-graph cell crop
        producer = producers[producer.input[0]]
    bias = next(i for i in dense.graph.initializer if i.name == producer.input[2])
    values = onnx.numpy_helper.to_array(bias) + np.float32(0.01)
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    onnx.save_model(dense, str(tmp_path / "d.onnx"))
    report = convert.verify(model, result.path)
    assert not report.passed
    assert {row.head for row in report.rows if not row.ok} == {"boxes"}
    assert all(abs(row.max_diff - 0.01) < 1e-5 for row in report.rows if not row.ok)


class EarlierLayerHead(nn.Module):
    """Boxes read the trunk's first block, scores its end: two grids."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.block2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(4, 5, 2))
        self.scores = nn.Linear(80, 3)
        self.boxes = nn.Linear(4 * 10 * 10, 4)

    def forward(self, x):
        early = self.block1(x)
        late = self.block2(early)
        return {"scores": self.scores(late.flatten(1)), "boxes": self.boxes(early.flatten(1))}


class PerImageOutput(TwoHeads):
    """An output that is the same for the whole batch: no per-window form."""

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        scores = self.classes(x)
        return scores, self.boxes(x) * scores.sum()


class MeanOutput(TwoHeads):
    def forward(self, x):
        features = self.features(x)
        return self.classes(features.flatten(1)), features.mean()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (EarlierLayerHead, r"read different trunk positions .*layer 'block1.1'"),
        (PerImageOutput, r"^the head of output 1 of the forward reads several tensors"),
        (MeanOutput, r"^output 1 of the forward has shape \(\) at input size 12x12"),
    ],
    ids=["earlier-layer", "depends-on-another-head-per-image", "per-image-output"],
)
def test_what_has_no_dense_form_is_refused_by_name(model, message):
    with pytest.raises(ConversionError, match=message):
        fully_convolutional(model(), input_size=WINDOW)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            HeadOptions(kinds={"box": "regression"}),
            r"the model has no head 'box' \(given a kind \(regression\)\); its heads are: "
            "scores, boxes",
        ),
        (
            HeadOptions(kinds={"scores": "regression", "boxes": "regression"}),
            r"no head classifies \(scores \(regression\), boxes \(regression\)\)",
        ),
        (
            HeadOptions(kinds={"boxes": "regression"}, primary="boxes"),
            "the primary head must classify, but 'boxes' is regression",
        ),
        (HeadOptions(names=("a", "b")), "the forward returns a dict: its keys name the heads"),
        (
            HeadOptions(labels={"boxes": ("x", "y")}),
            "2 labels were given for head 'boxes', which has 4 channels",
        ),
    ],
    ids=[
        "unknown-name",
        "no-classifying-head",
        "regression-primary",
        "names-for-dict",
        "label-count",
    ],
)
def test_bad_head_options_are_refused_naming_the_heads(options, message, tmp_path):
    with pytest.raises(ConversionError, match=message):
        convert.convert_torch(
            TwoHeads(), tmp_path / "d.onnx", input_size=WINDOW, heads=options, preprocessing="unit"
        )
    assert list(tmp_path.iterdir()) == []


def test_tuple_names_must_match_the_outputs(tmp_path):
    with pytest.raises(ConversionError, match="1 head names were given .* returns 2 outputs"):
        convert.convert_torch(
            TwoHeads(form="tuple"), tmp_path / "d.onnx", input_size=WINDOW,
            heads=HeadOptions(names=("only",)), preprocessing="unit",
        )  # fmt: skip


def test_bad_kind_is_refused_at_once():
    with pytest.raises(ConversionError, match="kind must be one of .* got 'boxes'"):
        HeadOptions(kinds={"boxes": "boxes"})


def test_stride_of_the_fixtures():
    # the trunk: conv 3 (stride 1), max-pool 2 (stride 2), conv 2: stride 2, window 12
    dense = fully_convolutional(TwoHeads(), input_size=WINDOW)
    with torch.no_grad():
        maps = dense(torch.zeros(1, 3, WINDOW[0] + STRIDE[0], WINDOW[1]))
    assert tuple(maps["scores"].shape[2:]) == (2, 1)


class PaddedTwoHeads(TwoHeads):
    """A padded trunk: crops differ by design, each head is checked against its own head on
    the trunk's windows."""

    def __init__(self) -> None:
        super().__init__(form="tuple")
        self.features[0] = nn.Conv2d(3, 4, 3, padding=1)
        self.classes[0] = nn.Linear(5 * 5 * 5, 8)
        self.boxes = nn.Linear(5 * 5 * 5, 4)


@pytest.mark.slow
def test_verify_checks_each_head_of_a_padded_net_on_its_trunk_windows(tmp_path):
    model = PaddedTwoHeads()
    options = HeadOptions(names=("scores", "boxes"), kinds={"boxes": "regression"})
    result = convert.convert_torch(
        model, tmp_path / "d.onnx", input_size=WINDOW, heads=options, preprocessing="unit"
    )
    assert result.metadata.geometry.padded
    report = convert.verify(model, result.path)
    assert report.passed
    assert not [row for row in report.rows if row.against == "converted torch module"]
    exact_rows = [row for row in report.rows if row.against.startswith("head on trunk")]
    assert [row.head for row in exact_rows] == ["scores", "boxes"] * 2
    assert all(row.limit is not None and row.max_diff <= row.limit for row in exact_rows)
    crop_rows = [row for row in report.rows if row.against.startswith("crops")]
    assert crop_rows and all(row.limit is None for row in crop_rows)
