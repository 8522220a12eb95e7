"""densemap.v1 messages <-> numpy arrays and engine types, in both directions.

The server decodes requests and encodes responses; :mod:`densemap.service.client` does the
opposite with the same functions, so both sides agree on one wire format: raw
little-endian row-major bytes with shape and dtype (:class:`Tensor`).
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import numpy as np

from densemap.service._proto.densemap.v1 import densemap_pb2 as pb
from densemap.service.engine.options import DEFAULT_IMAGE_TOP_K, ScoreOptions
from densemap.service.engine.result import MapGeometry, PrecisionReport, ScaleMap, ScoreResult
from densemap.service.errors import InvalidImage, InvalidOption
from densemap.service.server.detection_codec import (
    detection_options_from_proto,
    detection_options_to_proto,
    detections_from_response,
    fill_detections,
)
from densemap.service.server.head_codec import (
    fill_head_maps,
    heads_from_proto,
    heads_to_proto,
    read_head_maps,
)
from densemap.service.server.request_counts import check_rank

WIRE_DTYPES: dict[int, np.dtype] = {
    pb.UINT8: np.dtype("<u1"),
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.INT32: np.dtype("<i4"),
}
IMAGE_DTYPES = {pb.UINT8: (2, 3), pb.FLOAT32: (3,)}  # accepted dtype -> accepted ranks
MAP_DTYPES = {"float32": pb.FLOAT32, "float16": pb.FLOAT16}


# -- tensors --------------------------------------------------------------------------------
def _dtype_name(code: int) -> str:
    return pb.DType.Name(code) if code in pb.DType.values() else str(code)


def fill_tensor(tensor: pb.Tensor, array: np.ndarray) -> None:
    """Write ``array`` into ``tensor`` as raw little-endian bytes."""
    for code, dtype in WIRE_DTYPES.items():
        if array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize:
            tensor.dtype = code
            tensor.shape[:] = array.shape
            tensor.data = np.ascontiguousarray(array, dtype=dtype).tobytes()
            return
    if array.dtype.kind in "iub":  # other integer widths: class indices travel as INT32
        fill_tensor(tensor, array.astype(np.int32))
    elif array.dtype.kind == "f":
        fill_tensor(tensor, array.astype(np.float32))
    else:
        raise TypeError(f"no wire dtype for numpy dtype {array.dtype}")


def read_tensor(tensor: pb.Tensor, *, what: str) -> np.ndarray:
    """The array a Tensor holds (read-only view of its bytes), checking shape and size."""
    dtype = WIRE_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise InvalidImage(
            f"{what}.dtype {_dtype_name(tensor.dtype)} is not supported: use UINT8 or FLOAT32"
        )
    check_rank(len(tensor.shape), what)  # before any conversion: a shape may be huge
    shape = tuple(tensor.shape)
    if not shape or any(side < 1 for side in shape):
        raise InvalidImage(
            f"{what}.shape must hold positive sizes, got {list(shape)}: send the array's shape"
        )
    expected = math.prod(shape) * dtype.itemsize
    data = tensor.data  # protobuf copies a bytes field on every access: read it once
    if expected != len(data):
        raise InvalidImage(
            f"{what} has shape {list(shape)} of {_dtype_name(tensor.dtype)}, which needs "
            f"{expected} bytes, but data holds {len(data)}: send raw row-major "
            "little-endian bytes that match the shape"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


# -- images ---------------------------------------------------------------------------------
def image_to_proto(image: bytes | np.ndarray | str | Path, out: pb.Image) -> None:
    """Client side: encoded bytes, a file path, or a uint8 HW/HWC / float32 CHW array."""
    if isinstance(image, (str, Path)):
        image = Path(image).read_bytes()
    if isinstance(image, (bytes, bytearray, memoryview)):
        out.encoded = bytes(image)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 and image.dtype != np.float32:
            raise InvalidImage(f"send a uint8 or float32 array, got {image.dtype}")
        fill_tensor(out.array, image)
    else:
        raise InvalidImage(f"an image is bytes, a path or a numpy array, got {type(image)}")


def image_from_proto(image: pb.Image) -> bytes | np.ndarray:
    """Server side: what Engine.score takes (encoded bytes or an array)."""
    source = image.WhichOneof("source")
    if source == "encoded":
        if not image.encoded:
            raise InvalidImage("image.encoded is empty: send the bytes of a PNG/JPEG/... file")
        return image.encoded
    if source != "array":
        raise InvalidImage("the request has no image: set image.encoded or image.array")
    array = read_tensor(image.array, what="image.array")
    ranks = IMAGE_DTYPES.get(image.array.dtype)
    if ranks is None:
        raise InvalidImage(
            f"image.array.dtype {_dtype_name(image.array.dtype)} is not an image type: "
            "send UINT8 [H, W] or [H, W, C], or preprocessed FLOAT32 [C, H, W]"
        )
    if array.ndim not in ranks:
        raise InvalidImage(
            f"image.array of {_dtype_name(image.array.dtype)} must have rank "
            f"{' or '.join(map(str, ranks))}, got shape {list(array.shape)}: UINT8 is "
            "[H, W] or [H, W, C], FLOAT32 is [C, H, W]"
        )
    return array


# -- options --------------------------------------------------------------------------------
def options_to_proto(options: ScoreOptions, out: pb.ScoreOptions) -> None:
    out.output_stride = options.output_stride or 0
    out.scales[:] = options.scales
    out.output = pb.PROBABILITIES if options.probabilities else pb.LOGITS
    out.dtype = MAP_DTYPES[options.dtype]  # canonical: ScoreOptions checked it
    out.top_k = options.top_k
    if options.classes is not None:
        out.classes[:] = options.classes
    out.argmax = options.argmax
    out.omit_map = not options.include_map
    out.image_top_k = options.image_top_k
    out.precision = options.precision or ""
    if options.detections is not None:
        detection_options_to_proto(options.detections, out.detections)
    heads_to_proto(options.heads, out)


def options_from_proto(options: pb.ScoreOptions) -> ScoreOptions:
    """The engine options a request asks for: the wire's defaults (0, empty) mapped to the
    engine's; ScoreOptions checks the values (INVALID_ARGUMENT naming the field)."""
    if options.output_stride < 0:
        raise InvalidOption(
            f"output_stride {options.output_stride} is negative: use 0 for the native stride or "
            "one of the model's supported_strides (GetModel)"
        )
    if options.output not in (pb.OUTPUT_UNSPECIFIED, pb.PROBABILITIES, pb.LOGITS):
        raise InvalidOption(f"output {options.output} is unknown: use PROBABILITIES or LOGITS")
    dtypes = {pb.DTYPE_UNSPECIFIED: "float32", pb.FLOAT32: "float32", pb.FLOAT16: "float16"}
    if options.dtype not in dtypes:
        raise InvalidOption(
            f"options.dtype {_dtype_name(options.dtype)} is not a score map type: use FLOAT32 "
            "or FLOAT16"
        )
    image_top_k = options.image_top_k if options.HasField("image_top_k") else DEFAULT_IMAGE_TOP_K
    return ScoreOptions(
        output_stride=options.output_stride or None,
        scales=tuple(options.scales) or (1.0,),  # counted before converting (request_counts)
        probabilities=options.output != pb.LOGITS,
        dtype=dtypes[options.dtype],
        top_k=options.top_k,
        classes=tuple(options.classes) or None,
        argmax=options.argmax,
        include_map=not options.omit_map,
        image_top_k=image_top_k,
        precision=options.precision or None,
        detections=detection_options_from_proto(options.detections)
        if options.HasField("detections")
        else None,
        heads=heads_from_proto(options),
    )


