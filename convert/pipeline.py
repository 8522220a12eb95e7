"""The one finishing path of both converters: geometry, metadata, checks, atomic write.

:func:`finish_dense` takes a dense ONNX model (from the torch or the ONNX path), computes
its geometry from the graph, builds the à-trous variants, writes the metadata contract,
checks every model with ``onnx.checker`` and one onnxruntime run (CPU) on an image of
R + 2S, and only then moves the files into place. Nothing is left at the output path
when any step fails: the files are written into a temporary folder beside the output and
renamed with ``os.replace``.

Every output of the dense model is a head (:mod:`densemap.convert.heads`): one geometry for all,
each named, typed and labelled in the metadata (contract version 2), the primary first.

Cell cropping rule: a dense trunk may return more cells than n = (W - R) // S + 1 per axis
(ceil_mode pooling, or a trunk that ignores trailing pixels of R). Every written model,
variants included, crops its outputs to exactly n in the graph (:mod:`densemap.convert.cell_crop`,
from the input's dynamic shape), so it stands alone in any runtime; the engine and
:mod:`densemap.convert.verify` still keep the first n of older models that return more.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from densemap.convert.atrous import make_atrous, supported_strides
from densemap.convert.cell_crop import crop_to_cells
from densemap.convert.from_onnx.graph import image_input, static_dims
from densemap.convert.geometry import compute_geometry, trace_graph
from densemap.convert.heads import (
    HeadOptions,
    check_channels,
    dense_outputs,
    heads_geometry,
    resolve_heads,
)
from densemap.convert.int8 import (
    NetPaths,
    check_calibration_folder,
    int8_file,
    int8_files,
    make_int8_copies,
)
from densemap.convert.preprocessing import preset as preprocessing_preset
from densemap.convert.preprocessing import resolve as resolve_preprocessing
from densemap.convert.runtime import cpu_session, image_shape, numpy_dtype, run_outputs
from densemap.service.contract import METADATA_KEY, Geometry, ModelMetadata, Preprocessing, Variant
from densemap.service.errors import ConversionError, ModelLoadError

Pair = tuple[int, int]
EXTERNAL_DATA_THRESHOLD = 2_000_000_000  # bytes of weights; protobuf's hard limit is 2 GiB


def converter_version() -> str:
    try:
        return importlib.metadata.version("densemap")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class ConversionResult:
    """What a conversion wrote: the main model, its metadata and the variant files."""

    path: Path
    metadata: ModelMetadata
    variant_paths: tuple[Path, ...] = ()
    # the primary head's final op: 'softmax', 'log_softmax', 'sigmoid' or None
    final_activation: str | None = None
    final_activations: dict[str, str | None] = field(default_factory=dict)  # per head name
    int8_paths: tuple[Path, ...] = ()  # the int8 copies, main net's first (--int8-calibration)


def as_pair(value, name: str) -> Pair:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ConversionError(f"{name} must be an int or (h, w), got {value!r}") from None
    if h < 1 or w < 1:
        raise ConversionError(f"{name} must be positive, got {value!r}")
    return (h, w)


def default_preprocessing(layout: str, channels: int) -> Preprocessing:
    """Pixels / 255 (``unit``), for a direct :func:`finish_dense` call that names none (the
    tests' small nets). ``convert_onnx``, ``convert_torch`` and the command line never get
    here: they refuse to guess."""
    return preprocessing_preset("unit", layout=layout, channels=channels)


def _check_preprocessing(prep: Preprocessing, layout: str, channels: int) -> None:
    if prep.layout != layout:
        raise ConversionError(
            f"preprocessing says layout {prep.layout} but the model input is {layout}"
        )
    if prep.channels != channels:
        raise ConversionError(
            f"preprocessing color {prep.color!r} has {prep.channels} channels but the model "
            f"reads {channels}"
        )


def variant_file(output: Path, stride: Pair) -> str:
    stem = output.name[: -len(".onnx")] if output.name.endswith(".onnx") else output.name
    tag = f"{stride[0]}" if stride[0] == stride[1] else f"{stride[0]}x{stride[1]}"
    return f"{stem}.s{tag}.onnx"


def _with_metadata(model: onnx.ModelProto, metadata: ModelMetadata) -> onnx.ModelProto:
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in kept}, **metadata.to_props()})
    return model


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(init.raw_data) or init.ByteSize() for init in model.graph.initializer)


def _save(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Save as one file, or with one external data file past 2 GB; returns the files."""
    if _weight_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path))
        return [path]
    data = path.with_name(path.name + ".data")
    onnx.save_model(
        model, str(path), save_as_external_data=True, location=data.name, size_threshold=0
    )
    return [path, data]


