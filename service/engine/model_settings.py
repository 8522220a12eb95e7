"""Per-model settings in the repository: ``<model folder>/densemap.json`` (optional).

```json
{"precision": "fp16", "warmup_shapes": [[1000, 1032], [2048, 2048]],
 "report_precisions": ["fp16", "tf32"], "runtime": "torch"}
```

- ``precision``: the default precision of this model's requests ("fp32", "tf32", "fp16",
  "int8": the last needs the model's int8 copies, else the model does not load); a request
  may still choose another one.
- ``warmup_shapes``: image shapes (height, width) scored once at load, so that the first
  request of each finds the device's per-shape state ready (cuDNN algorithm choice).
- ``report_precisions``: precisions measured against fp32 at load (GetModel reports them).
- ``runtime``: what runs this model's dense nets, "ort" or "torch" (docs/engine.md
  "Runtimes"); the server's ``--runtime`` otherwise.
- ``box_offsets``: [dx1, dy1, dx2, dy2], the object box of a cell relative to its window,
  in window sizes, for detections that do not set their own (docs/engine.md "Detections").

Unknown keys and wrong types are load errors naming the key: a typo must not silently fall
back to the defaults.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from service.engine.options import EngineConfig
from service.errors import InvalidOption, ModelLoadError

SETTINGS_FILE = "densemap.json"
KEYS = ("precision", "warmup_shapes", "report_precisions", "box_offsets", "runtime")


def apply_model_settings(folder: Path, config: EngineConfig) -> EngineConfig:
    """``config`` with the settings of ``folder/densemap.json`` (unchanged without one).

    The keys are EngineConfig fields, checked by EngineConfig itself; a bad value is a
    ModelLoadError naming the file and the field."""
    path = folder / SETTINGS_FILE
    if not path.is_file():
        return config
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(settings, dict):
        raise ModelLoadError(f"{path} must hold a JSON object with keys {KEYS}")
    unknown = sorted(set(settings) - set(KEYS))
    if unknown:
        raise ModelLoadError(f"{path}: unknown key(s) {unknown}; known keys: {KEYS}")
    try:
        return replace(config, **settings)
    except InvalidOption as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
