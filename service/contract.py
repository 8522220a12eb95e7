"""The metadata contract between ``convert/`` (writer) and ``service/`` (reader).

A dense model is one ONNX file whose ``metadata_props`` hold one JSON document under the
key :data:`METADATA_KEY`. This module is the only place that defines that document; the
converter builds a :class:`ModelMetadata` and calls :meth:`ModelMetadata.to_props`, the
engine calls :meth:`ModelMetadata.from_props` on what onnxruntime or onnx reads back.

Geometry conventions (all per axis, as ``(h, w)`` tuples of ints):

- ``window`` R: the training input size of the classifier. Cell ``(i, j)`` of the map at the
  native stride is the classifier applied to the crop whose top-left corner is
  ``(origin_h + i*S_h, origin_w + j*S_w)`` and whose size is R. ``origin`` is ``(0, 0)`` for
  every model the converter writes.
- ``stride`` S: the total stride of the trunk (the native output stride).
- ``receptive_field``: the true receptive field of one cell, padding included, and
  ``receptive_field_offset``: where it starts relative to the window's top-left corner
  (negative for padded nets, whose field hangs over the window). For unpadded nets the field
  lies inside the window.
- ``effective_window``: the part of R that actually influences a cell (a strided trunk can
  ignore trailing pixels of R); ``effective_window <= window``.
- ``padded``: whether any conv/pool before the head pads. Padded nets are NOT equal to
  crop-by-crop evaluation (crops see zeros at their border); see README "Exactness".
- Cells per axis on an image of size W: ``n = (W - R) // S + 1``; an image smaller than R
  has no cell. Models written by the converter return exactly n (the crop is in the graph);
  the engine crops any extra cell an older model returns (ceil_mode pooling) to n.

Variants: à-trous networks with a finer output stride S/k, stored as separate ONNX files
next to the main one, listed in ``variants`` with their output stride and file name.

Heads (version 2): a model may have several outputs over the same trunk, for example class
scores plus box regression. Each output is a :class:`Head`: the ONNX output's name, its
kind (``logits``, ``probabilities``, ``sigmoid`` or ``regression`` = raw values) and
optional channel labels. Every head is a dense map with the same geometry. The *primary*
head is the classification head that top-k, argmax, heat-maps and detections read; it
must classify (any kind but ``regression``). In Python the primary head is the fields
``output_name``/``output_kind``/``labels`` (as in version 1) and the others are
``extra_heads``; :attr:`ModelMetadata.heads` lists them all, primary first.

``random_weights``: true when the converter was asked to write a model whose weights were
never trained (``densemap convert --arch NAME --random-weights``, for trials and
benchmarks): its scores mean nothing. The key is optional and additive, so the contract
stays version 2: a file without it (older converters) reads as false, and older readers
ignore it.

``int8``: int8 copies of the model and of each à-trous variant, written by
``densemap convert --int8-calibration IMAGES_DIR`` with onnxruntime's static QDQ
quantization, and how far the main net's int8 map was from fp32 on the calibration images
(:class:`Int8Copies`). The key is optional and additive like ``random_weights``: a file
without it has no int8 precision, and older readers ignore it (they read the fp32 model
as before), so the contract stays version 2. Bumping the version would make every older
densemap refuse these files, although all they lack is a precision they never offered.

Versions: 1 had one output, described by top-level ``output_name``, ``output_kind`` and
``labels``. 2 lists every output under ``heads`` (primary first) instead. Writers write
:data:`CONTRACT_VERSION`; readers read every version up to it and refuse newer ones.
Bump :data:`CONTRACT_VERSION` on any incompatible change.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field

from densemap.service.errors import ModelLoadError

CONTRACT_VERSION = 2
METADATA_KEY = "densemap"

LAYOUTS = ("NCHW", "NHWC")
COLOR_ORDERS = ("RGB", "BGR", "L")
# "sigmoid": independent per-class probabilities (multi-label heads); a softmax of them means
# nothing. Kinds a head that classifies may have; the primary head has one of these.
OUTPUT_KINDS = ("logits", "probabilities", "sigmoid")
# "regression": raw values per channel (box offsets, landmarks), never softmaxed or ranked.
HEAD_KINDS = (*OUTPUT_KINDS, "regression")

Pair = tuple[int, int]


def warn_renamed(old: str, new: str) -> None:
    """A DeprecationWarning for a public name that was renamed (README "Changelog")."""
    warnings.warn(f"{old} is deprecated: use {new}", DeprecationWarning, stacklevel=3)


def parse_labels(text: str) -> tuple[str, ...]:
    """Labels of a ``labels.txt``: one per line, stripped, trailing blank lines ignored."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return tuple(line.strip() for line in lines)


