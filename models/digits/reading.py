"""Reading a page from a dense map: per-digit checks and digit detection (numpy only).

Cell (i, j) of a map with stride S, window R and origin o looks at the window whose
top-left corner is ``o + (i*S, j*S)``; its centre is ``o + i*S + R/2``. So the cell centred
nearest a point y is ``i = round((y - o - R/2) / S)``.

- :func:`score_page` checks the cell nearest each drawn digit (does it name the digit?) and
  every "blank" cell, whose window touches no digit box (does it say background?).
- :func:`find_digits` turns a map into detections: 8-connected groups of cells with the
  same digit class, each reported at its most confident cell; a group closer than
  ``min_distance`` px to a group with more probability mass (usually a few fringe cells
  naming a look-alike class next to a digit) is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass

import numpy as np

from models.digits.data import OFF_CENTRE_MIN, Placement


@dataclass(frozen=True)
class Grid:
    """Where cells sit in page pixels (per axis (h, w)); see the module docstring."""

    stride: tuple[int, int]
    window: tuple[int, int]
    origin: tuple[int, int] = (0, 0)

    def nearest_cell(self, centre: tuple[float, float]) -> tuple[int, int]:
        return tuple(
            int(np.floor((c - o - r / 2) / s + 0.5))
            for c, o, r, s in zip(centre, self.origin, self.window, self.stride, strict=True)
        )

    def cell_centre(self, i: int, j: int) -> tuple[float, float]:
        return (
            self.origin[0] + i * self.stride[0] + self.window[0] / 2,
            self.origin[1] + j * self.stride[1] + self.window[1] / 2,
        )


@dataclass(frozen=True)
class PageScore:
    """Counts over one or more pages (add them with ``+``)."""

    digits: int = 0  # digits drawn
    read: int = 0  # digits whose nearest cell names their class
    blank_cells: int = 0  # cells whose window touches no digit box
    blank_false: int = 0  # ... of which do not say background
    off_cells: int = 0  # cells touching a digit, all digit centres >= off_centre px away
    off_false: int = 0  # ... of which name a digit (a digit seen off its centre)

    def __add__(self, other: PageScore) -> PageScore:
        return PageScore(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    @property
    def reading_accuracy(self) -> float:
        return self.read / self.digits if self.digits else float("nan")

    @property
    def blank_false_positive_rate(self) -> float:
        return self.blank_false / self.blank_cells if self.blank_cells else float("nan")

    @property
    def off_centre_false_positive_rate(self) -> float:
        return self.off_false / self.off_cells if self.off_cells else float("nan")


def touched_cells(
    shape: tuple[int, int], grid: Grid, placements: Sequence[Placement]
) -> np.ndarray:
    """Boolean [n_h, n_w]: cells whose window overlaps at least one digit box."""
    touched = np.zeros(shape, dtype=bool)
    for p in placements:
        # window [o + iS, o + iS + R) overlaps box [top, top + size) on each axis
        spans = []
        for start, o, r, s, n in zip(
            (p.top, p.left), grid.origin, grid.window, grid.stride, shape, strict=True
        ):
            first = max(int(np.floor((start - o - r) / s)) + 1, 0)
            last = min(int(np.ceil((start + p.size - o) / s)) - 1, n - 1)
            spans.append((first, last))
        (i0, i1), (j0, j1) = spans
        if i0 <= i1 and j0 <= j1:
            touched[i0 : i1 + 1, j0 : j1 + 1] = True
    return touched


def centre_distance(
    shape: tuple[int, int], grid: Grid, placements: Sequence[Placement]
) -> np.ndarray:
    """[n_h, n_w]: Chebyshev distance (px) from each cell centre to the nearest digit centre."""
    rows = grid.origin[0] + np.arange(shape[0]) * grid.stride[0] + grid.window[0] / 2
    cols = grid.origin[1] + np.arange(shape[1]) * grid.stride[1] + grid.window[1] / 2
    distance = np.full(shape, np.inf)
    for p in placements:
        d = np.maximum(np.abs(rows - p.centre[0])[:, None], np.abs(cols - p.centre[1])[None, :])
        np.minimum(distance, d, out=distance)
    return distance


def score_page(
    label_map: np.ndarray,
    grid: Grid,
    placements: Sequence[Placement],
    *,
    background: int,
    off_centre: float = OFF_CENTRE_MIN,
) -> PageScore:
    """Check a [n_h, n_w] class map against the digits drawn on the page."""
    n_h, n_w = label_map.shape
    read = 0
    for p in placements:
        i, j = grid.nearest_cell(p.centre)
        if 0 <= i < n_h and 0 <= j < n_w and label_map[i, j] == p.label:
            read += 1
    touched = touched_cells((n_h, n_w), grid, placements)
    off = touched & (centre_distance((n_h, n_w), grid, placements) >= off_centre)
    return PageScore(
        digits=len(placements),
        read=read,
        blank_cells=int((~touched).sum()),
        blank_false=int((label_map[~touched] != background).sum()),
        off_cells=int(off.sum()),
        off_false=int((label_map[off] != background).sum()),
    )


@dataclass(frozen=True)
class Detection:
    """A digit found on a page: its class, confidence and centre in page pixels."""

    label: int
    score: float
    centre: tuple[float, float]
    cells: int  # size of the group of cells that named it
    mass: float  # sum of the group's cell probabilities for its class


def find_digits(
    probabilities: np.ndarray,
    grid: Grid,
    *,
    background: int,
    min_score: float = 0.5,
    min_distance: float = 10.0,
) -> list[Detection]:
    """Detections from a [C, n_h, n_w] probability map, most confident first."""
    label_map = probabilities.argmax(axis=0)
    peak = probabilities.max(axis=0)
    candidate = (label_map != background) & (peak >= min_score)
    seen = np.zeros_like(candidate)
    n_h, n_w = label_map.shape
    found = []
    for i0, j0 in zip(*np.nonzero(candidate), strict=True):
        if seen[i0, j0]:
            continue
        label = label_map[i0, j0]
        stack, group = [(i0, j0)], []
        seen[i0, j0] = True
        while stack:
            i, j = stack.pop()
            group.append((i, j))
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    a, b = i + di, j + dj
                    if 0 <= a < n_h and 0 <= b < n_w and not seen[a, b]:
                        if candidate[a, b] and label_map[a, b] == label:
                            seen[a, b] = True
                            stack.append((a, b))
        best = max(group, key=lambda cell: peak[cell])
        found.append(
            Detection(
                label=int(label),
                score=float(peak[best]),
                centre=grid.cell_centre(*best),
                cells=len(group),
                mass=float(sum(peak[cell] for cell in group)),
            )
        )
    kept: list[Detection] = []
    for det in sorted(found, key=lambda d: -d.mass):
        if all(_distance(det.centre, other.centre) > min_distance for other in kept):
            kept.append(det)
    return sorted(kept, key=lambda d: -d.score)


def _distance(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Chebyshev distance in pixels."""
    return max(abs(a[0] - b[0]), abs(a[1] - b[1]))


def digit_box(centre: tuple[float, float], size: float) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of a drawn digit of side ``size`` centred at (y, x) ``centre``."""
    y, x = centre
    return (x - size / 2, y - size / 2, x + size / 2, y + size / 2)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    overlap = max(width, 0.0) * max(height, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - overlap
    return overlap / union if union > 0 else 0.0


def match_boxes(found, truth, *, min_iou: float = 0.5) -> int:
    """How many of ``found`` [(label, box)], best first, match a digit of ``truth``
    [(label, box)]: greedily, each to the first unmatched digit with the same label and
    IoU >= ``min_iou`` (a detection with the wrong label matches nothing)."""
    free = list(range(len(truth)))
    matched = 0
    for label, box in found:
        for k in free:
            if truth[k][0] == label and box_iou(box, truth[k][1]) >= min_iou:
                free.remove(k)
                matched += 1
                break
    return matched
