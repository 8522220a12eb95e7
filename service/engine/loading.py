"""Loading a model folder's ONNX files into :class:`~densemap.service.engine.dense.DenseNet` objects.

Reads the metadata contract (``onnx.load(..., load_external_data=False)``), opens the main
model and every à-trous variant named in the metadata (same folder), checks the input name
and that the outputs are the metadata's heads, each a map with the model's geometry
(:mod:`densemap.service.engine.heads`), the class and channel counts, and warms every session up
once on a window-size input.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from densemap.service.contract import ModelMetadata
from densemap.service.engine.cuda_driver import driver_cuda_version
from densemap.service.engine.dense import DenseNet, Grid
from densemap.service.engine.heads import HeadInfo, check_head_maps, check_outputs, describe_heads
from densemap.service.engine.memory import ActivationEstimator, nchwc_block
from densemap.service.engine.options import RUNTIME_MODULES, EngineConfig
from densemap.service.engine.precision import PrecisionSessions
from densemap.service.engine.session import (
    CPU,
    CUDA,
    create_session,
    cuda_fallback_reason,
)
from densemap.service.errors import ModelLoadError

log = logging.getLogger("densemap.engine")


@dataclass(frozen=True)
class LoadedModel:
    metadata: ModelMetadata
    labels: tuple[str, ...]
    num_classes: int
    nets: tuple[DenseNet, ...]  # main net first
    providers: tuple[str, ...]
    heads: tuple[HeadInfo, ...] = ()  # every head, primary first


def read_proto(path: Path) -> onnx.ModelProto:
    """The ONNX graph and metadata of ``path``, without external weight files."""
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, OSError...
        raise ModelLoadError(f"{path} is not a readable ONNX model: {exc}") from None


def parse_metadata(proto: onnx.ModelProto) -> ModelMetadata:
    """The contract of a loaded ONNX model (densemap.convert.pipeline.read_metadata reads a file's)."""
    return ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})


def _int8_path(path: Path, metadata: ModelMetadata, stride) -> Path | None:
    """The int8 copy of the net of ``stride`` at ``path`` (None: the model has none);
    ModelLoadError when the metadata names a copy that is not there."""
    copies = metadata.int8
    if copies is None:
        return None
    name = copies.file if stride == metadata.geometry.stride else copies.file_for(stride)
    if name is None:
        return None
    int8 = path.parent / name
    if not int8.is_file():
        raise ModelLoadError(
            f"{path.name}: its metadata names the int8 copy {name}, which is not beside it: "
            "copy it there, or reconvert the model"
        )
    return int8


def _open_net(path: Path, proto, metadata: ModelMetadata, grid: Grid, config) -> DenseNet:
    if config.runtime in RUNTIME_MODULES:  # torch is imported there, only then
        runtime = importlib.import_module(RUNTIME_MODULES[config.runtime])
        session, precisions = runtime.open_net(path, config)
    else:
        session = create_session(path, config)
        on_cuda = CUDA in session.get_providers()
        int8_path = _int8_path(path, metadata, grid.stride)
        precisions = PrecisionSessions(path, config, on_cuda=on_cuda, int8_path=int8_path)
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    check_outputs(metadata, inputs, outputs, file=path.name)
    # onnxruntime's CPU convolutions pad channels to blocks (NCHWc): count them there only
    ort_cpu = config.runtime != "torch" and CUDA not in session.get_providers()
    estimator = ActivationEstimator(
        proto,
        input_name=metadata.input_name,
        layout=metadata.preprocessing.layout,
        channel_block=nchwc_block() if ort_cpu else 1,
    )
    return DenseNet(
        session,
        precisions=precisions,
        grid=grid,
        estimator=estimator,
        input_name=metadata.input_name,
        output_name=metadata.output_name,
        layout=metadata.preprocessing.layout,
        label=path.name,
    )


def _variant_grid(main: Grid, stride, path: Path) -> Grid:
    if any(s < 1 or m % s for m, s in zip(main.stride, stride, strict=True)):
        raise ModelLoadError(
            f"variant {path.name}: stride {stride} must divide the native stride {main.stride}"
        )
    return Grid(stride, main.window, main.receptive_field, main.receptive_field_offset)