# -- model information ----------------------------------------------------------------------
_REPORT_FIELDS = tuple(f.name for f in fields(PrecisionReport))


def precision_report_to_proto(report: PrecisionReport, out: pb.PrecisionReport) -> None:
    for name in _REPORT_FIELDS:
        setattr(out, name, getattr(report, name))


def precision_report_from_proto(report: pb.PrecisionReport) -> PrecisionReport:
    return PrecisionReport(**{name: getattr(report, name) for name in _REPORT_FIELDS})


# -- results --------------------------------------------------------------------------------
def _fill_geometry(out: pb.MapGeometry, geometry: MapGeometry) -> None:
    for name in ("stride", "window", "origin", "receptive_field", "receptive_field_offset"):
        pair = getattr(out, name)
        pair.h, pair.w = getattr(geometry, name)
    out.scale = geometry.scale
    out.resize_h, out.resize_w = geometry.resize


def _read_geometry(geometry: pb.MapGeometry) -> MapGeometry:
    def pair(name: str) -> tuple[int, int]:
        value = getattr(geometry, name)
        return (value.h, value.w)

    return MapGeometry(
        stride=pair("stride"),
        window=pair("window"),
        origin=pair("origin"),
        receptive_field=pair("receptive_field"),
        receptive_field_offset=pair("receptive_field_offset"),
        scale=geometry.scale,
        resize=(geometry.resize_h, geometry.resize_w),
    )


