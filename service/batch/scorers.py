"""The two ways the batch pipeline reaches a model: in-process engine, or a running server.

Both turn encoded bytes into the model's uint8 HxWxC array with the engine's own decoder
(so a heat-map and the server see the same pixels) and return a
:class:`~service.engine.result.ScoreMap`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.engine.options import EngineConfig, ScoreOptions
from service.engine.result import ScoreMap

DEFAULT_MODEL = "digits"


@dataclass(frozen=True)
class ModelChoice:
    """Which model to load: ``models_dir`` None means the bundled default repository."""

    model: str = DEFAULT_MODEL
    models_dir: str | None = None
    engine: EngineConfig = EngineConfig()


class EngineScorer:
    """Scores in this process with one :class:`~service.engine.Engine`."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.model_name: str = engine.name
        self.labels: tuple[str, ...] = tuple(engine.labels)
        self.color: str = engine.metadata.preprocessing.color

    def decode(self, data: bytes) -> np.ndarray:
        return self.engine.decode(data)

    def score(self, image: np.ndarray, options: ScoreOptions) -> ScoreMap:
        return self.engine.score(image, options)

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()


def open_engine_scorer(choice: ModelChoice) -> EngineScorer:
    """Load ``choice.model`` from its repository (raises ModelNotFound / ModelLoadError)."""
    from service.engine.repository import ModelRepository, default_models_dir

    root = choice.models_dir or default_models_dir()
    repository = ModelRepository(root, config=choice.engine)
    return EngineScorer(repository.get(choice.model))
