"""Training windows: 28x28 crops labelled with a digit class or ``background``.

A window is labelled with digit d when a glyph of d has its centre within
:data:`~models.digits.data.CENTRED_MAX` px (half a stride) of the window centre on both
axes; neighbouring digits may show at its border (they keep :data:`MIN_SPACING` px between
centres, as on a page). It is ``background`` when no glyph centre lies within
:data:`~models.digits.data.OFF_CENTRE_MIN` px (one stride): blank paper, noise, digits cut
by the border or shifted by a stride or more. Offsets in between never occur in training
(both answers are acceptable there). So on a page the cell nearest a digit's centre names
it and cells a stride or more away say background: digits are localised by the map.
"""

from __future__ import annotations

import numpy as np

from models.digits.data import (
    BACKGROUND,
    CENTRED_MAX,
    DIGIT_SIZES,
    MIN_SPACING,
    OFF_CENTRE_MIN,
    WINDOW,
    Placement,
    compose,
    draw_paper,
)

BACKGROUND_FRACTION = 0.35
_CENTRE = WINDOW / 2
_FAR = MIN_SPACING + 14  # beyond this a neighbour cannot reach into the window


def _place(glyphs, labels, index: int, *, size: int, top: int, left: int) -> Placement:
    return Placement(glyph=glyphs[index], label=int(labels[index]), size=size, top=top, left=left)


def _offset_range(size: int, low: float, high: float) -> np.ndarray:
    """Integer tops whose centre offset ``top + size/2 - 14`` lies in [low, high]."""
    first = int(np.ceil(_CENTRE - size / 2 + low))
    last = int(np.floor(_CENTRE - size / 2 + high))
    return np.arange(first, last + 1)


def centred_digit(glyphs, labels, rng: np.random.Generator) -> Placement:
    size = int(rng.choice(DIGIT_SIZES))
    tops = _offset_range(size, -CENTRED_MAX, CENTRED_MAX)
    return _place(
        glyphs,
        labels,
        int(rng.integers(len(glyphs))),
        size=size,
        top=int(rng.choice(tops)),
        left=int(rng.choice(tops)),
    )


def off_centre_digit(glyphs, labels, rng: np.random.Generator) -> Placement:
    """A digit whose centre is a stride or more from the window centre (often cut off)."""
    size = int(rng.choice(DIGIT_SIZES))
    near = rng.random() < 0.6  # most are the hard case: just over a stride away
    distance = rng.uniform(OFF_CENTRE_MIN, 8.0 if near else 22.0)
    offsets = np.array([distance, rng.uniform(-distance, distance)])
    offsets *= rng.choice([-1.0, 1.0], size=2)
    rng.shuffle(offsets)
    top, left = (int(np.floor(_CENTRE + o - size / 2 + 0.5)) for o in offsets)
    placement = _place(
        glyphs, labels, int(rng.integers(len(glyphs))), size=size, top=top, left=left
    )
    if max(abs(c - _CENTRE) for c in placement.centre) < OFF_CENTRE_MIN:
        return off_centre_digit(glyphs, labels, rng)  # rounding pulled it in: redraw
    return placement


def _neighbours(
    glyphs, labels, rng: np.random.Generator, placed: list[Placement], count: int
) -> list[Placement]:
    """Up to ``count`` digits around the window, MIN_SPACING from every placed centre."""
    out: list[Placement] = []
    for _ in range(count * 8):
        if len(out) == count:
            break
        size = int(rng.choice(DIGIT_SIZES))
        centre = _CENTRE + rng.uniform(-_FAR, _FAR, size=2)
        if max(abs(centre - _CENTRE)) < OFF_CENTRE_MIN:
            continue
        if any(max(abs(centre - np.array(p.centre))) < MIN_SPACING for p in placed + out):
            continue
        top, left = (int(np.floor(c - size / 2 + 0.5)) for c in centre)
        out.append(
            _place(glyphs, labels, int(rng.integers(len(glyphs))), size=size, top=top, left=left)
        )
    return out


def draw_window(glyphs, labels, rng: np.random.Generator) -> tuple[list[Placement], int]:
    """The digits of one random training window (window coordinates) and its target."""
    neighbour_count = int(rng.choice(4, p=(0.4, 0.3, 0.2, 0.1)))
    if rng.random() >= BACKGROUND_FRACTION:
        main = centred_digit(glyphs, labels, rng)
        return [main] + _neighbours(glyphs, labels, rng, [main], neighbour_count), main.label
    kind = rng.random()
    if kind < 0.2:  # blank paper
        return [], BACKGROUND
    if kind < 0.35:  # only digits cut by the border
        return _neighbours(glyphs, labels, rng, [], neighbour_count + 1), BACKGROUND
    main = off_centre_digit(glyphs, labels, rng)  # a stride or more off-centre
    return [main] + _neighbours(glyphs, labels, rng, [main], neighbour_count), BACKGROUND


def sample_window(glyphs, labels, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """One random (uint8 [28, 28] image, target class) pair from the given glyphs."""
    placements, target = draw_window(glyphs, labels, rng)
    image = compose((WINDOW, WINDOW), placements, paper=draw_paper(rng), rng=rng)
    return image, target


def sample_windows(
    glyphs: np.ndarray, labels: np.ndarray, *, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` windows: uint8 images [count, 28, 28] and int64 targets [count]."""
    images = np.empty((count, WINDOW, WINDOW), dtype=np.uint8)
    targets = np.empty(count, dtype=np.int64)
    for k in range(count):
        images[k], targets[k] = sample_window(glyphs, labels, rng)
    return images, targets


def centred_windows(
    glyphs: np.ndarray, labels: np.ndarray, *, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One window per glyph, centred within half a stride, random size/paper/neighbours."""
    images = np.empty((len(glyphs), WINDOW, WINDOW), dtype=np.uint8)
    for k in range(len(glyphs)):
        size = int(rng.choice(DIGIT_SIZES))
        tops = _offset_range(size, -CENTRED_MAX, CENTRED_MAX)
        main = _place(
            glyphs, labels, k, size=size, top=int(rng.choice(tops)), left=int(rng.choice(tops))
        )
        count = int(rng.choice(4, p=(0.4, 0.3, 0.2, 0.1)))
        placements = [main] + _neighbours(glyphs, labels, rng, [main], count)
        images[k] = compose((WINDOW, WINDOW), placements, paper=draw_paper(rng), rng=rng)
    return images, labels.astype(np.int64)
