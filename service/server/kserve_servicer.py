"""KServe v2 (Open Inference Protocol) for stock tritonclient: live, ready, metadata, infer.

A dense model takes ONE input, either ``image`` (UINT8 [H, W, C] in the model's color
order) or ``image_bytes`` (BYTES [1], an encoded image). Outputs, always sent in
``raw_output_contents`` (tritonclient's ``as_numpy`` reads nothing else), per scale i
(suffix "" for the first scale, "_<i>" for the others): ``scores`` [C, n_h, n_w] (the
primary head), ``top_k_indices``/``top_k_scores`` [k, n_h, n_w], ``argmax`` [n_h, n_w],
and one output per extra head, named by the head, [channels, n_h, n_w]; plus
``image_scores`` [num_classes]; with ``detections=true``, the detection outputs of
:mod:`densemap.service.server.kserve_detections`. Names: :mod:`densemap.service.server.kserve_outputs`.
Options are request parameters (see PARAMETERS).
"""

from __future__ import annotations

import importlib.metadata
import math
import struct

import numpy as np

from densemap.service.errors import InvalidImage, ModelNotFound
from densemap.service.server import kserve_detections, request_counts
from densemap.service.server.kserve_outputs import (
    MAP_OUTPUTS,
    estimated_bytes,
    head_output,
    output_name,
    requested_options,
    set_geometry,
)
from densemap.service.server.kserve_parameters import options_from_parameters
from densemap.service.server.kserve_proto import (
    ModelInferResponse,
    ModelMetadataResponse,
    message_class,
)
from densemap.service.server.scoring import Call, ScoringCore
from densemap.service.server.status import quote_name

PLATFORM = "onnxruntime_onnx"
INPUTS = {"image": "UINT8", "image_bytes": "BYTES"}
DATATYPES = {"float32": "FP32", "float16": "FP16", "int32": "INT32"}
VERSIONS = ("", "1")


def _server_version() -> str:
    try:
        return importlib.metadata.version("densemap")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _check_version(name: str, version: str) -> None:
    """Each model has one version, "1"; an empty version means the latest."""
    if version not in VERSIONS:
        raise ModelNotFound(
            f"model {quote_name(name)} has no version {quote_name(version, 20)}: it has one "
            'version, "1"; send model_version "1" or leave it empty'
        )


