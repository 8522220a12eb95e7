"""Finishing path and public API: metadata contract, variants, atomic writes, verify."""

from __future__ import annotations

import importlib.metadata
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import densemap.convert as convert
from densemap.convert import pipeline
from densemap.convert.from_onnx.fc_head import rewrite_fc_head
from densemap.service.contract import ModelMetadata, Preprocessing
from densemap.service.errors import ConversionError
from tests.support.convert_onnx_support import (
    dense64,
    export_classifier,
    keras_style_classifier,
    ort32,
)
from tests.support.oracle import cell_counts


def _unpadded() -> nn.Module:
    """Window 19, stride 4: conv, pool 3/2, conv, pool 2/2, Linear-ReLU-Linear (3 classes)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(4, 4, 3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 5), nn.ReLU(), nn.Linear(5, 3),
    ).eval()  # fmt: skip


def _padded_ceil() -> nn.Module:
    """Same-padded convs and ceil_mode pools (Caffe style), softmax output; window 19."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 6), nn.ReLU(), nn.Linear(6, 3), nn.Softmax(dim=1),
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("classifier") / "cls.onnx"
    onnx.save_model(export_classifier(_unpadded(), 19, dynamo=False), str(path))
    return path


def _ort_metadata(path) -> ModelMetadata:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)


def test_convert_onnx_writes_model_variants_and_contract(classifier_file, tmp_path):
    prep = Preprocessing(color="BGR", scale=1.0, mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0))
    result = convert.convert_onnx(
        classifier_file, tmp_path / "d.onnx", labels=["a", "b", "c"], preprocessing=prep,
        strides=[4, 2, (1, 1)],
    )  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["d.onnx", "d.s1.onnx", "d.s2.onnx"]
    meta = _ort_metadata(tmp_path / "d.onnx")  # read back the way the service reads it
    assert meta == result.metadata
    assert meta.geometry.window == (19, 19) and meta.geometry.stride == (4, 4)
    assert meta.geometry.receptive_field == (19, 19) and not meta.geometry.padded
    assert meta.labels == ("a", "b", "c") and meta.preprocessing == prep
    assert [(v.stride, v.file) for v in meta.variants] == [
        ((2, 2), "d.s2.onnx"),
        ((1, 1), "d.s1.onnx"),
    ]
    assert meta.output_kind == "logits" and meta.input_name == "input"
    assert meta.converter_version == importlib.metadata.version("densemap")
    assert meta.source == "cls.onnx"
    variant = _ort_metadata(tmp_path / "d.s2.onnx")
    assert variant.geometry.stride == (2, 2) and variant.variants == ()
    image = np.random.default_rng(0).standard_normal((2, 3, 30, 27)).astype(np.float32)
    score_map = ort32(onnx.load(str(tmp_path / "d.s2.onnx")), image)
    assert score_map.shape[0] == 2 and score_map.shape[1] == 3
    assert score_map.shape[2:] >= cell_counts((30, 27), (19, 19), (2, 2))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_verify_passes_for_an_unpadded_net(classifier_file, tmp_path, dtype):
    convert.convert_onnx(classifier_file, tmp_path / "d.onnx", preprocessing="unit")
    for classifier in (classifier_file, _unpadded()):
        report = convert.verify(classifier, tmp_path / "d.onnx", dtype=dtype)
        assert report.passed and not report.padded
        crop_rows = [row for row in report.rows if row.against.startswith("crops")]
        assert len(crop_rows) == 2 and all(row.limit is not None for row in crop_rows)
        assert {row.size[0] != row.size[1] for row in crop_rows} == {True}  # non-square
        assert report.max_checked_diff <= (1e-4 if dtype == "float32" else 1e-9)
        assert "PASSED" in report.table()


def test_verify_fails_on_a_wrong_dense_model(classifier_file, tmp_path):
    convert.convert_onnx(classifier_file, tmp_path / "d.onnx", preprocessing="unit")
    model = onnx.load(str(tmp_path / "d.onnx"))
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    last = floats[-1]  # the head's bias (the cell crop's constants are int64)
    last.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(last) + 0.01, last.name))
    onnx.save_model(model, str(tmp_path / "broken.onnx"))
    report = convert.verify(classifier_file, tmp_path / "broken.onnx")
    assert not report.passed
    assert "FAIL" in report.table()


