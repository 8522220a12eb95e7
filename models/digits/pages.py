"""Synthetic pages: held-out digits scattered on paper, with their ground truth.

A page is W x H px (multiples of the stride), digits of 16-20 px with centres at least
:data:`~models.digits.data.MIN_SPACING` px apart, each centre at least half a window from
the border so that some cell of the native map is centred within half a stride of it.
The sample pages shipped for the demo and the pages used to measure page reading are made
here, from the test split only, with fixed seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from models.digits.data import (
    DIGIT_SIZES,
    MIN_SPACING,
    WINDOW,
    Paper,
    Placement,
    compose,
    draw_paper,
    place_centred,
)

SAMPLE_PAGE_SEED = 2024
SAMPLE_PAGE_SHAPES = ((240, 320), (320, 320), (200, 400))  # (height, width)
SAMPLE_PAGE_DIGITS = (24, 30, 24)


@dataclass(frozen=True)
class Page:
    """A uint8 (H, W) page, dark ink on light paper, and the digits drawn on it."""

    image: np.ndarray
    placements: tuple[Placement, ...]
    paper: Paper

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape


def scatter(
    glyphs: np.ndarray,
    labels: np.ndarray,
    *,
    shape: tuple[int, int],
    count: int,
    rng: np.random.Generator,
    max_tries: int = 200,
) -> list[Placement]:
    """Up to ``count`` placements at random spaced positions (fewer if the page is full)."""
    height, width = shape
    margin = WINDOW / 2
    placements: list[Placement] = []
    for _ in range(count):
        for _ in range(max_tries):
            centre = (
                rng.uniform(margin, height - margin),
                rng.uniform(margin, width - margin),
            )
            size = int(rng.choice(DIGIT_SIZES))
            index = int(rng.integers(len(glyphs)))
            candidate = place_centred(glyphs[index], int(labels[index]), centre=centre, size=size)
            cy, cx = candidate.centre
            if not (margin <= cy <= height - margin and margin <= cx <= width - margin):
                continue
            if all(
                max(abs(cy - p.centre[0]), abs(cx - p.centre[1])) >= MIN_SPACING for p in placements
            ):
                placements.append(candidate)
                break
    return placements


def make_page(
    glyphs: np.ndarray,
    labels: np.ndarray,
    *,
    shape: tuple[int, int],
    count: int,
    rng: np.random.Generator,
) -> Page:
    """A page of ``shape`` with up to ``count`` digits on a random paper."""
    placements = scatter(glyphs, labels, shape=shape, count=count, rng=rng)
    paper = draw_paper(rng)
    image = compose(shape, placements, paper=paper, rng=rng)
    return Page(image=image, placements=tuple(placements), paper=paper)


def make_pages(
    glyphs: np.ndarray,
    labels: np.ndarray,
    *,
    shapes: tuple[tuple[int, int], ...],
    counts: tuple[int, ...],
    seed: int,
) -> list[Page]:
    """One page per (shape, count), all from one seeded generator (deterministic)."""
    rng = np.random.default_rng(seed)
    return [
        make_page(glyphs, labels, shape=shape, count=count, rng=rng)
        for shape, count in zip(shapes, counts, strict=True)
    ]


def sample_pages(glyphs: np.ndarray, labels: np.ndarray) -> list[Page]:
    """The demo pages shipped under ``models/digits/pages/`` (from held-out digits)."""
    return make_pages(
        glyphs, labels, shapes=SAMPLE_PAGE_SHAPES, counts=SAMPLE_PAGE_DIGITS, seed=SAMPLE_PAGE_SEED
    )


def write_pages(pages: list[Page], folder: Path) -> list[Path]:
    """Write ``page_1.png``... (8-bit grey) and ``page_N.txt`` ground truth; returns the PNGs.

    A ground-truth line is ``label centre_y centre_x size`` in page pixels.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for number, page in enumerate(pages, start=1):
        png = folder / f"page_{number}.png"
        tmp = png.with_suffix(".png.tmp")
        Image.fromarray(page.image, mode="L").save(tmp, format="PNG", optimize=True)
        tmp.replace(png)
        truth = folder / f"page_{number}.txt"
        lines = [f"{p.label} {p.centre[0]:g} {p.centre[1]:g} {p.size}" for p in page.placements]
        tmp = truth.with_suffix(".txt.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(truth)
        written.append(png)
    return written
