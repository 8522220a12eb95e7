"""densemap: dense CNN scoring (see README.md).

One import name for everything the wheel installs. The repository keeps its folders
(``service/``, ``convert/``, ``protos/``, ``models/``); packaging maps them under this name::

    densemap                    this folder: the public API below, ``python -m densemap``
    densemap.service            service/   engine, gRPC server and client, CLI, batch scoring
    densemap.convert            convert/   classifier -> dense ONNX (needs densemap[convert])
    densemap.service.bundled_models   models/digits' served files (data only)

The public API, importable from the top::

    from densemap import Engine, EngineConfig, ScoreOptions, DensemapClient, convert

Names are resolved on first use (PEP 562), so ``from densemap import DensemapClient`` loads
neither an inference runtime nor the engine, and ``densemap.convert`` is the converter package
(its torch entry points import torch only when called).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from densemap.service import __version__

# public name -> module that defines it
_EXPORTS = {
    "Engine": "densemap.service.engine",
    "EngineConfig": "densemap.service.engine",
    "ScoreOptions": "densemap.service.engine",
    "DensemapClient": "densemap.service.client",
    "DensemapError": "densemap.service.errors",
}

__all__ = [
    "DensemapClient",
    "DensemapError",
    "Engine",
    "EngineConfig",
    "ScoreOptions",
    "__version__",
    "convert",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ loads these
    from densemap import convert
    from densemap.service.client import DensemapClient
    from densemap.service.engine import Engine, EngineConfig, ScoreOptions
    from densemap.service.errors import DensemapError


def __getattr__(name: str) -> Any:
    if name == "convert":
        return importlib.import_module("densemap.convert")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # resolved once
        return value
    raise AttributeError(f"module 'densemap' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
