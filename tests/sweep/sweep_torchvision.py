"""The architecture sweep: torchvision classifiers converted on both paths.

Run with ``make sweep`` (it installs torchvision 0.28.0 with ``--no-deps`` when missing);
the default ``make test`` does not collect this folder (files are named ``sweep_*.py``).

For every architecture of ``torchvision_zoo.CONVERTED`` and each path, the dense map of an
image a few strides larger than R must equal, cell by cell, the model's own head run on
that h x w window of its own trunk output (computed in torch, float64). That is exact for
padded nets too: crops would differ at their borders (padding), the trunk's windows do not.

- torch path: ``convert_classifier`` in float64 (to 1e-9 of the logit scale), then the
  whole product path (``export_onnx`` + ``finish_dense``: geometry, checker, a run) in
  float32 through onnxruntime (1e-4 of the logit scale, ``--verify``'s limit);
- ONNX path: the classifier exported by ``torch.onnx.export`` (dynamo; VGG-11 with the
  legacy exporter too), converted by ``convert.convert_onnx``, run by onnxruntime (1e-4).

``torchvision_zoo.REFUSED`` must be refused on both paths with the reason in its words.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: tests.support.*

from head_variants import HEAD_VARIANTS, MULTI_HEAD  # noqa: E402
from torchvision_zoo import CONVERTED, REFUSAL_WORDS, REFUSED  # noqa: E402

import densemap.convert as convert  # noqa: E402
from densemap.convert.export import export_classifier_onnx, export_onnx  # noqa: E402
from densemap.convert.from_torch.fc import convert_classifier  # noqa: E402
from densemap.convert.heads import HeadOptions  # noqa: E402
from densemap.convert.pipeline import finish_dense  # noqa: E402
from densemap.service.errors import ConversionError  # noqa: E402
from tests.support.convert_onnx_support import export_classifier, ort32

FP64_TOLERANCE = 1e-9
FP32_TOLERANCE = 1e-4
ARCHS = {**CONVERTED, **HEAD_VARIANTS}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = ARCHS[name].build().eval()
    for module in model.modules():  # BatchNorm statistics as after training
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model


def _image(window: int) -> torch.Tensor:
    """Non-square, a few strides larger than R (strides here are 8 to 32)."""
    generator = torch.Generator().manual_seed(1)
    return torch.rand(1, 3, window + 69, window + 37, generator=generator, dtype=torch.float64)


def head_on_trunk_windows(name: str, model: nn.Module, image: torch.Tensor) -> np.ndarray:
    """[classes, n_h, n_w]: the model's head on every h x w window of its trunk output on
    ``image``, h x w being the trunk's output size at R; float64."""
    arch = ARCHS[name]
    model = model.double()
    with torch.no_grad():
        at_window = arch.trunk(model, torch.zeros(1, 3, arch.window, arch.window).double())
        features = arch.trunk(model, image)
        h, w = at_window.shape[2:]
        n_h, n_w = features.shape[2] - h + 1, features.shape[3] - w + 1
        assert n_h >= 2 and n_w >= 2, (n_h, n_w)
        windows = [features[:, :, i : i + h, j : j + w] for i in range(n_h) for j in range(n_w)]
        scores = arch.head(model, torch.cat(windows))  # (n_h * n_w, classes)
    return scores.reshape(n_h, n_w, -1).permute(2, 0, 1).numpy()


def _assert_map(score_map: np.ndarray, expected: np.ndarray, tolerance: float) -> None:
    assert score_map.shape == expected.shape, (score_map.shape, expected.shape)
    scale = max(1.0, float(np.abs(expected).max()))
    diff = float(np.abs(score_map - expected).max())
    assert diff <= tolerance * scale, f"max |diff| {diff:.3g} > {tolerance} x {scale:.3g}"


def _cells_in_image(expected: np.ndarray, result, image: torch.Tensor) -> np.ndarray:
    """The reference cut to the n = (W - R) // S + 1 cells whose windows lie inside the image:
    a padded trunk has more windows (they overhang the image), and written files crop their
    map to n in the graph (the converted torch module does not)."""
    n_h, n_w = result.metadata.geometry.cells(*image.shape[2:])
    assert n_h <= expected.shape[1] and n_w <= expected.shape[2]
    return expected[:, :n_h, :n_w]


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_torch_path_equals_head_on_trunk_windows(name, tmp_path):
    model = _model(name)
    window = ARCHS[name].window
    image = _image(window)
    expected = head_on_trunk_windows(name, model, image)
    conversion = convert_classifier(model.double(), input_size=window)
    with torch.no_grad():
        score_map = conversion.module(image).numpy()[0]
    _assert_map(score_map, expected, FP64_TOLERANCE)
    dense = export_onnx(conversion.module.float(), input_size=window, in_channels=3)
    result = finish_dense(dense, tmp_path / "dense.onnx", window=window, source=name)
    written = ort32(onnx.load(str(result.path)), image.numpy())[0]
    _assert_map(written, _cells_in_image(expected, result, image), FP32_TOLERANCE)


