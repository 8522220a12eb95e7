"""Per-model settings in the repository: ``<model folder>/densemap.json`` (optional).

```json
{"precision": "fp16", "warmup_shapes": [[1000, 1032], [2048, 2048]],
 "report_precisions": ["fp16", "tf32"], "runtime": "torch",
 "box_offsets": [0.1, 0.1, -0.1, -0.1], "detections": {"iou": 0.3, "across_classes": true}}
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
- ``detections``: the model's detection settings, for requests (``densemap score
  --detections``, the servers' detection options) that do not set their own: any of
  ``threshold`` (0..1), ``iou`` (0..1), ``max_count`` (1..10000) and ``across_classes``
  (true/false); :class:`~densemap.service.engine.options.DetectionDefaults`.

Unknown keys and wrong types are load errors naming the key: a typo must not silently fall
back to the defaults. ``densemap convert --nms-iou ... --across-classes`` writes the
``detections`` key (:func:`write_detection_settings`).
"""

from __future__ import annotations

import json
import os
from dataclasses import fields, replace
from pathlib import Path

from densemap.service.engine.options import DetectionDefaults, EngineConfig
from densemap.service.errors import InvalidOption, ModelLoadError

SETTINGS_FILE = "densemap.json"
KEYS = ("precision", "warmup_shapes", "report_precisions", "box_offsets", "runtime", "detections")


def parse_detections(value) -> DetectionDefaults:
    """The ``"detections"`` object as :class:`DetectionDefaults`, which checks each value
    (InvalidOption naming it); keys that are not its fields are refused."""
    known = tuple(f.name for f in fields(DetectionDefaults))
    if not isinstance(value, dict) or not set(value) <= set(known):
        raise InvalidOption(
            f"detections must be an object with any of the keys {known}, got {value!r}"
        )
    return DetectionDefaults(**value)


def apply_model_settings(folder: Path, config: EngineConfig) -> EngineConfig:
    """``config`` with the settings of ``folder/densemap.json`` (unchanged without one).

    The keys are EngineConfig fields, checked by EngineConfig itself (``detections`` by
    DetectionDefaults); a bad value is a ModelLoadError naming the file and the field."""
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
        if "detections" in settings:
            settings["detections"] = parse_detections(settings["detections"])
        return replace(config, **settings)
    except InvalidOption as exc:
        raise ModelLoadError(f"{path}: {exc}") from None


def write_detection_settings(folder: Path, detections: dict) -> Path:
    """Merge ``detections`` (keys of :class:`DetectionDefaults`) into the ``detections`` of
    ``folder/densemap.json``, keeping every other setting; checked as a load checks it, then
    written whole (temp file + rename). Returns the file's path."""
    path = folder / SETTINGS_FILE
    settings: dict = {}
    if path.is_file():
        try:
            settings = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{path} is not readable JSON: {exc}; fix or remove it") from None
        if not isinstance(settings, dict):
            raise ModelLoadError(f"{path} must hold a JSON object with keys {KEYS}")
    current = settings.get("detections", {})
    merged = {**current, **detections} if isinstance(current, dict) else current
    try:
        parse_detections(merged)
    except InvalidOption as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    settings["detections"] = merged
    partial = path.with_name(f".{SETTINGS_FILE}.{os.getpid()}.partial")
    try:
        partial.write_text(json.dumps(settings) + "\n", encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
