"""``verify`` means what it says: its limit follows the classifier's own float32 rounding.

The limit is 8 x max|fp32 - fp64| of the classifier at R (floor: 16 eps32 x max|score|),
so a wrong conversion fails at any logit scale and a correct one with a large dynamic range (ConvMixer-like: BatchNorm cancelling large activations) passes. The
old rule, 1e-4 x max(1, max|score|), got both wrong: the tests show it would have.
"""

from __future__ import annotations

import importlib

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import densemap.convert as convert
from densemap.convert import archs
from tests.convert.test_atrous_ceil import POOLS, WINDOW, CeilOverhang
from tests.support.convert_onnx_support import export_classifier

verify_module = importlib.import_module(
    "densemap.convert.verify"
)  # `densemap.convert.verify` is the function
classifier_runner = importlib.import_module("densemap.convert.classifier_runner")
OLD_RELATIVE = 1e-4  # the fixed rule before: 1e-4 x max(1, max|score|)


def _old_limit(model: nn.Module, channels: int, size) -> float:
    with torch.no_grad():
        scale = model(torch.randn(64, channels, *size)).abs().max().item()
    return OLD_RELATIVE * max(1.0, scale)


def _lenet(scale: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    model = archs.build("lenet5").eval()
    with torch.no_grad():
        model.classifier[-1].weight.mul_(scale)
        model.classifier[-1].bias.mul_(scale)
    return model


def _perturb(path, out, name: str, relative: float = 1e-3):
    """Copy the model at ``path`` to ``out`` with the largest weight of ``name`` times
    (1 + relative): a conversion that is wrong by that much."""
    model = onnx.load(str(path))
    for tensor in model.graph.initializer:
        if tensor.name == name:
            values = numpy_helper.to_array(tensor).copy()
            flat = values.reshape(-1)
            flat[np.abs(flat).argmax()] *= 1 + relative
            tensor.CopyFrom(numpy_helper.from_array(values, name))
            onnx.save_model(model, str(out))
            return out
    raise AssertionError(f"no initializer {name!r} in {path}")


@pytest.mark.slow
@pytest.mark.parametrize("scale", [1.0, 1e-9])
def test_one_weight_off_by_a_relative_1e3_fails_at_any_logit_scale(scale, tmp_path):
    model = _lenet(scale)
    result = convert.convert_torch(model, tmp_path / "d.onnx", input_size=32, preprocessing="unit")
    good = convert.verify(model, result.path)
    assert good.passed, good.table()
    wrong = _perturb(result.path, tmp_path / "wrong.onnx", "features.0.weight")
    report = convert.verify(model, wrong)
    assert not report.passed
    assert [row.verdict for row in report.rows] == ["FAIL"] * 5, report.table()
    assert report.max_checked_diff < _old_limit(model, 1, (32, 32))  # the old rule: PASSED
    rounding = report.tolerance.rounding
    assert 0 < rounding < 1e-6 * scale  # measured at this scale, not clamped to 1
    assert all(8 * rounding <= row.limit < 1e-5 * scale for row in report.rows)


class Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def _offset_conv(cin, cout, kernel, offset, **kwargs) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel, **kwargs)
    with torch.no_grad():
        conv.bias.add_(offset)
    return conv


def _offset_norm(dim: int, offset: float) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(dim)
    with torch.no_grad():
        norm.running_mean.fill_(offset)  # cancels the large activations before it
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm


def convmixer_like(offset: float = 1e4, dim: int = 16, kernel: int = 9) -> nn.Module:
    """Patch stem, residual depthwise convs with a large kernel, GELU, BatchNorm, global
    pool: activations around ``offset`` that BatchNorm brings back to O(1), as in trained
    ConvMixers, so float32 loses about eps x offset in every block."""
    torch.manual_seed(0)
    layers = [_offset_conv(3, dim, 4, offset, stride=4), nn.GELU(), _offset_norm(dim, offset)]
    for _ in range(2):
        depthwise = _offset_conv(dim, dim, kernel, offset, groups=dim, padding=kernel // 2)
        layers += [
            Residual(nn.Sequential(depthwise, nn.GELU(), _offset_norm(dim, offset))),
            _offset_conv(dim, dim, 1, offset), nn.GELU(), _offset_norm(dim, offset),
        ]  # fmt: skip
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dim, 5)]
    return nn.Sequential(*layers).eval()


