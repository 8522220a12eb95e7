"""The dense scoring engine (no gRPC, no torch): see docs/engine.md.

``Engine(model_path).score(image, ScoreOptions(...)) -> ScoreResult`` is the entry point;
``ModelRepository(root)`` serves a folder of models by name.

The names below are imported on first use, so importing a light submodule (options,
results, heads: what :mod:`service.client` needs) does not import onnxruntime, which a
client-only install does not have (service/engine/onnxruntime_package.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# name -> the submodule that defines it
_EXPORTS = {
    "Engine": "service.engine.engine",
    "EngineConfig": "service.engine.options",
    "HeadInfo": "service.engine.heads",
    "MapGeometry": "service.engine.result",
    "ModelRepository": "service.engine.repository",
    "ReloadReport": "service.engine.repository",
    "ScaleMap": "service.engine.result",
    "ScoreMap": "service.engine.result",  # deprecated alias of ScoreResult
    "ScoreResult": "service.engine.result",
    "ScoreOptions": "service.engine.options",
    "default_models_dir": "service.engine.repository",
    "preprocess": "service.engine.image_input",
}

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

if TYPE_CHECKING:
    from service.engine.engine import Engine
    from service.engine.heads import HeadInfo
    from service.engine.image_input import preprocess
    from service.engine.options import EngineConfig, ScoreOptions
    from service.engine.repository import ModelRepository, ReloadReport, default_models_dir
    from service.engine.result import MapGeometry, ScaleMap, ScoreMap, ScoreResult


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'service.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
