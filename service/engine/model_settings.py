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
  (true/false); :class:`~service.engine.options.DetectionDefaults`.

Unknown keys and wrong types are load errors naming the key: a typo must not silently fall
back to the defaults. ``densemap convert --nms-iou ... --across-classes`` writes the
``detections`` key (:func:`write_detection_settings`).
"""

from __future__ import annotations

import json
import os
from dataclasses import fields, replace
from pathlib import Path

from service.engine.options import MAX_DETECTIONS, RUNTIMES, DetectionDefaults, EngineConfig
from service.errors import InvalidOption, ModelLoadError

SETTINGS_FILE = "densemap.json"
KEYS = ("precision", "warmup_shapes", "report_precisions", "box_offsets", "runtime", "detections")
MAX_WARMUP_SHAPES = 16


def _shapes(value, path: Path) -> tuple[tuple[int, int], ...]:
    shapes = []
    if not isinstance(value, list) or len(value) > MAX_WARMUP_SHAPES:
        raise ModelLoadError(
            f"{path}: warmup_shapes must be a list of at most {MAX_WARMUP_SHAPES} "
            f"[height, width] pairs, got {value!r}"
        )
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in item)
        ):
            raise ModelLoadError(
                f"{path}: each warmup shape must be [height, width] in pixels, got {item!r}"
            )
        shapes.append((item[0], item[1]))
    return tuple(shapes)


def _offsets(value, path: Path) -> tuple[float, float, float, float]:
    numbers = isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= 10 for v in value
    )
    if (
        not numbers
        or len(value) != 4
        or 1 + value[2] - value[0] <= 0
        or 1 + value[3] - value[1] <= 0
    ):
        raise ModelLoadError(
            f"{path}: box_offsets must be [dx1, dy1, dx2, dy2] in window sizes (|v| <= 10) "
            f"leaving a box of positive size, got {value!r}"
        )
    return tuple(float(v) for v in value)


def _detections(value, path: Path) -> DetectionDefaults:
    """The ``"detections"`` object: each key checked, named when wrong."""
    known = tuple(f.name for f in fields(DetectionDefaults))
    if not isinstance(value, dict) or not set(value) <= set(known):
        raise ModelLoadError(
            f"{path}: detections must be an object with any of the keys {known}, got {value!r}"
        )
    for name in ("threshold", "iou"):
        number = value.get(name, 0.5)
        if (
            isinstance(number, bool)
            or not isinstance(number, (int, float))
            or not (0.0 <= number <= 1.0)
        ):
            raise ModelLoadError(
                f"{path}: detections.{name} must be a number in [0, 1], got {number!r}"
            )
    count = value.get("max_count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_DETECTIONS:
        raise ModelLoadError(
            f"{path}: detections.max_count must be an int in 1..{MAX_DETECTIONS}, got {count!r}"
        )
    if not isinstance(value.get("across_classes", False), bool):
        raise ModelLoadError(
            f"{path}: detections.across_classes must be true or false, "
            f"got {value['across_classes']!r}"
        )
    return DetectionDefaults(
        **{k: float(v) if k in ("threshold", "iou") else v for k, v in value.items()}
    )


def apply_model_settings(folder: Path, config: EngineConfig) -> EngineConfig:
    """``config`` with the settings of ``folder/densemap.json`` (unchanged without one)."""
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
    from service.engine.precision import check_precision  # imports onnxruntime: only here

    changes: dict = {}
    try:
        if "precision" in settings:
            changes["precision"] = check_precision(settings["precision"])
        if "report_precisions" in settings:
            value = settings["report_precisions"]
            if not isinstance(value, list):
                raise InvalidOption(f"report_precisions must be a list, got {value!r}")
            changes["report_precisions"] = tuple(check_precision(p) for p in value)
    except InvalidOption as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    if "warmup_shapes" in settings:
        changes["warmup_shapes"] = _shapes(settings["warmup_shapes"], path)
    if "runtime" in settings:
        if settings["runtime"] not in RUNTIMES:
            raise ModelLoadError(
                f"{path}: runtime must be one of {RUNTIMES}, got {settings['runtime']!r}"
            )
        changes["runtime"] = settings["runtime"]
    if "box_offsets" in settings:
        changes["box_offsets"] = _offsets(settings["box_offsets"], path)
    if "detections" in settings:
        changes["detections"] = _detections(settings["detections"], path)
    return replace(config, **changes)


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
    _detections(merged, path)
    settings["detections"] = merged
    partial = path.with_name(f".{SETTINGS_FILE}.{os.getpid()}.partial")
    try:
        partial.write_text(json.dumps(settings) + "\n", encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