def _count_classes(net: DenseNet, channels: int, heads: tuple[str, ...]) -> dict[str, int]:
    """Run the net once on a window-size input (warm-up) and read the class count; with
    extra heads, each head's channels, checking that each has the primary's cells."""
    window = net.grid.window
    shape = (channels, *window)
    scores = net.run(np.zeros(shape, dtype=np.float32))
    if scores.shape[1:] != (1, 1):
        raise ModelLoadError(
            f"{net.label}: a window-size input gave {scores.shape[1:]} cells, expected 1x1"
        )
    counts = {heads[0]: int(scores.shape[0])}
    if len(heads) == 1:
        return counts
    for size in (window, tuple(r + s for r, s in zip(window, net.grid.stride, strict=True))):
        shapes = net.output_shapes(np.zeros((channels, *size), np.float32), heads)
        primary = shapes.pop(heads[0])
        check_head_maps(shapes, cells=primary[2:], size=size, file=net.label)
    counts.update((name, int(shape[1])) for name, shape in shapes.items())
    return counts


def load_nets(
    path: Path, *, config: EngineConfig, labels: Sequence[str] | None, name: str
) -> LoadedModel:
    """Open a converted model and its variants; raise ModelLoadError saying what is wrong."""
    started = time.perf_counter()
    proto = read_proto(path)
    metadata = parse_metadata(proto)
    geometry = metadata.geometry
    grid = Grid(
        geometry.stride, geometry.window, geometry.receptive_field, geometry.receptive_field_offset
    )
    nets = [_open_net(path, proto, metadata, grid, config)]
    del proto
    for variant in metadata.variants:
        variant_path = path.parent / variant.file
        variant_grid = _variant_grid(grid, variant.stride, variant_path)
        nets.append(
            _open_net(variant_path, read_proto(variant_path), metadata, variant_grid, config)
        )
    channels = metadata.preprocessing.channels
    names = tuple(head.name for head in metadata.heads)
    counts = {net.label: _count_classes(net, channels, names) for net in nets}
    if len({tuple(c.items()) for c in counts.values()}) != 1:
        what = "class count" if len(names) == 1 else "channels of their heads"
        flat = {label: c[names[0]] if len(names) == 1 else c for label, c in counts.items()}
        raise ModelLoadError(f"the model and its variants disagree on the {what}: {flat}")
    head_channels = next(iter(counts.values()))
    num_classes = head_channels[names[0]]
    if config.warmup:  # one multi-cell pass per net: first requests then run at steady speed
        for net in nets:
            size = [2 * r for r in net.grid.window]
            net.run(np.zeros((channels, *size), dtype=np.float32))
    chosen = tuple(labels) if labels is not None else metadata.labels
    if chosen and len(chosen) != num_classes:
        raise ModelLoadError(
            f"model {name!r} has {num_classes} classes but {len(chosen)} labels: fix the "
            "labels (labels.txt: one per line) or the metadata"
        )
    if metadata.random_weights:
        log.warning(
            "model %r was converted with random, untrained weights (--random-weights): "
            "its scores mean nothing",
            name,
        )
    providers = tuple(nets[0].session.get_providers())
    fallback = cuda_fallback_reason() if config.device == "auto" else None
    where = providers[0] + (
        f" (CUDA not used: {fallback})" if fallback and CPU == providers[0] else ""
    )
    extra = "".join(f", head {h.name!r} ({h.kind})" for h in metadata.extra_heads)
    # A GPU machine (a driver answers) scoring on the CPU is worth a warning, not an info line.
    gpu_unused = fallback is not None and driver_cuda_version() is not None
    log.log(
        logging.WARNING if gpu_unused else logging.INFO,
        "model %r loaded on %s: %d classes%s, stride %s, à-trous %s, %.2fs",
        name,
        where,
        num_classes,
        extra,
        geometry.stride,
        [v.stride for v in metadata.variants] or "none",
        time.perf_counter() - started,
    )
    chosen = tuple(str(x) for x in chosen)
    heads = describe_heads(metadata, head_channels, chosen)
    return LoadedModel(metadata, chosen, num_classes, tuple(nets), providers, heads)
