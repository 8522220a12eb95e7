"""Tiny dense ONNX models with densemap metadata, for tests and benchmarks (needs torch).

The nets are built in torch as already fully-convolutional networks (conv/pool trunk, then
a head conv whose kernel covers the trunk's output at the window size), exported with
``torch.onnx.export`` and given the metadata contract. À-trous variants are built by hand:
the strides of the last pools are removed and every later conv AND pool is dilated by the
removed factor, with its padding scaled by the same factor.

Public API:

- :func:`build_dense_model` writes ``model.onnx`` (+ ``model_s<stride>.onnx`` variants) into
  a folder and returns the path of ``model.onnx``.
- :func:`export_dense_net` writes a hand-built dense net with the metadata you give.
- :func:`make_dense_net` returns the torch module with the same weights (``seed``), e.g. in
  float64 (``.double()``) for reference crops.
- :func:`small_layers`, :func:`mini_vgg_layers`, :func:`vgg16_layers` are layer specs.
- :func:`build_two_head_model` writes a contract-v2 model with a class head and a box
  regression head over one trunk; :func:`make_two_head_net` rebuilds it in torch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from densemap.service.contract import Geometry, Head, ModelMetadata, Preprocessing, Variant


@dataclass(frozen=True)
class Conv:
    out_channels: int
    kernel: int = 3
    padding: int = 0


@dataclass(frozen=True)
class Pool:
    kernel: int = 2
    stride: int = 2
    ceil_mode: bool = False


Layer = Conv | Pool


def small_layers(*, padded: bool) -> tuple[Layer, ...]:
    """Two conv/pool stages, total stride 4."""
    pad = 1 if padded else 0
    return (Conv(4, 3, pad), Pool(), Conv(8, 3, pad), Pool())


def mini_vgg_layers(*, padded: bool = False) -> tuple[Layer, ...]:
    """Mini-VGG for a 64x64 window: total stride 8, ~30 MMAC per window (unpadded)."""
    pad = 1 if padded else 0
    return (
        Conv(16, 3, pad), Conv(24, 3, pad), Pool(),
        Conv(32, 3, pad), Conv(32, 3, pad), Pool(),
        Conv(64, 3, pad), Pool(),
    )  # fmt: skip


def vgg16_layers() -> tuple[Layer, ...]:
    """VGG-16 (configuration D) trunk: 13 same-padded 3x3 convs, 5 pools, stride 32."""
    layers: list[Layer] = []
    for width, count in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
        layers += [Conv(width, 3, 1)] * count + [Pool()]
    return tuple(layers)


def _trunk_size(layers, size: int) -> int:
    for layer in layers:
        if isinstance(layer, Conv):
            size = size + 2 * layer.padding - layer.kernel + 1
        else:
            span = size - layer.kernel
            size = (-(-span // layer.stride) if layer.ceil_mode else span // layer.stride) + 1
    return size


def _axis_geometry(layers, head_kernel: int) -> tuple[int, int, int]:
    """(stride, receptive field, offset) of one axis, padding included."""
    stride, field, pad = 1, 1, 0
    for layer in layers:
        field += (layer.kernel - 1) * stride
        pad += (layer.padding if isinstance(layer, Conv) else 0) * stride
        stride *= layer.stride if isinstance(layer, Pool) else 1
    return stride, field + (head_kernel - 1) * stride, -pad


def _removed_strides(layers, factor: int) -> set[int]:
    """Indices of the last pools whose strides an à-trous variant of ``factor`` removes."""
    removed, left = set(), factor
    for index in range(len(layers) - 1, -1, -1):
        if left == 1:
            break
        layer = layers[index]
        if isinstance(layer, Pool) and left % layer.stride == 0:
            removed.add(index)
            left //= layer.stride
    if left != 1:
        raise ValueError(f"no pools whose strides multiply to {factor}")
    return removed


def make_dense_net(
    *,
    layers: tuple[Layer, ...],
    window: tuple[int, int],
    channels: int,
    classes: int,
    hidden: int = 0,
    atrous: int = 1,
    softmax: bool = False,
    seed: int = 0,
) -> nn.Sequential:
    """The dense net (eval mode); ``atrous`` = k builds the variant of stride S/k."""
    head_kernel = tuple(_trunk_size(layers, r) for r in window)
    if min(head_kernel) < 1:
        raise ValueError(f"window {window} is too small for these layers")
    removed = _removed_strides(layers, atrous)
    modules: list[nn.Module] = []
    in_channels, dilation = channels, 1
    for index, layer in enumerate(layers):
        if isinstance(layer, Conv):
            conv = nn.Conv2d(in_channels, layer.out_channels, layer.kernel)
            conv.dilation, conv.padding = (dilation, dilation), (layer.padding * dilation,) * 2
            modules += [conv, nn.ReLU()]
            in_channels = layer.out_channels
        else:
            stride = 1 if index in removed else layer.stride
            modules.append(
                nn.MaxPool2d(layer.kernel, stride, dilation=dilation, ceil_mode=layer.ceil_mode)
            )
            if index in removed:
                dilation *= layer.stride
    head_out = hidden or classes
    head = nn.Conv2d(in_channels, head_out, head_kernel)
    head.dilation = (dilation, dilation)
    modules.append(head)
    if hidden:
        modules += [nn.ReLU(), nn.Conv2d(hidden, classes, 1)]
    if softmax:
        modules.append(nn.Softmax(dim=1))
    net = nn.Sequential(*modules)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            fan_in = param[0].numel() if param.dim() > 1 else 1
            param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
    return net.eval()


def _geometry(layers, window, *, padded: bool) -> Geometry:
    """The contract geometry of a dense net of ``layers`` trained on ``window``."""
    head_kernel = tuple(_trunk_size(layers, r) for r in window)
    axes = [_axis_geometry(layers, k) for k in head_kernel]
    stride = tuple(a[0] for a in axes)
    field = tuple(a[1] for a in axes)
    offset = tuple(a[2] for a in axes)
    effective = tuple(
        min(r, o + f) - max(0, o) for r, o, f in zip(window, offset, field, strict=True)
    )
    return Geometry(
        window=window,
        stride=stride,
        receptive_field=field,
        receptive_field_offset=offset,
        effective_window=effective,
        padded=padded,
    )


def _preprocessing(channels: int) -> Preprocessing:
    return Preprocessing(
        color="L" if channels == 1 else "RGB",
        scale=1 / 255,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
    )


def _export(
    net: nn.Module, path: Path, channels: int, window, metadata: ModelMetadata, output_names=None
) -> None:
    """Export ``net`` with dynamic H, W and write ``metadata`` into it; ``output_names``
    default to the primary head's."""
    example = torch.zeros(1, channels, *window)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (example,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=[metadata.input_name],
            output_names=list(output_names or [metadata.output_name]),
            dynamic_axes={metadata.input_name: {2: "height", 3: "width"}},
        )
    model = onnx.load(str(path))
    for key, value in metadata.to_props().items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def export_dense_net(
    net: nn.Module, path: str | Path, *, channels: int, window, metadata: ModelMetadata
) -> Path:
    """Export any dense torch ``net`` (e.g. a hand-built one) with ``metadata``; returns path."""
    _export(net, Path(path), channels, window, metadata)
    return Path(path)


