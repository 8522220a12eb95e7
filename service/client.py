"""Python client of ``densemap serve`` (densemap.v1): numpy in, numpy out, no protobuf.

    from densemap.service.client import DensemapClient

    with DensemapClient("localhost:50051") as client:
        print([m.name for m in client.list_models()])
        result = client.score("cat.jpg", model="digits", output_stride=4, top_k=3)
        probabilities = result.maps[0].scores          # [C, n_h, n_w] numpy array
        boxes = result.maps[0].head_maps.get("boxes")  # an extra head's map, if the model has one
        top, left, bottom, right = result.maps[0].geometry.window_at(0, 0)
        found = client.score("page.png", model="digits", detections=True).detections
        x0, y0, x1, y1 = found[0].box                  # original-image pixels

``score`` returns the engine's own :class:`~densemap.service.engine.result.ScoreResult` type, so code
works the same with a local ``Engine`` and a remote server. Failures raise
:class:`RemoteError` (a ``DensemapError``) carrying the gRPC status code.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from densemap.service._proto.densemap.v1 import densemap_pb2 as pb
from densemap.service._proto.densemap.v1 import densemap_pb2_grpc as pb_grpc
from densemap.service.contract import Geometry, Preprocessing
from densemap.service.engine.heads import HeadInfo
from densemap.service.engine.options import DetectionOptions, ScoreOptions
from densemap.service.engine.result import PrecisionReport, ScoreResult
from densemap.service.errors import DensemapError, InvalidOption
from densemap.service.server.codec import (
    image_to_proto,
    options_to_proto,
    precision_report_from_proto,
    result_from_response,
)
from densemap.service.server.config import DEFAULT_MAX_MESSAGE_BYTES
from densemap.service.server.head_codec import model_heads_from_proto

DEFAULT_TARGET = "localhost:50051"
_OPTION_NAMES = tuple(f.name for f in fields(ScoreOptions))


class RemoteError(DensemapError):
    """The server answered with an error status (``code``: a ``grpc.StatusCode``)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True)
class RemoteModel:
    """A served model: what ``GetModel``/``ListModels`` report."""

    name: str
    num_classes: int
    labels: tuple[str, ...]
    geometry: Geometry
    supported_strides: tuple[int, ...]
    preprocessing: Preprocessing
    output_kind: str
    providers: tuple[str, ...]
    source: str
    contract_version: int
    default_precision: str = "fp32"
    precisions: tuple[str, ...] = ("fp32",)
    precision_report: tuple[PrecisionReport, ...] = ()
    heads: tuple[HeadInfo, ...] = ()  # every output map, primary (``scores``) first


def _pair(pair: pb.Pair) -> tuple[int, int]:
    return (pair.h, pair.w)


def _model_from_proto(info: pb.ModelInfo) -> RemoteModel:
    g, p = info.geometry, info.preprocessing
    return RemoteModel(
        name=info.name,
        num_classes=info.num_classes,
        labels=tuple(info.labels),
        geometry=Geometry(
            window=_pair(g.window),
            stride=_pair(g.stride),
            origin=_pair(g.origin),
            receptive_field=_pair(g.receptive_field),
            receptive_field_offset=_pair(g.receptive_field_offset),
            effective_window=_pair(g.effective_window),
            padded=g.padded,
        ),
        supported_strides=tuple(info.supported_strides),
        preprocessing=Preprocessing(
            layout=p.layout, color=p.color, scale=p.scale, mean=tuple(p.mean), std=tuple(p.std)
        ),
        output_kind=info.output_kind,
        providers=tuple(info.providers),
        source=info.source,
        contract_version=info.contract_version,
        default_precision=info.default_precision or "fp32",
        precisions=tuple(info.precisions) or ("fp32",),
        precision_report=tuple(precision_report_from_proto(r) for r in info.precision_report),
        heads=model_heads_from_proto(info),
    )


def _score_options(options: dict) -> ScoreOptions:
    """The keyword options of ``score`` as ScoreOptions, which checks their values."""
    unknown = sorted(set(options) - set(_OPTION_NAMES))
    if unknown:
        raise InvalidOption(
            f"unknown scoring option(s) {unknown}; known: {', '.join(_OPTION_NAMES)}"
        )
    if options.get("detections") is True:  # shorthand for the default DetectionOptions()
        options = {**options, "detections": DetectionOptions()}
    elif options.get("detections") is False:
        options = {**options, "detections": None}
    return ScoreOptions(**options)


