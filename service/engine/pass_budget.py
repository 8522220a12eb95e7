"""How much memory one pass may use, what it needs, and the refusals that follow.

The memory budget (``Engine.memory_budget``) covers a request's maps and working copies
(``held`` bytes, :mod:`densemap.service.engine.cost`) and one pass's activations and copies. On CPU
both share the host memory, so a pass gets what the held bytes leave; on CUDA activations
live in device memory and a pass gets the whole budget. A pass over its room is tiled
(:mod:`densemap.service.engine.tiling`), or refused when tiling is off or one cell does not fit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from densemap.service.engine import image_input
from densemap.service.engine.cost import (
    RequestCost,
    describe,
    held_bytes,
    pass_copies,
    response_bytes,
    scale_cost,
)
from densemap.service.engine.options import MEMORY_BUDGET_SETTING, TILING_SETTING
from densemap.service.engine.request_checks import cells_at, check_scaled_size
from densemap.service.engine.tiling import plan_tiles
from densemap.service.errors import ImageTooLarge


def activation_room(held: int, *, budget: int, on_cuda: bool) -> int:
    """Activation bytes one pass may use, or ImageTooLarge when ``held`` is over budget."""
    if held > budget:
        raise ImageTooLarge(
            f"this request's maps and working copies need about {describe(held)}, over "
            f"the memory budget of {describe(budget)}: ask for less (a coarser "
            "output_stride, fewer or smaller scales, fewer classes, dtype float16, only "
            "argmax or top-k outputs) or send a smaller image"
        )
    return budget if on_cuda else budget - held


def pass_bytes_of(net, plan, num_classes: int) -> Callable[[int, int], int]:
    """What a pass of ``net`` on h x w pixels needs: activations and pass copies."""

    def pass_bytes(height: int, width: int) -> int:
        n_h, n_w = net.grid.cells(height, width)
        copies = pass_copies(plan, max(n_h, 0) * max(n_w, 0), num_classes)
        return net.estimate_bytes(height, width) + copies

    return pass_bytes


def check_pass(
    net,
    scale_cost,
    need: int,
    *,
    room: int,
    held: int,
    budget: int,
    tiling: bool,
    pass_bytes: Callable[[int, int], int],
) -> None:
    """Refuse a scale whose pass exceeds ``room`` untiled (tiling off) or tiled."""
    if need <= room:
        return
    size, scale = scale_cost.size, scale_cost.scale
    at = "" if scale == 1.0 else f" at scale {scale}"
    left = "the memory budget" if room == budget else (
        f"what the memory budget of {describe(budget)} leaves after "
        f"{describe(held)} of maps and copies"
    )  # fmt: skip
    if not tiling:
        raise ImageTooLarge(
            f"the image{at} needs about {need} bytes for a pass, over {left} "
            f"({room} bytes), and tiling is off: send a smaller image, raise "
            f"{MEMORY_BUDGET_SETTING} or {TILING_SETTING}"
        )
    try:
        plan_tiles(net.grid, *size, fits=lambda h, w: pass_bytes(h, w) <= room)
    except ImageTooLarge:
        raise ImageTooLarge(
            f"even a tile of one cell (window {net.grid.window}, receptive field "
            f"{net.grid.receptive_field}) of the image{at} needs more activation memory "
            f"than {left} ({room} bytes): raise the budget, or ask for smaller maps"
        ) from None


def estimate_passes(
    net,
    factor,
    plan,
    *,
    scales: tuple[float, ...],
    original: tuple[int, int],
    pixel_bytes: int,
    num_classes: int,
    window: tuple[int, int],
    max_pixels: int,
    budget: int,
    on_cuda: bool,
    tiling: bool,
) -> RequestCost:
    """The cost of scoring an ``original``-sized image at ``scales`` with ``net``; raises
    what scoring would raise before its first pass (pixel limits, budget, one-cell tiles)."""
    costs = []
    for scale in scales:
        size = image_input.resized_size(*original, scale, max_pixels=max_pixels)
        check_scaled_size(size, scale, window=window, max_pixels=max_pixels)
        costs.append(
            scale_cost(
                plan,
                scale=scale,
                size=size,
                original=original,
                cells=cells_at(net, factor, size),
                num_classes=num_classes,
                pixel_bytes=pixel_bytes,
            )
        )
    image_bytes = original[0] * original[1] * pixel_bytes
    held = held_bytes(image_bytes, tuple(costs))
    room = activation_room(held, budget=budget, on_cuda=on_cuda)
    pass_bytes = pass_bytes_of(net, plan, num_classes)
    passes = [pass_bytes(*c.size) for c in costs]
    for scale_map, need in zip(costs, passes, strict=True):
        check_pass(
            net,
            scale_map,
            need,
            room=room,
            held=held,
            budget=budget,
            tiling=tiling,
            pass_bytes=pass_bytes,
        )
    shifts = factor[0] * factor[1]
    scale_costs = tuple(
        dataclasses.replace(c, pass_bytes=need, macs=shifts * net.estimate_macs(*c.size))
        for c, need in zip(costs, passes, strict=True)
    )
    return RequestCost(
        image_size=original,
        image_bytes=image_bytes,
        scales=scale_costs,
        response_bytes=response_bytes(
            scale_costs, num_classes=num_classes, image_top_k=plan.image_top_k
        ),
        activation_bytes=max(min(need, room) for need in passes),
        activation_budget=room,
        budget=budget,
    )
