"""densemap.v1.Densemap: Score, ScoreStream, ListModels, GetModel.

The servicer only translates messages to engine calls and back (``codec``); gating,
backpressure, timing and status codes live in ``scoring``. Its gRPC methods are coroutines
on the server's event loop; scoring runs on the scoring threads (``ScoringCore``), which
send Score's response serialized (``malformed`` passes bytes through).
"""

from __future__ import annotations

import grpc

from densemap.service._proto.densemap.v1 import densemap_pb2 as pb
from densemap.service._proto.densemap.v1 import densemap_pb2_grpc as pb_grpc
from densemap.service.server import codec, request_counts
from densemap.service.server.head_codec import fill_model_heads
from densemap.service.server.limits import CallGuard
from densemap.service.server.scoring import Call, ScoringCore
from densemap.service.server.status import NotServing, abort

SERVICE_NAME = "densemap.v1.Densemap"
_FATAL = (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)


def fill_model_info(out: pb.ModelInfo, engine, *, name: str, with_labels: bool) -> None:
    """Describe a loaded engine: classes, geometry, strides, preprocessing."""
    metadata = engine.metadata
    geometry = metadata.geometry
    out.name = name
    out.num_classes = engine.num_classes
    if with_labels:
        out.labels[:] = engine.labels
    for field in ("window", "stride", "origin", "receptive_field", "receptive_field_offset"):
        pair = getattr(out.geometry, field)
        pair.h, pair.w = getattr(geometry, field)
    out.geometry.effective_window.h, out.geometry.effective_window.w = geometry.effective_window
    out.geometry.padded = geometry.padded
    out.supported_strides[:] = [int(s) for s in engine.supported_strides]
    prep = metadata.preprocessing
    out.preprocessing.layout = prep.layout
    out.preprocessing.color = prep.color
    out.preprocessing.scale = prep.scale
    out.preprocessing.mean[:] = prep.mean
    out.preprocessing.std[:] = prep.std
    out.preprocessing.channels = prep.channels
    out.output_kind = metadata.output_kind
    out.providers[:] = list(engine.providers)
    out.source = metadata.source
    out.contract_version = metadata.version
    out.default_precision = engine.default_precision
    out.precisions[:] = list(engine.precisions)
    for report in engine.precision_report:
        codec.precision_report_to_proto(report, out.precision_report.add())
    fill_model_heads(out, engine.heads, with_labels=with_labels)


def load_failures(repository) -> list[tuple[str, str]]:
    """(name, message) of each model whose latest load failed."""
    errors = getattr(repository, "errors", None) or {}
    items = errors.items() if hasattr(errors, "items") else enumerate(errors)
    return sorted((str(name), str(message)) for name, message in items)


class DensemapServicer(pb_grpc.DensemapServicer):
    def __init__(self, core: ScoringCore) -> None:
        self._core = core

    def _score(self, call: Call, request: pb.ScoreRequest) -> pb.ScoreResponse:
        request_counts.check_score_request(request)
        engine = call.engine(request.model)
        with call.timed("decode"):
            image = codec.image_from_proto(request.image)
            options = codec.options_from_proto(request.options)
        result = call.score(engine, image, options)
        response = pb.ScoreResponse(model=request.model, request_id=request.request_id)
        with call.timed("encode"):
            codec.fill_response(response, result)
        timing = call.timing_ms()
        for stage, value in timing.items():
            setattr(response.timing, f"{stage}_ms", value)
        return response

    async def Score(self, request, context):
        try:
            return await self._core.unary(
                context, "densemap.Score", lambda call: self._score(call, request), scoring=True
            )
        finally:  # the lambda can outlive the call in a cycle (status.drop_frames): not so
            request = None  # the request, which its closure shares with this frame

    async def ScoreStream(self, request_iterator, context):
        """Open streams are limited and time out in ``streams``; an image being scored holds
        a scoring slot and a thread (``stream_item``), an idle stream neither."""
        core = self._core
        try:
            core.state.check_serving()
            core.state.track(context)
        except Exception as exc:
            await abort(context, exc)
        guard = CallGuard.for_context(context, core.state)
        async for request in request_iterator:
            call = Call(core, guard, "densemap.ScoreStream")
            response, code, message = await core.stream_item(
                call,
                lambda c: self._score(c, request),  # noqa: B023 - run before the loop goes on
            )
            if code in _FATAL:
                await context.abort(code, message)
            if response is None:
                error = pb.ScoreResponse(model=request.model, request_id=request.request_id)
                error.error.code = code.value[0]
                error.error.code_name = code.name
                error.error.message = message
                response = error
            yield response
            call.release_memory()  # the response was written
            request = None  # its closure may outlive the item (see Score): not the request
            if core.state.draining:
                await abort(
                    context,
                    NotServing(
                        "the server is shutting down: send the remaining images to "
                        "another replica or after it restarts"
                    ),
                )

    async def ListModels(self, request, context):
        def list_models(call: Call) -> pb.ListModelsResponse:
            response = pb.ListModelsResponse()
            repository = self._core.models.repository  # one snapshot; set once ready
            for name in sorted(repository.names):
                info = response.models.add()
                fill_model_info(info, repository.get(name), name=name, with_labels=False)
            for name, message in load_failures(repository):  # no server path leaves
                response.failures.add(name=name, message=self._core.models.client_text(message))
            return response

        return await self._core.unary(context, "densemap.ListModels", list_models)

    async def GetModel(self, request, context):
        def get_model(call: Call) -> pb.ModelInfo:
            engine = call.engine(request.name)
            info = pb.ModelInfo()
            fill_model_info(info, engine, name=request.name, with_labels=True)
            return info

        return await self._core.unary(context, "densemap.GetModel", get_model)