def build_dense_model(
    tmp_dir: str | Path,
    *,
    padded: bool = False,
    window: tuple[int, int] = (12, 16),
    channels: int = 1,
    classes: int = 5,
    with_atrous: tuple[int, ...] = (),
    seed: int = 0,
    layers: tuple[Layer, ...] | None = None,
    hidden: int = 0,
    output_kind: str = "logits",
    labels: tuple[str, ...] | None = None,
    file_name: str = "model.onnx",
) -> Path:
    """Write a dense model (+ à-trous variants of the output strides ``with_atrous``).

    Returns the path of the main ONNX file. The same arguments given to
    :func:`make_dense_net` (``layers=small_layers(padded=...)`` by default) rebuild the
    torch net with identical weights.
    """
    folder = Path(tmp_dir)
    folder.mkdir(parents=True, exist_ok=True)
    layers = small_layers(padded=padded) if layers is None else layers
    softmax = output_kind == "probabilities"
    common = dict(layers=layers, window=window, channels=channels, classes=classes)
    common.update(hidden=hidden, softmax=softmax, seed=seed)
    variants = tuple(Variant(stride=s, file=f"model_s{s}.onnx") for s in with_atrous)
    geometry = _geometry(
        layers, window, padded=any(isinstance(x, Conv) and x.padding for x in layers)
    )
    stride = geometry.stride
    metadata = ModelMetadata(
        geometry=geometry,
        preprocessing=_preprocessing(channels),
        labels=tuple(labels) if labels is not None else tuple(f"class{i}" for i in range(classes)),
        output_kind=output_kind,
        variants=variants,
        source="tests/support/dense_models.py",
    )
    main = folder / file_name
    _export(make_dense_net(**common), main, channels, window, metadata)
    for variant in variants:
        factor = stride[0] // variant.stride[0]
        net = make_dense_net(**common, atrous=factor)
        _export(net, folder / variant.file, channels, window, metadata)
    return main