def _int8(doc) -> Int8Copies | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise ModelLoadError(f"metadata field 'int8' must be an object, got {doc!r}")
    return Int8Copies(**doc)


def _pair(value, name: str) -> Pair:
    """Return ``value`` as an (h, w) pair of ints; an int means a square."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        h, w = value
    except (TypeError, ValueError):
        raise ModelLoadError(
            f"metadata field {name!r} must be an int or [h, w], got {value!r}"
        ) from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (h, w)):
        raise ModelLoadError(f"metadata field {name!r} must hold integers, got {value!r}")
    return (h, w)


@dataclass(frozen=True)
class Geometry:
    """Where each cell of the map looks in the input image (see module docstring)."""

    window: Pair
    stride: Pair
    receptive_field: Pair
    receptive_field_offset: Pair = (0, 0)
    effective_window: Pair | None = None
    origin: Pair = (0, 0)
    padded: bool = False

    def __post_init__(self) -> None:
        for name in ("window", "stride", "receptive_field", "receptive_field_offset", "origin"):
            object.__setattr__(self, name, _pair(getattr(self, name), name))
        ew = self.window if self.effective_window is None else self.effective_window
        object.__setattr__(self, "effective_window", _pair(ew, "effective_window"))
        if min(self.window) < 1 or min(self.stride) < 1 or min(self.receptive_field) < 1:
            raise ModelLoadError(f"geometry sizes must be >= 1, got {self}")

    def cells(self, height: int, width: int) -> Pair:
        """Number of cells (n_h, n_w) on an image of this size; (0, 0)-free: may be <= 0."""
        return (
            (height - self.window[0]) // self.stride[0] + 1,
            (width - self.window[1]) // self.stride[1] + 1,
        )

    def window_at(self, i: int, j: int) -> tuple[int, int, int, int]:
        """The window of cell (i, j) as (top, left, bottom, right) pixel rows and columns,
        bottom/right exclusive. (A *box* in densemap is a detection's (x0, y0, x1, y1).)"""
        top = self.origin[0] + i * self.stride[0]
        left = self.origin[1] + j * self.stride[1]
        return (top, left, top + self.window[0], left + self.window[1])

    def box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """Deprecated name of :meth:`window_at` (same (top, left, bottom, right) order)."""
        warn_renamed("Geometry.box", "Geometry.window_at")
        return self.window_at(i, j)


@dataclass(frozen=True)
class Preprocessing:
    """How raw pixels become the model's input tensor: ``(pixel * scale - mean) / std``.

    ``color`` is the channel order the model expects (``L`` = one grey channel).
    ``mean``/``std`` have one entry per channel, in that order.
    """

    layout: str = "NCHW"
    color: str = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.layout not in LAYOUTS:
            raise ModelLoadError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.color not in COLOR_ORDERS:
            raise ModelLoadError(f"color must be one of {COLOR_ORDERS}, got {self.color!r}")
        channels = self.channels
        if len(self.mean) != channels or len(self.std) != channels:
            raise ModelLoadError(
                f"mean and std need {channels} values for color {self.color!r}, "
                f"got mean={self.mean} std={self.std}"
            )
        if any(s == 0 or not math.isfinite(s) for s in self.std):
            raise ModelLoadError(f"std values must be finite and non-zero, got {self.std}")

    @property
    def channels(self) -> int:
        return 1 if self.color == "L" else 3


@dataclass(frozen=True)
class Variant:
    """An à-trous network with a finer output stride, stored next to the main model."""

    stride: Pair
    file: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "stride", _pair(self.stride, "variants.stride"))
        if "/" in self.file or "\\" in self.file or self.file in ("", ".", ".."):
            raise ModelLoadError(f"variant file must be a bare file name, got {self.file!r}")