@pytest.fixture(scope="module")
def convmixer():
    return convmixer_like()


@pytest.mark.slow
def test_a_correct_convmixer_like_conversion_passes_on_both_paths(convmixer, tmp_path):
    old_limit = _old_limit(convmixer, 3, (32, 32))
    result = convert.convert_torch(
        convmixer, tmp_path / "t.onnx", input_size=32, strides=[2], preprocessing="unit"
    )
    report = convert.verify(convmixer, result.path)
    assert report.passed and report.padded, report.table()
    assert report.max_checked_diff > old_limit  # the old rule FAILED this correct conversion
    assert {row.against for row in report.rows if row.limit is not None} == {
        "classifier, whole window (8)",
        "head on trunk windows (12 windows)",
        "head on trunk windows (8 windows)",
        "native map, every k-th cell",
    }  # the converted torch module only where no exact reference is
    classifier = tmp_path / "classifier.onnx"
    onnx.save_model(export_classifier(convmixer, 32, dynamo=True), str(classifier))
    result = convert.convert_onnx(
        classifier, tmp_path / "o.onnx", strides=[2], preprocessing="unit"
    )
    report = convert.verify(classifier, result.path)  # onnxruntime on both sides here
    assert report.passed, report.table()


@pytest.mark.slow
def test_a_wrong_convmixer_like_conversion_fails(convmixer, tmp_path):
    """The limit is loose where the classifier itself rounds a lot, not blind: the head's
    largest weight off by 5% fails."""
    result = convert.convert_torch(
        convmixer, tmp_path / "t.onnx", input_size=32, preprocessing="unit"
    )
    initializers = onnx.load(str(result.path)).graph.initializer
    (head,) = [t.name for t in initializers if tuple(t.dims) == (5, 16, 1, 1)]
    report = convert.verify(convmixer, _perturb(result.path, tmp_path / "w.onnx", head, 0.05))
    assert not report.passed, report.table()


@pytest.mark.slow
def test_variants_are_verified_at_their_own_stride(tmp_path):
    model = _lenet()
    result = convert.convert_torch(
        model, tmp_path / "d.onnx", input_size=32, strides=[2], preprocessing="unit"
    )
    variant = result.variant_paths[0]
    _perturb(variant, variant, "features.0.weight")  # only the variant is wrong
    report = convert.verify(model, result.path)
    assert not report.passed
    verdicts = {(row.net, row.against): row.verdict for row in report.rows}
    assert verdicts == {
        ("", "classifier, whole window (8)"): "ok",
        ("", "head on trunk windows (12 windows)"): "ok",
        ("", "head on trunk windows (8 windows)"): "ok",
        ("", "crops (12 windows)"): "ok",
        ("", "crops (8 windows)"): "ok",
        ("d.s2.onnx", "classifier, whole window (8)"): "FAIL",
        ("d.s2.onnx", "crops (48 windows)"): "FAIL",  # 8 x 6 cells at stride 2 on 46x43
        ("d.s2.onnx", "crops (24 windows)"): "FAIL",
    }
    assert "  d.s2.onnx (a-trous variant):" in report.table().splitlines()


@pytest.mark.slow
def test_a_padded_variant_is_checked_against_the_native_map(tmp_path):
    model = CeilOverhang(POOLS["max"]()).eval()
    result = convert.convert_torch(
        model, tmp_path / "d.onnx", input_size=WINDOW, strides=[2], preprocessing="unit"
    )
    assert result.metadata.geometry.padded
    assert convert.verify(model, result.path).passed
    variant = result.variant_paths[0]
    weights = [t.name for t in onnx.load(str(variant)).graph.initializer if len(t.dims) == 4]
    _perturb(variant, variant, weights[1])  # the second conv: past R's first cell's reach
    report = convert.verify(model, result.path)
    failed = {(row.net, row.against) for row in report.rows if row.verdict == "FAIL"}
    assert ("d.s2.onnx", "native map, every k-th cell") in failed
    assert all(net == "d.s2.onnx" for net, _ in failed)


