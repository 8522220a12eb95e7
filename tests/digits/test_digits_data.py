"""The digits recipe's data: split, rendering convention, window labels, page reading."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from models.digits.data import (  # noqa: E402
    BACKGROUND,
    CENTRED_MAX,
    MIN_SPACING,
    OFF_CENTRE_MIN,
    STRIDE,
    WINDOW,
    Paper,
    Placement,
    compose,
    load_split,
)
from models.digits.pages import make_pages  # noqa: E402
from models.digits.reading import Grid, find_digits, score_page, touched_cells  # noqa: E402
from models.digits.windows import draw_window, sample_windows  # noqa: E402


@pytest.fixture(scope="module")
def split():
    return load_split()


def _offset(p: Placement) -> float:
    """Chebyshev distance of a glyph centre from the window centre."""
    return max(abs(c - WINDOW / 2) for c in p.centre)


def test_split_is_disjoint_stratified_and_fixed(split):
    from sklearn.datasets import load_digits

    assert len(split.train_glyphs) + len(split.test_glyphs) == len(load_digits().images)
    assert len(split.test_glyphs) == 450
    assert np.bincount(split.test_labels).min() >= 43  # every class held out, ~45 each
    again = load_split()
    assert np.array_equal(again.test_glyphs, split.test_glyphs)
    assert np.array_equal(again.train_labels, split.train_labels)
    # the two parts are exactly the data set, each sample in one part only
    parts = np.concatenate([split.train_glyphs, split.test_glyphs]).reshape(-1, 64)
    original = (load_digits().images / 16.0).astype(np.float32).reshape(-1, 64)
    assert sorted(row.tobytes() for row in parts) == sorted(row.tobytes() for row in original)


def test_compose_draws_dark_ink_on_light_paper():
    glyph = np.ones((8, 8), dtype=np.float32)  # full ink everywhere
    placement = Placement(glyph=glyph, label=8, size=16, top=6, left=6)
    paper = Paper(level=200.0, contrast=0.75, noise=0.0)
    image = compose((WINDOW, WINDOW), [placement], paper=paper, rng=np.random.default_rng(0))
    assert image.dtype == np.uint8
    assert image[0, 0] == 200 and image[-1, -1] == 200  # paper
    assert image[14, 14] == 50  # 200 * (1 - 0.75)
    assert (image[6:22, 6:22] == 50).all() and image[5, 14] == 200 and image[22, 14] == 200


def test_compose_clips_digits_cut_by_the_border():
    glyph = np.ones((8, 8), dtype=np.float32)
    placement = Placement(glyph=glyph, label=1, size=20, top=-10, left=20)
    image = compose((WINDOW, WINDOW), [placement], paper=Paper(), rng=np.random.default_rng(0))
    assert (image[:10, 20:] == 0).all() and (image[10:, :] == 255).all()


def test_window_targets_follow_the_centring_rule(split):
    rng = np.random.default_rng(7)
    seen = set()
    for _ in range(3000):
        placements, target = draw_window(split.train_glyphs, split.train_labels, rng)
        offsets = [_offset(p) for p in placements]
        centred = [p for p, o in zip(placements, offsets, strict=True) if o <= CENTRED_MAX]
        # nothing in the ambiguous ring between half a stride and a stride
        assert not any(CENTRED_MAX < o < OFF_CENTRE_MIN for o in offsets)
        if target == BACKGROUND:
            assert not centred
        else:
            assert len(centred) == 1 and centred[0].label == target
        for a in range(len(placements)):
            for b in range(a):
                pa, pb = placements[a].centre, placements[b].centre
                assert max(abs(pa[0] - pb[0]), abs(pa[1] - pb[1])) >= MIN_SPACING
        seen.add(target)
    assert seen == set(range(11))


def test_sample_windows_mixes_digits_and_background(split):
    images, targets = sample_windows(
        split.train_glyphs, split.train_labels, count=500, rng=np.random.default_rng(3)
    )
    assert images.shape == (500, WINDOW, WINDOW) and images.dtype == np.uint8
    share = (targets == BACKGROUND).mean()
    assert 0.25 < share < 0.45


def test_grid_nearest_cell_and_touched_cells_match_brute_force(split):
    grid = Grid(stride=(STRIDE, STRIDE), window=(WINDOW, WINDOW))
    page = make_pages(
        split.test_glyphs, split.test_labels, shapes=((120, 160),), counts=(8,), seed=5
    )[0]
    n_h, n_w = (120 - WINDOW) // STRIDE + 1, (160 - WINDOW) // STRIDE + 1
    touched = touched_cells((n_h, n_w), grid, page.placements)
    for i in range(n_h):
        for j in range(n_w):
            top, left = i * STRIDE, j * STRIDE
            expected = any(
                top < p.top + p.size
                and p.top < top + WINDOW
                and left < p.left + p.size
                and p.left < left + WINDOW
                for p in page.placements
            )
            assert touched[i, j] == expected
    for p in page.placements:
        i, j = grid.nearest_cell(p.centre)
        centre = grid.cell_centre(i, j)
        assert max(abs(centre[0] - p.centre[0]), abs(centre[1] - p.centre[1])) <= STRIDE / 2
        assert 0 <= i < n_h and 0 <= j < n_w  # pages keep digits where a cell is centred


def test_score_page_and_find_digits_on_a_constructed_map(split):
    grid = Grid(stride=(STRIDE, STRIDE), window=(WINDOW, WINDOW))
    page = make_pages(
        split.test_glyphs, split.test_labels, shapes=((160, 160),), counts=(6,), seed=11
    )[0]
    n = (160 - WINDOW) // STRIDE + 1
    probabilities = np.zeros((11, n, n), dtype=np.float32)
    probabilities[BACKGROUND] = 1.0
    for p in page.placements:  # a perfect map: the nearest cell and its right neighbour
        i, j = grid.nearest_cell(p.centre)
        for jj, value in ((j, 0.9), (j + 1, 0.6)):
            if jj < n:
                probabilities[:, i, jj] = 0.0
                probabilities[p.label, i, jj] = value
                probabilities[BACKGROUND, i, jj] = 1.0 - value
    score = score_page(probabilities.argmax(0), grid, page.placements, background=BACKGROUND)
    assert score.digits == len(page.placements) == score.read
    assert score.blank_false == 0 and score.blank_cells > 0
    # off-centre cells, by brute force: touch a digit, centre >= a stride from every digit
    touched = touched_cells((n, n), grid, page.placements)
    off_cells = off_false = 0
    for i in range(n):
        for j in range(n):
            ci, cj = grid.cell_centre(i, j)
            near = min(max(abs(ci - p.centre[0]), abs(cj - p.centre[1])) for p in page.placements)
            if touched[i, j] and near >= STRIDE:
                off_cells += 1
                off_false += int(probabilities[:, i, j].argmax() != BACKGROUND)
    assert (score.off_cells, score.off_false) == (off_cells, off_false)
    assert off_false > 0  # some right neighbours sit a stride or more from the centre
    found = find_digits(probabilities, grid, background=BACKGROUND)
    assert sorted(d.label for d in found) == sorted(p.label for p in page.placements)
    assert all(d.score == pytest.approx(0.9) and d.cells in (1, 2) for d in found)
    # a fringe cell naming another class next to a digit is dropped (less mass, too close)
    first = page.placements[0]
    i, j = grid.nearest_cell(first.centre)
    fringe = probabilities.copy()
    other = (first.label + 1) % 10
    below = i + 1 if i + 1 < n else i - 1
    fringe[:, below, j] = 0.0
    fringe[other, below, j] = 0.95
    labels = sorted(d.label for d in find_digits(fringe, grid, background=BACKGROUND))
    assert labels == sorted(p.label for p in page.placements)
    kept = find_digits(fringe, grid, background=BACKGROUND, min_distance=0.0)
    assert len(kept) == len(page.placements) + 1
    # one wrong cell on blank paper counts as a false positive
    blank = ~touched_cells((n, n), grid, page.placements)
    i, j = np.argwhere(blank)[0]
    label_map = probabilities.argmax(0)
    label_map[i, j] = 3
    assert score_page(label_map, grid, page.placements, background=BACKGROUND).blank_false == 1