def _check_runs(path: Path, geometry: Geometry, prep: Preprocessing) -> dict[str, int]:
    """onnx.checker plus one onnxruntime run on an R + 2S image; returns each output's
    channel count, by name."""
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as exc:
        raise ConversionError(f"the dense model fails onnx.checker: {exc}") from None
    session = cpu_session(str(path))
    size = tuple(r + 2 * s for r, s in zip(geometry.window, geometry.stride, strict=True))
    shape = image_shape(layout=prep.layout, channels=prep.channels, size=size)
    image = np.random.default_rng(0).random(shape).astype(numpy_dtype(session))
    outputs = run_outputs(session, image)
    expected = geometry.cells(*size)
    channels = {}
    for name, scores in outputs.items():
        what = f"output {name!r}" if len(outputs) > 1 else "scores"
        if scores.ndim != 4 or tuple(scores.shape[2:]) != expected:
            raise ConversionError(
                f"the dense model gives {what} of shape {list(scores.shape)} on a {size} "
                f"image, expected [1, classes, {expected[0]}, {expected[1]}]"
            )
        if not np.all(np.isfinite(scores)):
            raise ConversionError(f"the dense model gives non-finite {what} on a random image")
        channels[name] = int(scores.shape[1])
    return channels


def finish_dense(
    dense: onnx.ModelProto,
    output: str | os.PathLike,
    *,
    window: Pair | int,
    preprocessing: Preprocessing | str | None = None,
    labels: tuple[str, ...] | list[str] = (),
    source: str = "",
    strides=(),
    heads: HeadOptions | None = None,
    random_weights: bool = False,
    int8_calibration: str | os.PathLike | None = None,
) -> ConversionResult:
    """Check ``dense``, add its metadata and variants, and write them atomically.

    Every output of ``dense`` is a head (:mod:`densemap.convert.heads`); ``labels`` are the primary
    head's, ``heads`` names kinds, labels and the primary head. ``random_weights`` records
    in the metadata that the weights were never trained. ``int8_calibration``: a folder of
    images; every net also gets an int8 copy calibrated on them (:mod:`densemap.convert.int8`),
    recorded in the metadata with its measured deviation from fp32."""
    output = Path(output)
    if output.is_dir():
        raise ConversionError(
            f"output {output} is a folder: give a file path, e.g. {output}/dense.onnx"
        )
    window = as_pair(window, "window")
    if int8_calibration is not None:
        check_calibration_folder(Path(int8_calibration))  # before the slow steps
    resolved = resolve_heads(dense_outputs(dense), heads, labels=tuple(labels))
    geometry = heads_geometry(dense, window=window)
    layout = trace_graph(dense).layout
    image = image_input(dense.graph)
    channels = static_dims(image)[1 if layout == "NCHW" else 3]
    prep = (
        default_preprocessing(layout, channels)
        if preprocessing is None
        else resolve_preprocessing(preprocessing, layout=layout, channels=channels)
    )
    _check_preprocessing(prep, layout, channels)
    variants = _variants(dense, output, geometry, strides)
    primary = resolved.primary
    metadata = ModelMetadata(
        geometry=geometry,
        preprocessing=prep,
        labels=primary.labels,
        output_kind=primary.kind,
        input_name=image.name,
        output_name=primary.name,
        extra_heads=resolved.heads[1:],
        variants=tuple(Variant(stride=v_geom.stride, file=name) for name, _, v_geom in variants),
        source=source,
        converter_version=converter_version(),
        random_weights=random_weights,
    )
    created = _make_folders(output.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        staged, metadata = _stage(staging, output, dense, metadata, variants, int8_calibration)
        result = _move_into_place(staged, output, metadata)
        created = []
        finals = resolved.final_activations
        return replace(
            result, final_activation=finals[primary.name], final_activations=dict(finals)
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(created):  # a failed conversion leaves no new folders either
            with contextlib.suppress(OSError):
                folder.rmdir()


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents (like ``mkdir -p``); returns the new ones."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConversionError(f"cannot create the output folder {folder}: {exc}") from None
    return missing


def _variants(dense, output, geometry, strides) -> list:
    wanted = []
    for value in strides:
        stride = as_pair(value, "stride")
        if stride != geometry.stride and stride not in wanted:
            wanted.append(stride)
    result = []
    for stride in wanted:
        if any(s % t for s, t in zip(geometry.stride, stride, strict=True)):
            options = supported_strides(dense)
            raise ConversionError(
                f"stride {stride} does not divide the native stride {geometry.stride}; "
                f"supported output strides: height {sorted({h for h, _ in options})[::-1]}, "
                f"width {sorted({w for _, w in options})[::-1]}"
            )
        factor = tuple(s // t for s, t in zip(geometry.stride, stride, strict=True))
        model = make_atrous(dense, factor=factor)
        # same padded flag as the native model (ceil_mode overhang became end pads)
        v_geom = replace(compute_geometry(model, window=geometry.window), padded=geometry.padded)
        result.append((variant_file(output, stride), model, v_geom))
    return result


def _stage(staging: Path, output: Path, dense, metadata, variants, int8_calibration):
    """Write and check every file in ``staging``; returns (staged, final) path pairs and
    the metadata written (with the int8 copies' when ``int8_calibration`` is a folder)."""
    main = _with_metadata(_cropped(_copy(dense), metadata.geometry, metadata), metadata)
    main_files = _save(main, staging / output.name)
    channels = _check_runs(main_files[0], metadata.geometry, metadata.preprocessing)
    check_channels(metadata.heads, channels)
    files = [*main_files]
    for name, model, v_geom in variants:
        v_meta = ModelMetadata(**{**metadata.__dict__, "geometry": v_geom, "variants": ()})
        v_files = _save(_with_metadata(_cropped(model, v_geom, metadata), v_meta), staging / name)
        v_channels = _check_runs(v_files[0], v_geom, metadata.preprocessing)
        if v_channels != channels:
            raise ConversionError(f"variant gives channels {v_channels}, expected {channels}")
        files = [*v_files, *files]
    if int8_calibration is not None:
        metadata = _stage_int8(staging, output, metadata, Path(int8_calibration))
        _save(_with_metadata(main, metadata), staging / output.name)  # now naming them
        files = [*(staging / name for name in int8_files(metadata.int8)), *files]
    return [(path, output.parent / path.name) for path in files], metadata


def _stage_int8(staging: Path, output: Path, metadata, calibration: Path) -> ModelMetadata:
    """Write the int8 copy of every staged net (main first) and return the metadata that
    records them (:mod:`densemap.convert.int8`)."""
    nets = [
        NetPaths(staging / output.name, staging / int8_file(output.name), metadata.geometry.stride)
    ]
    nets += [
        NetPaths(staging / v.file, staging / int8_file(v.file), v.stride) for v in metadata.variants
    ]
    copies = make_int8_copies(
        nets,
        calibration,
        preprocessing=metadata.preprocessing,
        window=metadata.geometry.window,
        input_name=metadata.input_name,
        output_name=metadata.output_name,
        probabilities=metadata.output_kind != "logits",
    )
    return replace(metadata, int8=copies)


def _cropped(model: onnx.ModelProto, geometry: Geometry, metadata) -> onnx.ModelProto:
    """``model`` with its outputs cropped to n cells per axis in the graph."""
    return crop_to_cells(
        model,
        window=geometry.window,
        stride=geometry.stride,
        layout=metadata.preprocessing.layout,
    )


def _move_into_place(staged, output: Path, metadata) -> ConversionResult:
    moved: list[Path] = []
    try:
        for source, target in staged:
            os.replace(source, target)
            moved.append(target)
    except OSError as exc:
        for target in moved:
            target.unlink(missing_ok=True)
        raise ConversionError(f"cannot write {output}: {exc}") from None
    variant_paths = tuple(output.parent / v.file for v in metadata.variants)
    int8_paths = tuple(output.parent / name for name in int8_files(metadata.int8))
    return ConversionResult(
        path=output, metadata=metadata, variant_paths=variant_paths, int8_paths=int8_paths
    )


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def read_metadata(path: str | os.PathLike) -> ModelMetadata:
    """The contract stored in a dense model written by :func:`finish_dense`."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise ModelLoadError(f"cannot read ONNX model {path}: {exc}") from None
    return ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
