"""À trous == shift-and-stitch, and exact tiles == single pass (unpadded and padded nets)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from densemap.service.engine import Engine, EngineConfig, ScoreOptions
from densemap.service.engine.dense import DenseNet, Grid
from densemap.service.engine.tiling import plan_axis
from densemap.service.errors import ImageTooLarge
from tests.support.dense_models import build_dense_model

LOGITS = ScoreOptions(probabilities=False)


def make_image(height, width, seed=0):
    return (np.random.default_rng(seed).random((height, width)) * 255).astype(np.uint8)


@pytest.fixture(scope="module", params=[False, True], ids=["unpadded", "padded"])
def models(request, tmp_path_factory):
    """(model with à-trous variants at S/2 and S/4, the same model without variants)."""
    padded = request.param
    root = tmp_path_factory.mktemp("padded" if padded else "unpadded")
    with_variants = build_dense_model(root / "atrous", padded=padded, with_atrous=(2, 1))
    plain = build_dense_model(root / "plain", padded=padded)
    return padded, with_variants, plain


def engine_for(path, **config):
    return Engine(path, config=EngineConfig(warmup=False, **config))


class PassCounter:
    def __init__(self, monkeypatch):
        self.calls = []
        original = DenseNet.run_pass

        def counting(net, source, region, *args, **kwargs):
            self.calls.append(tuple(region[2:]))  # (height, width) of the pass or tile
            return original(net, source, region, *args, **kwargs)

        monkeypatch.setattr(DenseNet, "run_pass", counting)


def test_atrous_equals_shift_and_stitch(models, monkeypatch):
    padded, with_variants, plain = models
    atrous, stitched = engine_for(with_variants), engine_for(plain)
    image = make_image(43, 58)
    for stride in (2, 1):
        counter = PassCounter(monkeypatch)
        fast = atrous.score(image, ScoreOptions(stride, probabilities=False)).maps[0].scores
        assert len(counter.calls) == 1  # one pass on the variant
        counter = PassCounter(monkeypatch)
        slow = stitched.score(image, ScoreOptions(stride, probabilities=False)).maps[0].scores
        assert len(counter.calls) == (4 // stride) ** 2  # k x k shifted passes
        assert fast.shape == slow.shape == (5, (43 - 12) // stride + 1, (58 - 16) // stride + 1)
        if not padded:
            # Same products summed in the same order: fp32 results agree bit for bit
            # (checked); allow 1e-6 in case a future kernel reorders the sums.
            np.testing.assert_allclose(fast, slow, atol=1e-6, rtol=0)
        else:
            # Padded nets: shift-and-stitch crops move the zero border, so only cells whose
            # receptive field stays inside every shifted image agree; à trous equals the
            # plain dense pass on its cells of the native grid.
            k = 4 // stride
            native = stitched.score(image, LOGITS).maps[0].scores
            np.testing.assert_allclose(fast[:, ::k, ::k], native, atol=1e-6, rtol=0)
            # Cell g (of pass g % k) keeps its field inside the shifted image when g >= k
            # and g*d + offset + field <= size; those cells agree, the others differ.
            field, offset = atrous.metadata.geometry.receptive_field, -3
            rows = [
                g for g in range(fast.shape[1]) if g >= k and g * stride + offset + field[0] <= 43
            ]
            cols = [
                g for g in range(fast.shape[2]) if g >= k and g * stride + offset + field[1] <= 58
            ]
            inside = np.ix_(range(5), rows, cols)
            np.testing.assert_allclose(fast[inside], slow[inside], atol=1e-6, rtol=0)
            assert np.abs(fast - slow).max() > 1e-3  # the border cells do differ


def test_variant_stride_used_for_finer_stride(models, monkeypatch):
    """S/4 on a model with only an S/2 variant: 2x2 shift-and-stitch on the variant."""
    padded, with_variants, plain = models
    folder = with_variants.parent
    engine = engine_for(with_variants)
    image = make_image(40, 41, seed=3)
    reference = engine.score(image, ScoreOptions(1, probabilities=False)).maps[0].scores
    engine._nets = engine._nets[:2]  # forget the S/4 variant
    counter = PassCounter(monkeypatch)
    result = engine.score(image, ScoreOptions(1, probabilities=False)).maps[0].scores
    assert len(counter.calls) == 4 and folder.exists()
    assert result.shape == reference.shape
    if not padded:  # padded nets: shift-and-stitch moves the zero border (checked above)
        np.testing.assert_allclose(result, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("budget_cells", [1, 2, 5])
def test_tiles_equal_single_pass(models, monkeypatch, budget_cells):
    _, with_variants, plain = models
    image = make_image(71, 97, seed=budget_cells)
    single = engine_for(plain).score(image, LOGITS).maps[0].scores
    full = engine_for(plain)
    # a budget that holds the maps and copies, and a tile of about budget_cells cells per
    # axis, never the whole image
    tile = [12 + (budget_cells - 1) * 4 + 20, 16 + (budget_cells - 1) * 4 + 20]
    held = full.estimate_request(71, 97, LOGITS).held_bytes
    room = full.estimate_bytes(*tile)
    assert full.estimate_bytes(71, 97) > room
    tiled = engine_for(plain, memory_budget=held + room)
    assert tiled.estimate_request(71, 97, LOGITS).activation_budget == room
    counter = PassCounter(monkeypatch)
    result = tiled.score(image, LOGITS).maps[0].scores
    assert len(counter.calls) > 1
    assert all(full.estimate_bytes(*shape) <= room for shape in counter.calls)
    assert any((97 - 16) % (shape[1] - 16) for shape in counter.calls)  # uneven tiles
    np.testing.assert_array_equal(result, single)


def test_tiles_compose_with_strides_and_scales(models):
    _, with_variants, plain = models
    image = make_image(66, 79, seed=7)
    options = ScoreOptions(output_stride=2, scales=(1.0, 1.3), probabilities=False)
    for path in (plain, with_variants):  # shift-and-stitch, then à trous
        full = engine_for(path)
        single = full.score(image, options)
        held = full.estimate_request(66, 79, options).held_bytes
        budget = held + full.estimate_bytes(30, 34, output_stride=2)
        tiled = engine_for(path, memory_budget=budget).score(image, options)
        for a, b in zip(single.maps, tiled.maps, strict=True):
            np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(single.image_scores, tiled.image_scores)


def test_tiling_off_or_budget_below_one_window_refuses(models):
    _, _, plain = models
    image = make_image(71, 97)
    full = engine_for(plain)
    held = full.estimate_request(71, 97).held_bytes
    small = held + full.estimate_bytes(40, 40)
    with pytest.raises(ImageTooLarge, match="tiling is off"):
        engine_for(plain, memory_budget=small, tiling=False).score(image)
    with pytest.raises(ImageTooLarge, match="one cell"):
        engine_for(plain, memory_budget=held + 100).score(image)
    with pytest.raises(ImageTooLarge, match="maps and working copies need about"):
        engine_for(plain, memory_budget=held - 1).score(image)


def test_plan_axis_covers_each_cell_once_with_whole_fields():
    for stride, window, field, offset, length, per_tile in itertools.product(
        (1, 4, 8), (12, 16), (10, 30), (0, -7), (40, 101), (1, 3, 7)
    ):
        if field + offset > window + 30 or length < window:
            continue
        grid = Grid((stride, 1), (window, 1), (field, 1), (offset, 0))
        tiles = plan_axis(length, grid, 0, per_tile)
        cells = (length - window) // stride + 1
        assert [c for t in tiles for c in range(t.first, t.stop)] == list(range(cells))
        for t in tiles:
            assert t.start % stride == 0 and 0 <= t.start < t.end <= length
            for cell in range(t.first, t.stop):
                begin, end = cell * stride + offset, cell * stride + offset + field
                assert begin >= t.start or t.start == 0
                assert end <= t.end or t.end == length
                assert cell * stride >= t.start and cell * stride + window <= t.end
