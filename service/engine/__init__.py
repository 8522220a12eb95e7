"""The dense scoring engine (no gRPC, no torch): see docs/engine.md.

``Engine(model_path).score(image, ScoreOptions(...)) -> ScoreResult`` is the entry point;
``ModelRepository(root)`` serves a folder of models by name.

The names below are imported on first use, so importing a light submodule (options,
results, heads: what :mod:`densemap.service.client` needs) does not import onnxruntime, which a
client-only install does not have (service/engine/onnxruntime_package.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# name -> the submodule that defines it
_EXPORTS = {
    "Engine": "densemap.service.engine.engine",
    "EngineConfig": "densemap.service.engine.options",
    "HeadInfo": "densemap.service.engine.heads",
    "MapGeometry": "densemap.service.engine.result",
    "ModelRepository": "densemap.service.engine.repository",
    "ReloadReport": "densemap.service.engine.repository",
    "ScaleMap": "densemap.service.engine.result",
    "ScoreMap": "densemap.service.engine.result",  # deprecated alias of ScoreResult
    "ScoreResult": "densemap.service.engine.result",
    "ScoreOptions": "densemap.service.engine.options",
    "default_models_dir": "densemap.service.engine.repository",
    "preprocess": "densemap.service.engine.image_input",
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
    from densemap.service.engine.engine import Engine
    from densemap.service.engine.heads import HeadInfo
    from densemap.service.engine.image_input import preprocess
    from densemap.service.engine.options import EngineConfig, ScoreOptions
    from densemap.service.engine.repository import ModelRepository, ReloadReport, default_models_dir
    from densemap.service.engine.result import MapGeometry, ScaleMap, ScoreMap, ScoreResult


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'densemap.service.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