# -- several heads ----------------------------------------------------------------------------
BOX_LABELS = ("dx1", "dy1", "dx2", "dy2")


class TwoHeadNet(nn.Module):
    """A shared trunk with a class head and a box-regression head (both dense maps)."""

    def __init__(self, dense: nn.Sequential, box_head: nn.Conv2d) -> None:
        super().__init__()
        self.trunk = dense[:-1]
        self.classes = dense[-1]
        self.boxes = box_head

    def forward(self, x):
        features = self.trunk(x)
        return self.classes(features), self.boxes(features)


def make_two_head_net(
    *,
    layers: tuple[Layer, ...],
    window: tuple[int, int],
    channels: int,
    classes: int,
    box_channels: int = 4,
    box_kernel: tuple[int, int] | None = None,
    atrous: int = 1,
    seed: int = 0,
) -> TwoHeadNet:
    """The two-head net (eval mode): :func:`make_dense_net`'s trunk and class head (same
    weights for the same ``seed``) plus a ``box_channels`` regression head over the same
    trunk output. ``box_kernel`` other than the class head's kernel makes a head whose map
    does not have the model's geometry (for load-check tests)."""
    dense = make_dense_net(
        layers=layers, window=window, channels=channels, classes=classes, atrous=atrous, seed=seed
    )
    class_head = dense[-1]
    kernel = class_head.kernel_size if box_kernel is None else box_kernel
    box_head = nn.Conv2d(class_head.in_channels, box_channels, kernel, dilation=class_head.dilation)
    generator = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for param in box_head.parameters():
            fan_in = param[0].numel() if param.dim() > 1 else 1
            param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
    return TwoHeadNet(dense, box_head).eval()


def build_two_head_model(
    tmp_dir: str | Path,
    *,
    padded: bool = False,
    window: tuple[int, int] = (12, 16),
    channels: int = 3,
    classes: int = 5,
    box_channels: int = 4,
    box_kernel: tuple[int, int] | None = None,
    with_atrous: tuple[int, ...] = (),
    seed: int = 0,
    output_names: tuple[str, str] = ("scores", "boxes"),
    extra_heads: tuple[Head, ...] | None = None,
) -> Path:
    """Write a two-head dense model (contract v2: a class head ``scores`` of ``classes``
    logits and a regression head ``boxes`` of ``box_channels`` values) and its à-trous
    variants; returns the path of ``model.onnx``.

    ``output_names`` are the ONNX outputs' names and ``extra_heads`` the metadata's extra
    heads (default: ``Head("boxes", "regression", BOX_LABELS)``): tests give them
    disagreeing values to see the model refused. :func:`make_two_head_net` with the same
    arguments rebuilds the torch net.
    """
    folder = Path(tmp_dir)
    folder.mkdir(parents=True, exist_ok=True)
    layers = small_layers(padded=padded)
    if extra_heads is None:
        labels = BOX_LABELS if box_channels == len(BOX_LABELS) else ()
        extra_heads = (Head("boxes", "regression", labels),)
    variants = tuple(Variant(stride=s, file=f"model_s{s}.onnx") for s in with_atrous)
    geometry = _geometry(layers, window, padded=padded)
    stride = geometry.stride
    metadata = ModelMetadata(
        geometry=geometry,
        preprocessing=_preprocessing(channels),
        labels=tuple(f"class{i}" for i in range(classes)),
        output_name="scores",
        extra_heads=extra_heads,
        variants=variants,
        source="tests/support/dense_models.py (two heads)",
    )
    common = dict(layers=layers, window=window, channels=channels, classes=classes)
    common.update(box_channels=box_channels, box_kernel=box_kernel, seed=seed)
    for factor, name in [(1, "model.onnx")] + [
        (stride[0] // v.stride[0], v.file) for v in variants
    ]:
        net = make_two_head_net(**common, atrous=factor)
        _export(net, folder / name, channels, window, metadata, output_names)
    return folder / "model.onnx"
