"""Exact tiling of passes whose activations do not fit in what the memory budget leaves.

Per axis, cells are split into consecutive runs of c cells. The tile for cells [j0, j1)
starts on the net's stride grid, at or before the first cell's window and true receptive
field, and ends after the last cell's window and receptive field, both clipped to the image.
So every kept cell sees, at every layer, exactly the units (and the zero padding, which then
lies only at the real image border) that it sees in the single pass: the stitched map equals
the single pass bit for bit, padded nets included. Tiles overlap by about
``receptive_field - stride`` (``window - stride`` for unpadded nets).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from densemap.service.engine.assembly import Placement, PostprocessCall
from densemap.service.engine.dense import DenseNet, Grid, PixelSource, check_cancel
from densemap.service.engine.options import MEMORY_BUDGET_SETTING, TILING_SETTING
from densemap.service.errors import ImageTooLarge


@dataclass(frozen=True)
class AxisTile:
    """Pixels [start, end) of the pass image, giving the global cells [first, stop)."""

    start: int
    end: int
    first: int
    stop: int


def plan_axis(length: int, grid: Grid, axis: int, cells_per_tile: int) -> list[AxisTile]:
    """Tiles along one axis (0 = rows, 1 = columns) holding ``cells_per_tile`` cells each."""
    stride, window = grid.stride[axis], grid.window[axis]
    field, offset = grid.receptive_field[axis], grid.receptive_field_offset[axis]
    cells = (length - window) // stride + 1
    tiles = []
    for first in range(0, cells, cells_per_tile):
        stop = min(cells, first + cells_per_tile)
        start = max(0, first * stride + (min(0, offset) // stride) * stride)
        end = min(length, (stop - 1) * stride + max(window, offset + field))
        tiles.append(AxisTile(start, end, first, stop))
    return tiles


def plan_tiles(
    grid: Grid, height: int, width: int, *, fits: Callable[[int, int], bool]
) -> tuple[list[AxisTile], list[AxisTile]]:
    """The largest square-ish tiling whose biggest tile ``fits(tile_h, tile_w)``."""
    n_h, n_w = grid.cells(height, width)

    def tiling(c: int) -> tuple[list[AxisTile], list[AxisTile]]:
        return plan_axis(height, grid, 0, min(c, n_h)), plan_axis(width, grid, 1, min(c, n_w))

    def biggest_fits(c: int) -> bool:
        rows, cols = tiling(c)
        return fits(max(t.end - t.start for t in rows), max(t.end - t.start for t in cols))

    if not biggest_fits(1):
        raise ImageTooLarge(
            f"even a tile of one cell (window {grid.window}, receptive field "
            f"{grid.receptive_field}) needs more activation memory than the budget: raise "
            f"{MEMORY_BUDGET_SETTING}"
        )
    low, high = 1, max(n_h, n_w)  # biggest_fits(low) holds
    while low < high:
        middle = (low + high + 1) // 2
        if biggest_fits(middle):
            low = middle
        else:
            high = middle - 1
    return tiling(low)


def run_region(
    net: DenseNet,
    source: PixelSource,
    *,
    top: int,
    left: int,
    height: int,
    width: int,
    budget: int,
    tiling: bool,
    cancel: Callable[[], bool] | None,
    post: PostprocessCall,
    place: Placement,
    precision: str = "fp32",
    pass_bytes: Callable[[int, int], int] | None = None,
) -> None:
    """The net's map of the source region, in one pass or in exact tiles within ``budget``.

    Each pass's outputs go to ``place(parts, rows, cols)``, rows and columns being the
    region's own cell indices. ``pass_bytes(h, w)``: what a pass of h x w pixels needs
    (default: the net's activation estimate).
    """
    pass_bytes = pass_bytes or net.estimate_bytes
    n_h, n_w = net.grid.cells(height, width)
    need = pass_bytes(height, width)
    if need <= budget:
        check_cancel(cancel, "before a pass")
        region = (top, left, height, width)
        parts = net.run_pass(source, region, (0, 0, n_h, n_w), post, precision=precision)
        place(parts, range(n_h), range(n_w))
        return
    if not tiling:
        raise ImageTooLarge(
            f"a {height}x{width} pass needs about {need} bytes of activations, over the "
            f"memory budget of {budget} bytes, and tiling is off: send a smaller image, "
            f"raise {MEMORY_BUDGET_SETTING} or {TILING_SETTING}"
        )
    rows, cols = plan_tiles(net.grid, height, width, fits=lambda h, w: pass_bytes(h, w) <= budget)
    for row in rows:
        for col in cols:
            check_cancel(cancel, f"before tile at ({row.start}, {col.start})")
            region = (top + row.start, left + col.start, row.end - row.start, col.end - col.start)
            skip_h = row.first - row.start // net.grid.stride[0]
            skip_w = col.first - col.start // net.grid.stride[1]
            cells = (skip_h, skip_w, skip_h + row.stop - row.first, skip_w + col.stop - col.first)
            parts = net.run_pass(source, region, cells, post, precision=precision)
            place(parts, range(row.first, row.stop), range(col.first, col.stop))