def _read_input(request) -> np.ndarray | bytes:
    """The image of a ModelInferRequest: a uint8 array or encoded bytes."""
    if len(request.inputs) != 1:
        raise InvalidImage(
            f"send exactly one input, 'image' (UINT8 [H, W, C]) or 'image_bytes' (BYTES [1]); "
            f"got {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    if tensor.name not in INPUTS:
        raise InvalidImage(
            f"unknown input {tensor.name[:80]!r}: use 'image' (UINT8 [H, W, C]) or "
            "'image_bytes' (BYTES [1])"
        )
    if tensor.datatype != INPUTS[tensor.name]:
        raise InvalidImage(
            f"input {tensor.name!r} must be {INPUTS[tensor.name]}, got {tensor.datatype[:20]!r}: "
            + (
                "send the pixels as UINT8 [H, W, C] (e.g. image.astype(numpy.uint8)), or an "
                "encoded file as input 'image_bytes' (BYTES [1]); preprocessed float input is "
                "densemap.v1 only (FLOAT32 [C, H, W])"
                if tensor.name == "image"
                else "send one encoded image as BYTES [1], or pixels as input 'image' (UINT8)"
            )
        )
    if "shared_memory_region" in tensor.parameters:
        raise InvalidImage(
            f"input {tensor.name!r} is in a shared memory region, which densemap does not "
            "serve: send the data in the request (InferInput.set_data_from_numpy)"
        )
    shape = list(tensor.shape)
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidImage(f"{len(raw)} raw_input_contents entries for 1 input: send one entry")
    if raw and tensor.contents.ByteSize():
        raise InvalidImage(
            f"input {tensor.name!r} has both raw_input_contents and contents: send the data "
            "in one of them (tritonclient uses raw_input_contents)"
        )
    if tensor.name == "image_bytes":
        if min(shape, default=0) < 1 or math.prod(shape) != 1:
            raise InvalidImage(
                f"input 'image_bytes' holds one encoded image: shape [1], got {shape}"
            )
        if not raw:
            if len(tensor.contents.bytes_contents) != 1:
                raise InvalidImage("input 'image_bytes' needs one element in bytes_contents")
            return tensor.contents.bytes_contents[0]
        data = raw[0]
        if len(data) < 4 or struct.unpack_from("<I", data)[0] != len(data) - 4:
            raise InvalidImage(
                "raw 'image_bytes' must be one element: a 4-byte little-endian length, then "
                "that many bytes of an encoded image"
            )
        return data[4:]
    if len(shape) not in (2, 3) or min(shape, default=0) < 1:
        raise InvalidImage(f"input 'image' is UINT8 [H, W, C] (or [H, W]), got shape {shape}")
    count = math.prod(shape)
    if raw:
        pixels = raw[0]  # protobuf copies a bytes element on every access: read it once
        if len(pixels) != count:
            raise InvalidImage(
                f"input 'image' has shape {shape}, which needs {count} bytes of raw data, got "
                f"{len(pixels)}: send the row-major pixels of exactly that shape"
            )
        return np.frombuffer(pixels, dtype=np.uint8).reshape(shape)
    values = np.asarray(tensor.contents.uint_contents, dtype=np.uint32)
    if values.size != count:
        raise InvalidImage(
            f"input 'image' has shape {shape}: send {count} values in 0..255 "
            f"(raw_input_contents or uint_contents), got {values.size}"
        )
    if values.size and values.max() > 255:
        raise InvalidImage(
            f"input 'image' is UINT8: its uint_contents must be in 0..255, got {values.max()}"
        )
    return values.astype(np.uint8).reshape(shape)


class KServeServicer:
    """The six KServe RPCs; registered by ``kserve_proto.add_servicer_to_server``."""

    def __init__(self, core: ScoringCore) -> None:
        self._core = core
        self._version = _server_version()

    async def ServerLive(self, request, context):
        return message_class("ServerLiveResponse")(live=True)

    async def ServerReady(self, request, context):
        """Ready only when the server serves a model (and every --require-models one)."""
        return message_class("ServerReadyResponse")(ready=self._core.state.ready_for_traffic)

    async def ModelReady(self, request, context):
        state = self._core.state
        ready = (
            state.ready
            and not state.draining
            and request.name in self._core.models.names()
            and request.version in VERSIONS
        )
        return message_class("ModelReadyResponse")(ready=ready)

    async def ServerMetadata(self, request, context):
        return message_class("ServerMetadataResponse")(name="densemap", version=self._version)

    async def ModelMetadata(self, request, context):
        def metadata(call: Call):
            engine = call.engine(request.name)
            _check_version(request.name, request.version)
            response = ModelMetadataResponse(name=request.name, versions=["1"], platform=PLATFORM)
            channels = engine.metadata.preprocessing.channels
            response.inputs.add(name="image", datatype="UINT8", shape=[-1, -1, channels])
            response.inputs.add(name="image_bytes", datatype="BYTES", shape=[1])
            response.outputs.add(name="scores", datatype="FP32", shape=[-1, -1, -1])
            response.outputs.add(name="image_scores", datatype="FP32", shape=[engine.num_classes])
            response.outputs.add(name="top_k_indices", datatype="INT32", shape=[-1, -1, -1])
            response.outputs.add(name="top_k_scores", datatype="FP32", shape=[-1, -1, -1])
            response.outputs.add(name="argmax", datatype="INT32", shape=[-1, -1])
            response.outputs.add(name="detections", datatype="FP32", shape=[-1, 6])
            response.outputs.add(name="detection_labels", datatype="BYTES", shape=[-1])
            response.outputs.add(name="detection_cells", datatype="INT32", shape=[-1, 3])
            for head in engine.heads[1:]:  # extra heads: [channels, n_h, n_w]
                response.outputs.add(
                    name=head_output(head), datatype="FP32", shape=[head.channels, -1, -1]
                )
            return response

        return await self._core.unary(context, "kserve.ModelMetadata", metadata)

    async def ModelInfer(self, request, context):
        try:
            return await self._core.unary(
                context, "kserve.ModelInfer", lambda call: self._infer(call, request), scoring=True
            )
        finally:  # the lambda can outlive the call in a cycle (status.drop_frames): not so
            request = None  # the request, which its closure shares with this frame

    def _infer(self, call: Call, request):
        request_counts.check_infer_request(request)
        engine = call.engine(request.model_name)
        _check_version(request.model_name, request.model_version)
        heads = engine.heads
        with call.timed("decode"):
            options = options_from_parameters(request.parameters)
            options, wanted = requested_options(request, options, heads)
            image = _read_input(request)
        result = call.score(
            engine,
            image,
            options,
            response_bytes=lambda cost: estimated_bytes(cost, wanted, heads, engine.num_classes),
        )
        response = ModelInferResponse(model_name=request.model_name, model_version="1")
        response.id = request.id
        with call.timed("encode"):
            for index, scale_map in enumerate(result.maps):
                for base in MAP_OUTPUTS:
                    array, name = getattr(scale_map, base), output_name(base, index)
                    if array is not None and (wanted is None or name in wanted):
                        output = self._add_output(response, name, array)
                        set_geometry(output, scale_map.geometry)
                for head in result.heads:
                    name = output_name(head_output(head), index)
                    if wanted is None or name in wanted:
                        output = self._add_output(response, name, scale_map.head_maps[head.name])
                        set_geometry(output, scale_map.geometry)
                        output.parameters["head"].string_param = head.name
                        output.parameters["kind"].string_param = head.kind
            if wanted is None or "image_scores" in wanted:
                self._add_output(response, "image_scores", np.asarray(result.image_scores))
            if result.detections is not None:
                arrays = kserve_detections.detection_arrays(result.detections)
                for name, array in arrays.items():
                    if wanted is not None and name not in wanted:
                        continue
                    if name == "detection_labels":
                        kserve_detections.add_bytes_output(response, name, array)
                    else:
                        self._add_output(response, name, array)
        for stage, value in call.timing_ms().items():
            response.parameters[f"{stage}_ms"].double_param = value
        return response

    @staticmethod
    def _add_output(response, name: str, array: np.ndarray):
        kind = "int32" if array.dtype.kind in "iu" else str(array.dtype)
        array = np.ascontiguousarray(array, dtype=np.dtype(kind).newbyteorder("<"))
        output = response.outputs.add(name=name, datatype=DATATYPES[kind], shape=array.shape)
        response.raw_output_contents.append(array.tobytes())
        return output