class DensemapClient:
    """A channel to one densemap server; thread-safe; close it (or use ``with``)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        timeout: float | None = None,
    ) -> None:
        """``timeout``: default deadline of each call in seconds (None: no deadline)."""
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if tls or root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.DensemapStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._timeout = timeout
        self._labels: dict[str, tuple[str, ...]] = {}

    # -- plumbing -------------------------------------------------------------------------
    def _call(self, method, request, timeout: float | None):
        try:
            return method(
                request,
                timeout=self._timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise RemoteError(exc.code(), exc.details() or "") from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> DensemapClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- models ---------------------------------------------------------------------------
    def ready(self, service: str = "readiness", *, timeout: float = 5.0) -> bool:
        """Health check: True when ``service`` ("readiness", a model name...) is SERVING."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = self._health.Check(request, timeout=timeout)
        except grpc.RpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    def list_models(self, *, timeout: float | None = None) -> list[RemoteModel]:
        """The served models (labels left out: ``get_model`` has them)."""
        response = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [_model_from_proto(info) for info in response.models]

    def load_failures(self, *, timeout: float | None = None) -> dict[str, str]:
        """Model name -> error, for models whose latest load failed on the server."""
        response = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return {failure.name: failure.message for failure in response.failures}

    def get_model(self, name: str, *, timeout: float | None = None) -> RemoteModel:
        info = self._call(self._stub.GetModel, pb.GetModelRequest(name=name), timeout)
        model = _model_from_proto(info)
        self._labels[name] = model.labels
        return model

    def _model_labels(self, name: str) -> tuple[str, ...]:
        if name not in self._labels:
            self.get_model(name)
        return self._labels[name]

    # -- scoring --------------------------------------------------------------------------
    def _request(self, image, model: str, options: dict, request_id: str = "") -> pb.ScoreRequest:
        request = pb.ScoreRequest(model=model, request_id=request_id)
        image_to_proto(image, request.image)
        options_to_proto(_score_options(options), request.options)
        return request

    def score(
        self,
        image: bytes | np.ndarray | str | Path,
        *,
        model: str,
        timeout: float | None = None,
        **options,
    ) -> ScoreResult:
        """Score one image: encoded bytes, a file path, uint8 HxW(xC) or float32 CxHxW.

        ``options`` are :class:`~densemap.service.engine.options.ScoreOptions` fields
        (output_stride, scales, probabilities, dtype, top_k, classes, argmax,
        include_map, image_top_k, precision, detections: a ``DetectionOptions`` or True for
        the defaults, heads: the extra heads to return, None = all, () = none). Each
        ``ScaleMap.head_maps`` holds the extra heads' maps by name (numpy), and
        ``result.heads`` describes them. ``timings`` of the result are server-side seconds.
        """
        request = self._request(image, model, options)
        labels = self._model_labels(model)  # cached; fetched first, while the server answers
        response = self._call(self._stub.Score, request, timeout)
        asked = request.options.HasField("detections")
        return result_from_response(response, labels=labels, detections=asked)

    def score_stream(
        self,
        images: Iterable[bytes | np.ndarray | str | Path],
        *,
        model: str,
        timeout: float | None = None,
        return_errors: bool = False,
        **options,
    ) -> Iterator[ScoreResult | RemoteError]:
        """Score many images over one call (pipelined), results in input order.

        A failed image raises :class:`RemoteError`, or is yielded as one with
        ``return_errors=True`` (the stream then goes on).
        """
        labels = self._model_labels(model)
        asked = _score_options(dict(options)).detections is not None
        client_errors: list[Exception] = []

        def requests() -> Iterator[pb.ScoreRequest]:
            try:  # runs in a gRPC thread: keep the error for the caller's thread
                for index, image in enumerate(images):
                    yield self._request(image, model, options, request_id=str(index))
            except Exception as exc:
                client_errors.append(exc)

        try:
            for response in self._stub.ScoreStream(
                requests(),
                timeout=self._timeout if timeout is None else timeout,
                metadata=self._metadata,
            ):
                if response.HasField("error"):
                    code = grpc.StatusCode.__members__.get(
                        response.error.code_name, grpc.StatusCode.UNKNOWN
                    )
                    error = RemoteError(code, response.error.message)
                    if not return_errors:
                        raise error
                    yield error
                    continue
                yield result_from_response(response, labels=labels, detections=asked)
        except grpc.RpcError as exc:
            raise RemoteError(exc.code(), exc.details() or "") from None
        if client_errors:
            raise client_errors[0]