HEAD_NOTE = (
    "  head on trunk windows: the classifier cut where its head starts\n"
    "  ('/features/features.5/MaxPool_output_0', 2x2 at R); its head run on each window of its\n"
    "  trunk's output over the whole image: exact for every net, zero padding included.\n"
    "  padded net: each crop sees zero padding at its border where the dense pass sees real\n"
    "  neighbours (VGG paper sec. 3.2), so crop rows are information only.\n"
)


@pytest.mark.slow
def test_the_footnote_names_only_the_checks_that_ran(tmp_path):
    model = CeilOverhang(POOLS["max"]()).eval()
    classifier = tmp_path / "classifier.onnx"
    onnx.save_model(export_classifier(model, WINDOW, dynamo=False), str(classifier))
    convert.convert_onnx(classifier, tmp_path / "o.onnx", preprocessing="unit")
    report = convert.verify(classifier, tmp_path / "o.onnx")
    table = report.table()
    assert table.endswith(HEAD_NOTE + "  PASSED"), table
    assert "converted torch module" not in table
    crops = [row for row in report.rows if row.against.startswith("crops")]
    assert crops and all(row.verdict == "info (padding)" for row in crops)
    assert max(row.max_diff for row in crops) > 1e-3  # the padding, shown, not checked

    convert.convert_torch(
        model, tmp_path / "t.onnx", input_size=WINDOW, strides=[2], preprocessing="unit"
    )
    table = convert.verify(model, tmp_path / "t.onnx").table()
    assert table.endswith(
        HEAD_NOTE
        + "  Also checked for each variant against the native map on their shared cells.\n"
        "  PASSED"
    ), table


@pytest.mark.slow
def test_the_limit_line_says_where_the_numbers_come_from(tmp_path, monkeypatch):
    model = _lenet()
    result = convert.convert_torch(model, tmp_path / "d.onnx", input_size=32, preprocessing="unit")
    report = convert.verify(model, result.path)
    text = " ".join(report.table().split())
    rounding = report.tolerance.rounding
    assert (
        f"limit: max(8 x {rounding:.2e}, 16 eps32 x max|score|); {rounding:.2e} = the "
        "classifier's own float32 rounding, max|fp32 - fp64| on 8 windows of 32x32"
    ) in text
    f64 = convert.verify(model, result.path, dtype="float64")
    assert f64.passed and "limit: 1e-09 x max|score| (float64)" in f64.table()

    def no_float64(self):
        raise RuntimeError("no double kernel")

    monkeypatch.setattr(classifier_runner.Classifier, "float64_run", no_float64)
    report = convert.verify(model, result.path)
    assert report.passed and report.tolerance.rounding is None
    assert (
        "limit: 1e-04 x max|score|: the classifier's own float32 rounding was not measured "
        "(the classifier fails in float64: no double kernel)"
    ) in " ".join(report.table().split())


@pytest.mark.slow
def test_progress_goes_to_stderr_only_when_asked_or_on_a_terminal(tmp_path, capsys, monkeypatch):
    model = _lenet()
    result = convert.convert_torch(
        model, tmp_path / "d.onnx", input_size=32, strides=[2], preprocessing="unit"
    )
    capsys.readouterr()
    convert.verify(model, result.path)  # progress=None: stderr is not a terminal here
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(verify_module, "PROGRESS_DELAY", 0.0)
    convert.verify(model, result.path, progress=True)
    err = capsys.readouterr().err
    # 8 windows in fp64, 2 nets at R; 46x43: main pass + head on trunk windows + 2 batches
    # of 12 crops, variant pass + 6 batches of 48 crops; 37x46: 1 + 1 + 1 (8 crops),
    # 1 + 3 (24 crops)
    assert "verify: 100%" in err and "28/28" in err, err