def fill_response(out: pb.ScoreResponse, result: ScoreResult) -> None:
    """Server side: the maps, image-level scores and image size of ``result``."""
    for scale_map in result.maps:
        map_pb = out.maps.add()
        _fill_geometry(map_pb.geometry, scale_map.geometry)
        if scale_map.classes is not None:
            map_pb.classes[:] = scale_map.classes
        map_pb.cells.h, map_pb.cells.w = scale_map.shape
        for name in ("scores", "top_k_indices", "top_k_scores", "argmax"):
            array = getattr(scale_map, name)
            if array is not None:
                fill_tensor(getattr(map_pb, name), array)
        fill_head_maps(map_pb, scale_map, result.heads, fill_tensor)
    out.image_scores[:] = np.asarray(result.image_scores, dtype=np.float32)
    for index, score in result.image_top_k:
        label = result.labels[index] if index < len(result.labels) else ""
        out.image_top_k.add(index=index, label=label, score=score)
    out.image_size.h, out.image_size.w = result.image_size
    fill_detections(out, result.detections)


def result_from_response(
    response: pb.ScoreResponse, *, labels: tuple[str, ...] = (), detections: bool = False
) -> ScoreResult:
    """Client side: a :class:`ScoreResult` with numpy arrays, timings in seconds; its
    ``detections`` is a list when ``detections`` (the request asked for them), else None."""
    maps, heads = [], ()
    for map_pb in response.maps:
        arrays = {
            name: read_tensor(getattr(map_pb, name), what=name) if map_pb.HasField(name) else None
            for name in ("scores", "top_k_indices", "top_k_scores", "argmax")
        }
        classes = tuple(map_pb.classes) or None
        cells = (map_pb.cells.h, map_pb.cells.w) if map_pb.HasField("cells") else None
        geometry = _read_geometry(map_pb.geometry)
        head_maps, heads = read_head_maps(map_pb, read_tensor)
        maps.append(
            ScaleMap(geometry=geometry, classes=classes, cells=cells, head_maps=head_maps, **arrays)
        )
    timing = response.timing
    return ScoreResult(
        maps=maps,
        image_scores=np.asarray(response.image_scores, dtype=np.float32),
        image_top_k=[(c.index, c.score) for c in response.image_top_k],
        labels=labels,
        image_size=(response.image_size.h, response.image_size.w),
        timings={
            stage: getattr(timing, f"{stage}_ms") / 1000.0
            for stage in ("decode", "queue", "infer", "encode", "total")
        },
        detections=detections_from_response(response) if detections else None,
        heads=heads,
    )
