"""What the engine returns: score maps with the geometry that places every cell."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from densemap.service.contract import warn_renamed
from densemap.service.engine.heads import HeadInfo


@dataclass(frozen=True)
class MapGeometry:
    """Places cell (i, j) of one map in ORIGINAL-image pixels.

    ``stride`` and ``window`` are in pixels of the image the net saw (the image resized
    by ``scale``); ``resize`` is the exact (h, w) ratio resized/original used for that map.
    """

    stride: tuple[int, int]
    window: tuple[int, int]
    origin: tuple[int, int]
    receptive_field: tuple[int, int]
    receptive_field_offset: tuple[int, int]
    scale: float = 1.0
    resize: tuple[float, float] = (1.0, 1.0)

    def box(self, i: int, j: int) -> tuple[float, float, float, float]:
        """Deprecated name of :meth:`window_at` (same (top, left, bottom, right) order)."""
        warn_renamed("MapGeometry.box", "MapGeometry.window_at")
        return self.window_at(i, j)

    def window_at(self, i: int, j: int) -> tuple[float, float, float, float]:
        """The window of cell (i, j) as (top, left, bottom, right) in original-image pixels
        (rows, then columns). A *box* in densemap is a detection's (x0, y0, x1, y1)."""
        top = (self.origin[0] + i * self.stride[0]) / self.resize[0]
        left = (self.origin[1] + j * self.stride[1]) / self.resize[1]
        return (
            top,
            left,
            top + self.window[0] / self.resize[0],
            left + self.window[1] / self.resize[1],
        )


@dataclass
class ScaleMap:
    """One map: ``scores`` is [C, n_h, n_w] (None when not requested); ``head_maps`` holds
    each returned extra head's map [channels, n_h, n_w] by head name (same cells)."""

    geometry: MapGeometry
    scores: np.ndarray | None = None
    top_k_indices: np.ndarray | None = None  # [k, n_h, n_w] int32, best first
    top_k_scores: np.ndarray | None = None  # [k, n_h, n_w]
    argmax: np.ndarray | None = None  # [n_h, n_w] int32
    classes: tuple[int, ...] | None = None  # class index of each channel of ``scores``
    cells: tuple[int, int] | None = None  # (n_h, n_w), set by the engine even with no array
    head_maps: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """(n_h, n_w): cells per axis."""
        for arr in (self.scores, self.argmax, self.top_k_indices, *self.head_maps.values()):
            if arr is not None:
                return tuple(arr.shape[-2:])
        if self.cells is not None:
            return tuple(self.cells)
        raise ValueError("map holds no array")


@dataclass(frozen=True)
class Detection:
    """One box: a class found by the cells of one map (docs/engine.md "Detections").

    ``box`` is (x0, y0, x1, y1) in original-image pixels (x right, y down; x1, y1 exclusive
    edges, so the width is x1 - x0); ``scale_index`` and ``cell`` (i, j) name the map cell
    that gave it, ``scale`` that map's image scale.
    """

    class_index: int
    label: str
    score: float
    box: tuple[float, float, float, float]
    scale: float
    scale_index: int
    cell: tuple[int, int]


@dataclass
class ScoreResult:
    """The whole result of :meth:`Engine.score` (and of the client's ``score``): one
    :class:`ScaleMap` per requested scale, image-level scores, detections."""

    maps: list[ScaleMap]
    image_scores: np.ndarray  # [num_classes] mean cell probability, averaged over scales
    image_top_k: list[tuple[int, float]]  # (class index, score), best first
    labels: tuple[str, ...] = ()
    image_size: tuple[int, int] = (0, 0)  # (h, w) of the original image
    timings: dict[str, float] = field(default_factory=dict)  # seconds: decode, infer, ...
    detections: list[Detection] | None = None  # best first; None unless asked for
    heads: tuple[HeadInfo, ...] = ()  # the extra heads of every ScaleMap.head_maps


ScoreMap = ScoreResult  # deprecated: the name before 0.x (it held several maps); public API


@dataclass(frozen=True)
class PrecisionReport:
    """How far one precision's map is from the exact fp32 map, on one image."""

    precision: str
    max_probability_deviation: float  # max |p - p_fp32| over cells and classes
    max_logit_deviation: (
        float  # max |z - z_fp32| / (max z_fp32 - min z_fp32); z: the model's raw output
    )
    argmax_agreement: float  # share of cells whose top class is the fp32 one
    cells: int
    image: str  # what it was measured on
