"""One scale of a request: resize the pixels, run the dense passes (tiles within the
memory budget, k x k shifts for a finer stride), and assemble the scale's map.

:class:`Engine.score <densemap.service.engine.engine.Engine>` plans a request once (outputs,
stride, precision, budget: a :class:`ScalePlan`) and calls :func:`score_scale` per scale.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from densemap.service.contract import ModelMetadata, Pair
from densemap.service.engine import image_input
from densemap.service.engine.assembly import MapAssembly, Placement, PostprocessCall
from densemap.service.engine.dense import PixelSource, shift_and_stitch
from densemap.service.engine.postprocess import check_finite
from densemap.service.engine.request_checks import cells_at
from densemap.service.engine.result import MapGeometry, ScaleMap
from densemap.service.engine.runtime import Runtime
from densemap.service.engine.tiling import run_region


@dataclass(frozen=True)
class ScalePlan:
    """What every scale of one request shares."""

    runtime: Runtime
    metadata: ModelMetadata
    net: object  # the DenseNet that runs (the main model or an à-trous variant)
    factor: Pair  # k x k shifts on top of the net's stride
    post: PostprocessCall
    precision: str
    room: int  # activation bytes a pass may use (the budget less the maps)
    pass_bytes: Callable[[int, int], int]
    tiling: bool
    num_classes: int
    model_name: str
    cancel: Callable[[], bool] | None


def score_scale(
    plan: ScalePlan,
    *,
    uint8_hwc: np.ndarray | None,
    float_chw: np.ndarray | None,
    scale: float,
    size: Pair,
    original: Pair,
    timings: dict[str, float],
) -> tuple[ScaleMap, np.ndarray, MapAssembly]:
    """The map of the image resized to ``size``, its mean cell probabilities (float64), and
    the assembly (its cells above a detection threshold); adds to ``timings``."""
    tic = time.perf_counter()
    preprocessing = plan.metadata.preprocessing
    if uint8_hwc is not None:
        resized = image_input.resize_uint8(uint8_hwc, size)
        source = PixelSource(runtime=plan.runtime, preprocessing=preprocessing, uint8_hwc=resized)
    else:
        resized = image_input.resize_float(float_chw, size)
        source = PixelSource(runtime=plan.runtime, preprocessing=preprocessing, float_chw=resized)
    timings["preprocess"] += time.perf_counter() - tic
    tic = time.perf_counter()
    assembly = MapAssembly(
        plan.post.plan, cells=cells_at(plan.net, plan.factor, size), num_classes=plan.num_classes
    )
    _run_passes(plan, source, assembly.place)
    del source
    timings["infer"] += time.perf_counter() - tic
    tic = time.perf_counter()
    check_finite(
        assembly.nonfinite, model=plan.model_name, from_floats=float_chw is not None, scale=scale
    )
    geometry = _map_geometry(plan, scale, size, original)
    scale_map, scale_scores = assembly.scale_map(geometry)
    timings["postprocess"] += time.perf_counter() - tic
    return scale_map, scale_scores, assembly


def _run_passes(plan: ScalePlan, source: PixelSource, place: Placement) -> None:
    """Every pass of one scale: one region (tiled when it does not fit), or k x k shifted
    regions interleaved into the finer map."""
    size = (source.height, source.width)

    def run_pass(top: int, left: int, place_pass: Placement) -> None:
        run_region(
            plan.net,
            source,
            top=top,
            left=left,
            height=size[0] - top,
            width=size[1] - left,
            budget=plan.room,
            pass_bytes=plan.pass_bytes,
            tiling=plan.tiling,
            cancel=plan.cancel,
            post=plan.post,
            place=place_pass,
            precision=plan.precision,
        )

    if plan.factor == (1, 1):
        run_pass(0, 0, place)
        return
    shift_and_stitch(
        run_pass, grid=plan.net.grid, factor=plan.factor, size=size, place=place, cancel=plan.cancel
    )


def _map_geometry(plan: ScalePlan, scale: float, size: Pair, original: Pair) -> MapGeometry:
    geometry = plan.metadata.geometry
    net_stride = plan.net.grid.stride
    return MapGeometry(
        stride=(net_stride[0] // plan.factor[0], net_stride[1] // plan.factor[1]),
        window=geometry.window,
        origin=geometry.origin,
        receptive_field=geometry.receptive_field,
        receptive_field_offset=geometry.receptive_field_offset,
        scale=scale,
        resize=(size[0] / original[0], size[1] / original[1]),
    )
