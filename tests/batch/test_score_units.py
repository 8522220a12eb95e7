"""Small pieces of ``densemap score``: argument parsing, walking, heat-map geometry, npz bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest

from densemap.service.batch.heatmap import (
    CLASS_PALETTE,
    LEGEND_LINE,
    RAMP,
    pixel_cells,
    render_heatmap,
)
from densemap.service.batch.outputs import write_npz
from densemap.service.batch.progress import Progress
from densemap.service.batch.walk import find_images, has_image_signature
from densemap.service.engine.options import ScoreOptions
from densemap.service.errors import InvalidOption
from densemap.service.score_cli import parse_bytes, parse_scales, split_ray_address


def test_ray_address_or_path_after_ray(tmp_path):
    assert split_ray_address(None, ["a"]) == (None, ["a"])
    assert split_ray_address("", ["a"]) == ("", ["a"])
    assert split_ray_address("auto", ["a"]) == ("auto", ["a"])
    assert split_ray_address("ray://head:10001", ["a"]) == ("ray://head:10001", ["a"])
    assert split_ray_address("10.0.0.5:6379", ["a"]) == ("10.0.0.5:6379", ["a"])
    folder = tmp_path / "images"
    assert split_ray_address(str(folder), ["b"]) == ("", [str(folder), "b"])
    folder.mkdir()
    (tmp_path / "auto").mkdir()  # an existing folder named like an address is a path
    assert split_ray_address(str(tmp_path / "auto"), []) == ("", [str(tmp_path / "auto")])


def test_sizes_and_scales_parse_or_explain():
    assert parse_bytes("1073741824") == 1 << 30
    assert parse_bytes("512M") == 512 << 20 and parse_bytes("2GiB") == 2 << 30
    assert parse_bytes("1.5k") == 1536
    for bad in ("lots", "-1", "0"):
        with pytest.raises(InvalidOption, match="memory-budget"):
            parse_bytes(bad)
    assert parse_scales("1,1.5") == (1.0, 1.5)
    with pytest.raises(InvalidOption, match="--scales '1,x' must be numbers"):
        parse_scales("1,x")
    for bad in ("0", "-1", "inf", ""):  # parsed; ScoreOptions refuses the values
        with pytest.raises(InvalidOption, match="scales"):
            ScoreOptions(scales=parse_scales(bad))


def test_pixel_cells_paint_a_stride_around_each_centre_and_no_border_streaks():
    # W = 30, R = 12, S = 4: window centres 6, 10, 14, 18, 22; each cell owns [c-2, c+2).
    cells = pixel_cells(30, cells=5, stride=4, window=12, origin=0, resize=1.0)
    centres = 4 * np.arange(5) + 6
    for x in range(4, 24):  # a painted pixel takes the window whose centre is nearest
        assert abs(centres[cells[x]] - (x + 0.5)) == np.abs(centres - (x + 0.5)).min() <= 2
    # the border band (0-3) and the tail (24-29) are not the edge cells stretched out
    assert list(cells[:4]) == [-1] * 4 and list(cells[24:]) == [-1] * 6
    # an image scored at scale 2: pixel x of the original is x*2 in the map's image
    half = pixel_cells(15, cells=5, stride=4, window=12, origin=0, resize=2.0)
    assert list(half) == [-1, -1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, -1, -1, -1]


def test_ramp_goes_from_dark_to_bright():
    assert RAMP.shape == (256, 3) and RAMP.dtype == np.uint8
    brightness = RAMP.astype(int).sum(axis=1)
    assert brightness[0] < brightness[128] < brightness[255]


def test_npz_bytes_depend_only_on_the_arrays():
    arrays = {"scores_0": np.arange(12, dtype=np.float32).reshape(3, 2, 2), "meta": np.array("x")}
    first, second = io.BytesIO(), io.BytesIO()
    write_npz(first, arrays)
    write_npz(second, {k: v.copy() for k, v in arrays.items()})
    assert first.getvalue() == second.getvalue()
    with np.load(io.BytesIO(first.getvalue()), allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["scores_0"], arrays["scores_0"])


def test_walk_sniffs_signatures_and_skips_non_images(tmp_path):
    (tmp_path / "scan.dat").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)  # JPEG magic
    (tmp_path / "readme.md").write_text("# not an image")
    (tmp_path / "broken.jpg").write_bytes(b"nope")  # image extension: tried, then reported
    jobs = find_images([str(tmp_path)])
    assert [j.relpath for j in jobs] == ["broken.jpg", "scan.dat"]
    assert has_image_signature(str(tmp_path / "scan.dat"))
    assert not has_image_signature(str(tmp_path / "readme.md"))
    with pytest.raises(InvalidOption, match="at least one"):
        find_images([])


def test_plain_progress_lines_name_failures():
    stream = io.StringIO()
    progress = Progress(3, skipped=1, tty=False, interval=0.0, stream=stream)
    progress.update({"status": "ok", "size": [1000, 2000], "path": "a.png"})
    progress.update({"status": "failed", "path": "bad.png", "error": "cannot decode"})
    progress.close()
    text = stream.getvalue()
    assert "failed: bad.png: cannot decode" in text
    assert "2/3 images (67%)" in text and "images/s" in text and "MP/s" in text
    assert "ETA" in text and "1 failed" in text
    final = progress.final_line("out")
    assert "scored 1, skipped 1, failed 1 of 4 images" in final


def test_background_cells_stay_unpainted_in_top_class_mode():
    from densemap.service.engine.result import MapGeometry, ScaleMap

    geometry = MapGeometry(stride=(4, 4), window=(8, 8), origin=(0, 0),
                           receptive_field=(8, 8), receptive_field_offset=(0, 0))  # fmt: skip
    scores = np.zeros((2, 4, 4), dtype=np.float32)
    scores[0] = 0.9  # "background" wins everywhere ...
    scores[1] = 0.1
    scores[:, 0, 0] = (0.2, 0.8)  # ... except cell (0, 0): "digit"
    image = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    picture = np.asarray(
        render_heatmap(
            image, ScaleMap(geometry=geometry, scores=scores), labels=("background", "digit")
        )
    )
    # Cell (0, 0) paints rows/cols 2-5 (its centre 4, +-2); the rest is untouched.
    assert (picture[2:6, 2:6] != image[2:6, 2:6]).any(axis=2).all()
    np.testing.assert_array_equal(picture[6:], image[6:])
    np.testing.assert_array_equal(picture[:, 6:], image[:, 6:])
    np.testing.assert_array_equal(picture[:2], image[:2])


def test_legend_goes_below_the_image_and_hides_nothing():
    from densemap.service.engine.result import MapGeometry, ScaleMap

    geometry = MapGeometry(stride=(4, 4), window=(8, 8), origin=(0, 0),
                           receptive_field=(8, 8), receptive_field_offset=(0, 0))  # fmt: skip
    scores = np.zeros((2, 24, 29), dtype=np.float32)  # a 100x120 image: 24x29 cells
    scores[0] = 0.9  # background everywhere ...
    scores[1] = 0.1
    scores[:, 10, 10] = (0.2, 0.8)  # ... except cell (10, 10): "digit"
    image = np.random.default_rng(1).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    picture = np.asarray(
        render_heatmap(
            image, ScaleMap(geometry=geometry, scores=scores), labels=("background", "digit")
        )
    )
    # one legend row below the image; the image itself is untouched outside cell (10, 10)
    # (rows/cols 42-45: the pixels whose nearest window centre is cell 10's, 44)
    assert picture.shape == (100 + LEGEND_LINE + 4, 120, 3)
    painted = np.zeros((100, 120), dtype=bool)
    painted[42:46, 42:46] = True
    assert (picture[:100][painted] != image[painted]).any(axis=1).all()
    np.testing.assert_array_equal(picture[:100][~painted], image[~painted])
    band = picture[100:].reshape(-1, 3)
    assert (band == CLASS_PALETTE[1]).all(axis=1).any()  # the digit's swatch
    assert not (band == CLASS_PALETTE[0]).all(axis=1).any()  # no background entry