@pytest.mark.slow
def test_padded_ceil_mode_net_matches_the_converted_torch_module(tmp_path):
    model = _padded_ceil()
    result = convert.convert_torch(
        model, tmp_path / "p.onnx", input_size=19, strides=[2], preprocessing="unit"
    )
    assert result.metadata.geometry.padded
    assert result.metadata.output_kind == "probabilities"
    report = convert.verify(model, result.path)
    assert report.passed and report.padded
    against = {row.against.split(" (")[0]: row for row in report.rows}
    assert against["crops"].limit is None and against["crops"].max_diff > 1e-4  # padding
    assert against["head on trunk windows"].max_diff <= against["head on trunk windows"].limit

    # ONNX path, fp64: the dense ONNX equals the converted torch module, map for map
    dense = rewrite_fc_head(export_classifier(model, 19, dynamo=True))
    module = convert.fully_convolutional(model, input_size=19).double()
    size = (19 + 4 * 2 + 2, 19 + 4 * 3 + 2)  # W mod 4 != 0: ceil_mode adds a partial cell
    image = np.random.default_rng(3).standard_normal((1, 3, *size))
    with torch.no_grad():
        expected = module(torch.from_numpy(image)).numpy()
    score_map = dense64(dense, image)
    assert score_map.shape == expected.shape
    np.testing.assert_allclose(score_map, expected, rtol=0, atol=1e-9)
    n = cell_counts(size, (19, 19), (4, 4))
    assert score_map.shape[2:] == (n[0] + 1, n[1] + 1)
    assert score_map[0, :, : n[0], : n[1]].shape[1:] == n  # the crop rule keeps n


def _bad(kind, classifier_file, out_dir, monkeypatch):
    out = out_dir / "d.onnx"
    if kind == "labels":
        return convert.convert_onnx(
            classifier_file, out, labels=["only", "two"], preprocessing="unit"
        )
    if kind == "preprocessing":
        return convert.convert_onnx(classifier_file, out, preprocessing=Preprocessing(color="L", mean=(0,), std=(1,)))  # fmt: skip
    if kind == "stride":
        return convert.convert_onnx(classifier_file, out, strides=[3], preprocessing="unit")
    if kind == "folder":  # the folders created for the output go too
        return convert.convert_onnx(
            classifier_file, out_dir / "new" / "d.onnx", labels=["a"], preprocessing="unit"
        )
    if kind == "replace":
        calls = []

        def failing_replace(src, dst):
            calls.append(dst)
            if len(calls) == 2:
                raise OSError("disk full")
            os.rename(src, dst)

        monkeypatch.setattr(pipeline.os, "replace", failing_replace)
        return convert.convert_onnx(classifier_file, out, strides=[2], preprocessing="unit")
    source = out_dir.parent / f"{kind}.onnx"
    data = classifier_file.read_bytes()
    source.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not onnx"}[kind])
    return convert.convert_onnx(source, out, preprocessing="unit")


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("labels", "2 labels were given but the model has 3 classes"),
        ("preprocessing", "1 channels but the model reads 3"),
        ("stride", r"does not divide .*supported output strides: height \[4, 2, 1\]"),
        ("folder", "1 labels were given"),
        ("replace", "cannot write"),
        ("truncated", "not a readable ONNX model"),
        ("garbage", "not a readable ONNX model|holds no ONNX graph"),
    ],
)
def test_failures_leave_nothing_at_the_output(kind, message, classifier_file, tmp_path, monkeypatch):  # fmt: skip
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ConversionError, match=message):
        _bad(kind, classifier_file, out_dir, monkeypatch)
    assert os.listdir(out_dir) == []  # no model, no variant, no temp folder


def test_missing_output_folders_are_created(classifier_file, tmp_path):
    out = tmp_path / "repo" / "my model" / "1" / "model.onnx"
    result = convert.convert_onnx(classifier_file, out, strides=[2], preprocessing="unit")
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.s2.onnx"]
    assert result.path == out
    with pytest.raises(ConversionError, match="is a folder"):
        convert.convert_onnx(classifier_file, out.parent, preprocessing="unit")
    with pytest.raises(ConversionError, match="cannot create the output folder"):
        convert.convert_onnx(classifier_file, out / "below a file.onnx", preprocessing="unit")


def test_missing_classifier_file(tmp_path):
    with pytest.raises(ConversionError, match="no such file"):
        convert.convert_onnx(tmp_path / "nope.onnx", tmp_path / "d.onnx", preprocessing="unit")


def test_external_data_past_the_threshold(classifier_file, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "EXTERNAL_DATA_THRESHOLD", 0)
    result = convert.convert_onnx(classifier_file, tmp_path / "d.onnx", preprocessing="unit")
    assert sorted(os.listdir(tmp_path)) == ["d.onnx", "d.onnx.data"]
    assert _ort_metadata(result.path) == result.metadata
    assert convert.verify(classifier_file, result.path).passed


def test_import_convert_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, convert, densemap.convert.cli; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_verify_an_nhwc_classifier_with_a_fixed_batch(tmp_path):
    """Keras-style graph: NHWC input, batch fixed at 1, H,W,C flatten, softmax output."""
    onnx.save_model(keras_style_classifier(), str(tmp_path / "keras.onnx"))
    result = convert.convert_onnx(
        tmp_path / "keras.onnx", tmp_path / "d.onnx", strides=[1], preprocessing="unit"
    )
    assert result.metadata.preprocessing.layout == "NHWC"
    assert result.metadata.output_kind == "probabilities"
    report = convert.verify(tmp_path / "keras.onnx", result.path, dtype="float64")
    assert report.passed and report.max_checked_diff <= 1e-9
