"""Synthesis of the digits data: windows for training and whole pages for reading.

Source: scikit-learn's ``load_digits`` (1,797 real handwritten digits, 8x8, 17 grey levels
0..16 with the ink BRIGHT on a dark background). Page convention used everywhere here and
by the shipped model: **dark ink on light paper**, 8-bit grey (PIL mode ``L``). A glyph
becomes ink coverage ``v / 16`` in [0, 1]; a pixel is ``paper * (1 - contrast * ink)`` plus
Gaussian noise, rounded to uint8. So a served page must be a photo/scan-like image with
dark digits on a light background.

The split is made BEFORE any augmentation, by sample (stratified, fixed seed): digits of the
test split never reach training, and the pages used for page reading use only them.

Everything is numpy + Pillow (+ scikit-learn to load the data): no torch, so the
evaluation runs where only the serving dependencies and scikit-learn are installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

WINDOW = 28  # classifier input R (square)
STRIDE = 4  # total stride of the LeNet trunk (two 2x2 max-pools)
DIGIT_SIZES = (16, 17, 18, 19, 20)  # side in px of an upscaled 8x8 glyph
LABELS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "background")
BACKGROUND = LABELS.index("background")
NUM_CLASSES = len(LABELS)
SPLIT_SEED = 0
TEST_FRACTION = 0.25
# A digit counts as "centred" in a window when its centre is within this many pixels of the
# window centre on both axes (half the stride: the nearest cell of the native map always
# satisfies it). "Off-centre" background starts at one full stride.
CENTRED_MAX = STRIDE / 2
OFF_CENTRE_MIN = STRIDE
# Neighbouring digits on a page (and distractors in training windows) keep their centres at
# least this far apart (Chebyshev distance, px): boxes of <= 20 px then never overlap.
MIN_SPACING = 22


@dataclass(frozen=True)
class Split:
    """Glyphs (N, 8, 8) float32 ink in [0, 1] and their labels (N,) int64."""

    train_glyphs: np.ndarray
    train_labels: np.ndarray
    test_glyphs: np.ndarray
    test_labels: np.ndarray


@dataclass(frozen=True, eq=False)
class Placement:
    """One digit on a canvas: which glyph, its side and its top-left corner (may be < 0)."""

    glyph: np.ndarray
    label: int
    size: int
    top: int
    left: int

    @property
    def centre(self) -> tuple[float, float]:
        return (self.top + self.size / 2, self.left + self.size / 2)


@dataclass(frozen=True)
class Paper:
    """How a canvas looks: paper grey level, ink contrast and noise sigma (0..255 units)."""

    level: float = 255.0
    contrast: float = 1.0
    noise: float = 0.0


def load_split(*, seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION) -> Split:
    """The fixed, stratified train/test split of ``load_digits`` (before any augmentation)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    glyphs = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    train_g, test_g, train_y, test_y = train_test_split(
        glyphs, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return Split(train_g, train_y, test_g, test_y)


@lru_cache(maxsize=8192)
def _render_cached(glyph_bytes: bytes, size: int) -> np.ndarray:
    glyph = np.frombuffer(glyph_bytes, dtype=np.float32).reshape(8, 8)
    image = Image.fromarray(glyph, mode="F").resize((size, size), Image.Resampling.BILINEAR)
    ink = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    ink.setflags(write=False)
    return ink


def render_glyph(glyph: np.ndarray, *, size: int) -> np.ndarray:
    """Upscale an 8x8 ink glyph to ``size`` x ``size`` ink coverage in [0, 1] (bilinear)."""
    return _render_cached(np.ascontiguousarray(glyph, dtype=np.float32).tobytes(), size)


def compose(
    shape: tuple[int, int], placements: list[Placement], *, paper: Paper, rng: np.random.Generator
) -> np.ndarray:
    """Draw the placements on blank paper; returns a uint8 (H, W) image, dark ink on light."""
    height, width = shape
    ink = np.zeros(shape, dtype=np.float32)
    for p in placements:
        glyph_ink = render_glyph(p.glyph, size=p.size)
        top, left = max(p.top, 0), max(p.left, 0)
        bottom, right = min(p.top + p.size, height), min(p.left + p.size, width)
        if bottom <= top or right <= left:
            continue
        part = glyph_ink[top - p.top : bottom - p.top, left - p.left : right - p.left]
        np.maximum(ink[top:bottom, left:right], part, out=ink[top:bottom, left:right])
    pixels = paper.level * (1.0 - paper.contrast * ink)
    if paper.noise > 0:
        pixels = pixels + rng.normal(0.0, paper.noise, size=shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def draw_paper(rng: np.random.Generator) -> Paper:
    """A random paper: light grey to white, ink from medium to full contrast, mild noise."""
    return Paper(
        level=float(rng.uniform(190.0, 255.0)),
        contrast=float(rng.uniform(0.6, 1.0)),
        noise=float(rng.uniform(0.0, 12.0)),
    )


def place_centred(
    glyph: np.ndarray, label: int, *, centre: tuple[float, float], size: int
) -> Placement:
    """The placement whose centre is the integer-grid point nearest ``centre``."""
    top = int(np.floor(centre[0] - size / 2 + 0.5))
    left = int(np.floor(centre[1] - size / 2 + 0.5))
    return Placement(glyph=glyph, label=label, size=size, top=top, left=left)
