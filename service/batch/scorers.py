"""The two ways the batch pipeline reaches a model: in-process engine, or a running server.

The engine scorer decodes in the pipeline's decode threads (the engine's own decoder);
the remote scorer sends the encoded bytes as they are (smaller than pixels) and the server
decodes them with the same decoder; heat-maps then decode locally. Both return a
:class:`~densemap.service.engine.result.ScoreResult`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np

from densemap.service.batch.server_target import ServerTarget, explain_unreachable
from densemap.service.engine.detections import detection_classes
from densemap.service.engine.options import DEFAULT_DETECTION_THRESHOLD, EngineConfig, ScoreOptions
from densemap.service.engine.postprocess import plan_outputs
from densemap.service.engine.request_checks import check_stride
from densemap.service.engine.result import ScoreResult
from densemap.service.errors import InvalidOption

REMOTE_CONCURRENCY = 4  # score calls in flight to a server (its queue absorbs them)

DEFAULT_MODEL = "digits"


@dataclass(frozen=True)
class ModelChoice:
    """Which model to load: ``models_dir`` None means ``default_models_dir()``."""

    model: str = DEFAULT_MODEL
    models_dir: str | None = None
    engine: EngineConfig = EngineConfig()


class EngineScorer:
    """Scores in this process with one :class:`~densemap.service.engine.Engine`."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.model_name: str = engine.name
        self.labels: tuple[str, ...] = tuple(engine.labels)
        self.color: str = engine.metadata.preprocessing.color
        self.num_classes: int = engine.num_classes
        self.output_kind: str = engine.metadata.output_kind
        self.heads = tuple(engine.heads)  # every head, primary first
        self.supported_strides: tuple[int, ...] = tuple(engine.supported_strides)
        # the model's detection threshold (densemap.json), for the summary's cells_above
        self.detection_threshold: float = engine.config.detections.threshold

    def check_options(self, options: ScoreOptions) -> None:
        """InvalidOption when the model cannot take ``options`` (the engine's own check)."""
        self.engine.check_options(options)

    def decode(self, data: bytes) -> np.ndarray:
        return self.engine.decode(data)

    def score(self, image: np.ndarray, options: ScoreOptions, *, cancel=None) -> ScoreResult:
        return self.engine.score(image, options, cancel=cancel)

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()


def open_engine_scorer(choice: ModelChoice) -> EngineScorer:
    """Load ``choice.model``, and only it, from its repository (ModelNotFound, ModelLoadError)."""
    from densemap.service.engine.repository import default_models_dir, load_model

    root = choice.models_dir or default_models_dir()
    return EngineScorer(load_model(root, choice.model, config=choice.engine))


class RemoteScorer:
    """Scores through a running ``densemap serve`` with :class:`densemap.service.client.DensemapClient`."""

    def __init__(self, client, model: str) -> None:
        info = client.get_model(model)  # fails early (RemoteError) when unreachable/unknown
        self.client = client
        self.model_name: str = info.name
        self.labels: tuple[str, ...] = tuple(info.labels)
        self.color: str = info.preprocessing.color
        self.num_classes: int = info.num_classes
        self.output_kind: str = info.output_kind
        self.heads = tuple(info.heads)  # every head, primary first
        self.supported_strides: tuple[int, ...] = tuple(info.supported_strides)
        # the server applies the model's detection settings; GetModel does not report them
        self.detection_threshold: float = DEFAULT_DETECTION_THRESHOLD

    def check_options(self, options: ScoreOptions) -> None:
        """InvalidOption when the served model cannot take ``options``, from what GetModel
        told (stride, classes, output kind, heads); the server checks the rest (its
        precisions, its box offsets) on the first image."""
        check_stride(options.output_stride, self.supported_strides, name=self.model_name)
        plan_outputs(
            options, num_classes=self.num_classes, output_kind=self.output_kind, heads=self.heads
        )
        if options.detections is not None:
            detection_classes(options.detections, labels=self.labels, num_classes=self.num_classes)

    def decode(self, data: bytes) -> bytes:
        return data  # the server decodes; RemoteError(INVALID_ARGUMENT) names the problem

    def score(self, image, options: ScoreOptions, *, cancel=None) -> ScoreResult:
        shallow = {f.name: getattr(options, f.name) for f in fields(options)}  # typed values
        return self.client.score(image, model=self.model_name, **shallow)


@contextlib.contextmanager
def open_remote_scorer(target: ServerTarget, model: str) -> Iterator[RemoteScorer]:
    """A scorer through ``target``; a server that cannot be reached, refuses the token or
    fails the TLS handshake is one InvalidOption naming the flag to change."""
    from densemap.service.client import RemoteError

    with target.open_client() as client:
        try:
            scorer = RemoteScorer(client, model)
        except RemoteError as exc:
            if exc.code.name not in ("UNAVAILABLE", "UNAUTHENTICATED"):
                raise
            raise InvalidOption(explain_unreachable(target, exc.details)) from None
        yield scorer
