"""The preprocessing a converted model records: given by the user, never guessed.

A dense model's metadata says how raw pixels become its input, ``(pixel * scale - mean) /
std`` in a colour order (:class:`densemap.service.contract.Preprocessing`), and every map the
service computes depends on it. An ONNX classifier or a torch module carries no normalisation, so
converting one without it is refused (``--preprocessing`` on the command line, the
``preprocessing`` argument in Python); the built-in ``--arch`` networks bring torchvision's. It is given as a JSON file or as one of
the presets below, adapted to the model's layout:

- ``imagenet``: RGB, pixels / 255, then ImageNet's mean and std (torchvision's classifiers
  and most PyTorch-trained nets);
- ``caffe``: BGR, raw 0-255 pixels minus the ImageNet mean in BGR (Caffe's VGG/ResNet and
  the Caffe2 model zoo);
- ``unit``: pixels / 255, nothing else (grey or RGB);
- ``none``: the raw 0-255 pixel values (grey or RGB).
"""

from __future__ import annotations

import json
from pathlib import Path

from densemap.service.contract import Preprocessing
from densemap.service.errors import ConversionError, ModelLoadError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
PRESETS = ("imagenet", "caffe", "unit", "none")
FIELDS = "layout, color, scale, mean, std"
MISSING = (
    "the classifier carries no input normalisation and densemap does not guess it: "
    "pass --preprocessing imagenet (pixels/255, then ImageNet mean/std: torchvision and "
    "most PyTorch nets), --preprocessing unit (pixels/255), --preprocessing caffe (BGR "
    "0-255 minus the mean), --preprocessing none (raw 0-255) or --preprocessing FILE.json "
    f"({FIELDS})"
)
MISSING_ARGUMENT = MISSING.replace("--preprocessing ", "preprocessing=")  # the Python API


def preset(name: str, *, layout: str, channels: int) -> Preprocessing:
    """The preset ``name`` for a model reading ``channels`` channels in ``layout``."""
    if name not in PRESETS:
        raise ConversionError(
            f"unknown preprocessing preset {name!r}: choose one of {', '.join(PRESETS)} "
            f"or give a JSON file ({FIELDS})"
        )
    if channels not in (1, 3):
        raise ConversionError(
            f"the model reads {channels} input channels; densemap's image contract supports "
            "1 (grey) or 3 (RGB/BGR)"
        )
    if name in ("imagenet", "caffe") and channels != 3:
        raise ConversionError(
            f"preprocessing preset {name!r} is for 3-channel colour models, and this one "
            "reads 1 channel: use unit, none or a JSON file"
        )
    if name == "imagenet":
        return Preprocessing(layout=layout, color="RGB", scale=1 / 255, mean=IMAGENET_MEAN,
                             std=IMAGENET_STD)  # fmt: skip
    if name == "caffe":
        return Preprocessing(layout=layout, color="BGR", scale=1.0, mean=CAFFE_MEAN_BGR,
                             std=(1.0,) * 3)  # fmt: skip
    color = "L" if channels == 1 else "RGB"
    scale = 1 / 255 if name == "unit" else 1.0
    return Preprocessing(
        layout=layout, color=color, scale=scale, mean=(0.0,) * channels, std=(1.0,) * channels
    )


def resolve(value, *, layout: str, channels: int) -> Preprocessing:
    """A :class:`Preprocessing` from what the user gave: one, a preset name or a JSON
    file's path (``None`` is refused: nothing is guessed)."""
    if value is None:
        raise ConversionError(MISSING)
    if isinstance(value, Preprocessing):
        return value
    if isinstance(value, str) and value in PRESETS:
        return preset(value, layout=layout, channels=channels)
    if isinstance(value, (str, Path)):
        return read_file(Path(value))
    raise ConversionError(
        f"preprocessing must be a Preprocessing, a preset ({', '.join(PRESETS)}) or a JSON "
        f"file, got {value!r}"
    )


def read_file(path: Path) -> Preprocessing:
    """A JSON file with the fields of :class:`Preprocessing`."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        hint = f" (or a preset: {', '.join(PRESETS)})" if not path.exists() else ""
        raise ConversionError(f"cannot read --preprocessing {path}: {exc}{hint}") from None
    try:
        return Preprocessing(**doc)
    except (TypeError, ModelLoadError) as exc:
        raise ConversionError(f"--preprocessing {path}: {exc} (fields: {FIELDS})") from None
