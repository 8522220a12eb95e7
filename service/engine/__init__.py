"""The dense scoring engine (no gRPC, no torch): see docs/engine.md.

``Engine(model_path).score(image, ScoreOptions(...)) -> ScoreResult`` is the entry point;
``ModelRepository(root)`` serves a folder of models by name.
"""

from service.engine.engine import Engine
from service.engine.heads import HeadInfo
from service.engine.image_input import preprocess
from service.engine.options import EngineConfig, ScoreOptions
from service.engine.repository import ModelRepository, ReloadReport, default_models_dir
from service.engine.result import MapGeometry, ScaleMap, ScoreMap, ScoreResult

__all__ = [
    "Engine",
    "EngineConfig",
    "HeadInfo",
    "MapGeometry",
    "ModelRepository",
    "ReloadReport",
    "ScaleMap",
    "ScoreMap",  # deprecated alias of ScoreResult
    "ScoreResult",
    "ScoreOptions",
    "default_models_dir",
    "preprocess",
]