ONNX_CASES = [(name, True) for name in sorted(ARCHS)] + [
    ("vgg11", False),
    ("shufflenet_v2_x0_5", False),
]


@pytest.mark.parametrize(("name", "dynamo"), ONNX_CASES)
def test_onnx_path_equals_head_on_trunk_windows(name, dynamo, tmp_path):
    model = _model(name)
    window = ARCHS[name].window
    image = _image(window)
    expected = head_on_trunk_windows(name, model, image)
    classifier = export_classifier(model.float(), window, dynamo=dynamo)
    onnx.save(classifier, str(tmp_path / "classifier.onnx"))
    result = convert.convert_onnx(
        tmp_path / "classifier.onnx", tmp_path / "dense.onnx", preprocessing="unit"
    )
    score_map = ort32(onnx.load(str(result.path)), image.numpy())[0]
    _assert_map(score_map, _cells_in_image(expected, result, image), FP32_TOLERANCE)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_on_the_torch_path_with_the_reason(name):
    build, window = REFUSED[name]
    with pytest.raises(ConversionError, match=REFUSAL_WORDS[name]):
        convert_classifier(build().eval(), input_size=window)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_on_the_onnx_path_with_the_reason(name, tmp_path):
    build, window = REFUSED[name]
    onnx.save(export_classifier(build().eval(), window, dynamo=True), str(tmp_path / "c.onnx"))
    with pytest.raises(ConversionError, match=REFUSAL_WORDS[name]):
        convert.convert_onnx(tmp_path / "c.onnx", tmp_path / "dense.onnx", preprocessing="unit")
    assert not (tmp_path / "dense.onnx").exists()


HEAD_NAMES = ("scores", "boxes")


def heads_on_trunk_windows(model: nn.Module, image: torch.Tensor) -> dict[str, np.ndarray]:
    """{head: [channels, n_h, n_w]}: each head of the two-head variant on every window of
    its trunk output, float64."""
    arch = MULTI_HEAD
    model = model.double()
    with torch.no_grad():
        h, w = arch.trunk(model, torch.zeros(1, 3, arch.window, arch.window).double()).shape[2:]
        features = arch.trunk(model, image)
        n_h, n_w = features.shape[2] - h + 1, features.shape[3] - w + 1
        windows = [features[:, :, i : i + h, j : j + w] for i in range(n_h) for j in range(n_w)]
        outputs = arch.head(model, torch.cat(windows))
    return {
        name: out.reshape(n_h, n_w, -1).permute(2, 0, 1).numpy()
        for name, out in zip(HEAD_NAMES, outputs, strict=True)
    }


def _run_heads(path: Path, image: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    values = session.run(list(HEAD_NAMES), {session.get_inputs()[0].name: image})
    return {name: value[0] for name, value in zip(HEAD_NAMES, values, strict=True)}


def _multi_head_model() -> nn.Module:
    torch.manual_seed(0)
    return MULTI_HEAD.build().eval()


def test_several_heads_on_the_torch_path():
    model = _multi_head_model()
    image = _image(MULTI_HEAD.window)
    expected = heads_on_trunk_windows(model, image)
    conversion = convert_classifier(model.double(), input_size=MULTI_HEAD.window)
    with torch.no_grad():
        maps = conversion.module(image)
    for name, score_map in zip(HEAD_NAMES, maps, strict=True):
        _assert_map(score_map.numpy()[0], expected[name], FP64_TOLERANCE)


@pytest.mark.parametrize("dynamo", [True, False])
def test_several_heads_on_the_onnx_path(dynamo, tmp_path):
    model = _multi_head_model()
    image = _image(MULTI_HEAD.window)
    expected = heads_on_trunk_windows(model, image)
    window = (MULTI_HEAD.window, MULTI_HEAD.window)
    classifier = export_classifier_onnx(
        model.float(), input_size=window, in_channels=3, dynamo=dynamo, output_names=HEAD_NAMES
    )
    onnx.save(classifier, str(tmp_path / "classifier.onnx"))
    heads = HeadOptions(kinds={"boxes": "regression"})
    result = convert.convert_onnx(
        tmp_path / "classifier.onnx", tmp_path / "dense.onnx", heads=heads, preprocessing="unit"
    )
    assert [(h.name, h.kind) for h in result.metadata.heads] == [
        ("scores", "logits"),
        ("boxes", "regression"),
    ]
    maps = _run_heads(result.path, image.numpy().astype(np.float32))
    for name in HEAD_NAMES:
        _assert_map(maps[name], expected[name], FP32_TOLERANCE)