@dataclass(frozen=True)
class Int8Copies:
    """The int8 copies of a model (module docstring) and their deviation from fp32, measured
    when they were calibrated: over every cell of every calibration image, the worst of
    the main net and its variants."""

    file: str  # the main net's int8 copy, beside it
    variants: tuple[Variant, ...] = ()  # one int8 copy per à-trous variant, by stride
    images: int = 0  # calibration images
    cells: int = 0  # cells compared, all nets together
    max_probability_deviation: float = 0.0  # max |p - p_fp32| (softmax of logits)
    max_logit_deviation: float = 0.0  # max |z - z_fp32| / (max z_fp32 - min z_fp32)
    argmax_agreement: float = 1.0  # share of cells whose top class is fp32's, worst net

    def __post_init__(self) -> None:
        Variant(stride=(1, 1), file=self.file)  # the same bare-file-name rule
        variants = tuple(v if isinstance(v, Variant) else Variant(**v) for v in self.variants)
        object.__setattr__(self, "variants", variants)
        for name in ("images", "cells"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ModelLoadError(f"int8 field {name!r} must be a count, got {value!r}")
        for name in ("max_probability_deviation", "max_logit_deviation", "argmax_agreement"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ModelLoadError(f"int8 field {name!r} must be a number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))

    def file_for(self, stride: Pair) -> str | None:
        """The int8 copy of the variant of ``stride`` (None: that variant has none)."""
        return next((v.file for v in self.variants if v.stride == stride), None)


@dataclass(frozen=True)
class Head:
    """One output of the model: a dense map with the model's geometry (module docstring)."""

    name: str
    kind: str = "logits"
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(str(v) for v in self.labels))
        if not isinstance(self.name, str) or not self.name:
            raise ModelLoadError(f"a head needs a non-empty output name, got {self.name!r}")
        if self.kind not in HEAD_KINDS:
            raise ModelLoadError(
                f"head {self.name!r}: kind must be one of {HEAD_KINDS}, got {self.kind!r}"
            )

    @property
    def classifies(self) -> bool:
        """Whether the head scores classes (softmax/top-k/argmax mean something)."""
        return self.kind in OUTPUT_KINDS

    def to_doc(self) -> dict:
        return {"name": self.name, "kind": self.kind, "labels": list(self.labels)}


@dataclass(frozen=True)
class ModelMetadata:
    """Everything the service needs to know about a dense model, beyond its graph."""

    geometry: Geometry
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    labels: tuple[str, ...] = ()
    output_kind: str = "logits"
    input_name: str = "input"
    output_name: str = "scores"
    variants: tuple[Variant, ...] = ()
    source: str = ""
    converter_version: str = ""
    version: int = CONTRACT_VERSION
    extra_heads: tuple[Head, ...] = ()
    random_weights: bool = False  # written with untrained weights on purpose (docstring)
    int8: Int8Copies | None = None  # int8 copies and their calibration figures (docstring)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(str(v) for v in self.labels))
        if not isinstance(self.random_weights, bool):
            raise ModelLoadError(
                f"metadata field 'random_weights' must be true or false, got {self.random_weights!r}"
            )
        object.__setattr__(self, "variants", tuple(self.variants))
        object.__setattr__(self, "extra_heads", tuple(self.extra_heads))
        if self.output_kind not in OUTPUT_KINDS:
            raise ModelLoadError(
                f"output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}"
                + (": the primary head must classify" if self.output_kind in HEAD_KINDS else "")
            )
        names = [head.name for head in self.heads]
        if len(set(names)) != len(names):
            raise ModelLoadError(f"head names must be unique, got {names}")
        if self.input_name in names:
            raise ModelLoadError(f"the input name {self.input_name!r} is also a head's name")

    @property
    def primary_head(self) -> Head:
        """The classification head that top-k, argmax, heat-maps and detections read."""
        return Head(self.output_name, self.output_kind, self.labels)

    @property
    def heads(self) -> tuple[Head, ...]:
        """Every output of the model, primary first."""
        return (self.primary_head, *self.extra_heads)

    def head(self, name: str) -> Head:
        """The head named ``name``; ModelLoadError naming the heads there are otherwise."""
        for head in self.heads:
            if head.name == name:
                return head
        raise ModelLoadError(
            f"the model has no head {name!r}; its heads are {[h.name for h in self.heads]}"
        )

    # -- serialisation -------------------------------------------------------------------
    def to_json(self) -> str:
        """The current version's document: the primary head and the others under ``heads``."""
        doc = asdict(self)
        for key in ("labels", "output_kind", "output_name", "extra_heads"):
            del doc[key]
        doc["heads"] = [head.to_doc() for head in self.heads]
        if self.int8 is None:
            del doc["int8"]  # optional and additive: files without int8 stay as they were
        doc["version"] = CONTRACT_VERSION
        return json.dumps(doc, sort_keys=True)

    def to_props(self) -> dict[str, str]:
        """The ``metadata_props`` entries to write into the ONNX model."""
        return {METADATA_KEY: self.to_json()}

    @classmethod
    def from_json(cls, text: str) -> ModelMetadata:
        try:
            doc = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"densemap metadata is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ModelLoadError("densemap metadata must be a JSON object")
        version = doc.get("version")
        if not isinstance(version, int) or version < 1:
            raise ModelLoadError(f"densemap metadata has no valid 'version' (got {version!r})")
        if version > CONTRACT_VERSION:
            raise ModelLoadError(
                f"model metadata is contract version {version}, this densemap reads up to "
                f"{CONTRACT_VERSION}: upgrade densemap"
            )
        try:
            if version >= 2:
                heads = [Head(**head) for head in doc["heads"]]
                if not heads:
                    raise ModelLoadError("densemap metadata lists no heads")
            else:  # version 1: one output, described at the top level
                heads = [
                    Head(
                        name=doc.get("output_name", "scores"),
                        kind=doc.get("output_kind", "logits"),
                        labels=tuple(doc.get("labels", ())),
                    )
                ]
            primary, *extra = heads
            return cls(
                geometry=Geometry(**doc["geometry"]),
                preprocessing=Preprocessing(**doc.get("preprocessing", {})),
                labels=primary.labels,
                output_kind=primary.kind,
                input_name=doc.get("input_name", "input"),
                output_name=primary.name,
                extra_heads=tuple(extra),
                variants=tuple(Variant(**v) for v in doc.get("variants", ())),
                source=doc.get("source", ""),
                converter_version=doc.get("converter_version", ""),
                version=version,
                random_weights=doc.get("random_weights", False),
                int8=_int8(doc.get("int8")),
            )
        except ModelLoadError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"densemap metadata is malformed: {exc!r}") from None

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ModelMetadata:
        """Read the contract from ONNX ``metadata_props`` (a plain str -> str mapping)."""
        if METADATA_KEY not in props:
            raise ModelLoadError(
                f"the ONNX model has no '{METADATA_KEY}' metadata: convert it with "
                "'densemap convert' first"
            )
        return cls.from_json(props[METADATA_KEY])

    @property
    def supported_strides(self) -> tuple[Pair, ...]:
        """Output strides this model gives in one pass: native first, then variants."""
        return (self.geometry.stride, *(v.stride for v in self.variants))
