"""KServe v2 output names: what a ModelInferRequest may ask for, and what that computes.

Per scale i (suffix "" for the first scale, "_<i>" for the others): ``scores`` (the primary
head's map), ``top_k_indices``, ``top_k_scores``, ``argmax`` and one output per extra head,
named by the head (``head_<name>`` when the name is one of the built-in outputs'); plus
``image_scores`` and the detection outputs (:mod:`densemap.service.server.kserve_detections`).
Requested names narrow the options to what they need; an unknown name is
INVALID_ARGUMENT listing the names there are.
"""

from __future__ import annotations

import dataclasses
import re

from densemap.service.engine.cost import RequestCost, response_bytes
from densemap.service.engine.heads import HeadInfo, head_key
from densemap.service.engine.options import DetectionOptions, ScoreOptions
from densemap.service.errors import InvalidOption
from densemap.service.server import kserve_detections

MAP_OUTPUTS = ("scores", "top_k_indices", "top_k_scores", "argmax")
IMAGE_SCORES = "image_scores"
BUILT_IN = frozenset((*MAP_OUTPUTS, IMAGE_SCORES, *kserve_detections.OUTPUTS))
GEOMETRY_PAIRS = ("stride", "window", "origin", "receptive_field", "receptive_field_offset")
_SCALE_SUFFIX = re.compile(r"^(.*)_([0-9]+)$")


def output_name(base: str, scale_index: int) -> str:
    return base if scale_index == 0 else f"{base}_{scale_index}"


def head_output(head: HeadInfo) -> str:
    """The base output name of an extra head: its own, unless a built-in output has it
    (or would with a scale suffix, e.g. a head "scores_1")."""
    match = _SCALE_SUFFIX.match(head.name)
    taken = head.name in BUILT_IN or (match is not None and match.group(1) in BUILT_IN)
    return f"head_{head.name}" if taken else head.name


def catalog(heads: tuple[HeadInfo, ...], scale_count: int) -> dict[str, tuple[str, int]]:
    """Every output a request may name -> (what it is, scale index): a map output's base
    name, ``head_key(name)`` for an extra head, or a whole-image output (scale -1)."""
    names: dict[str, tuple[str, int]] = {IMAGE_SCORES: (IMAGE_SCORES, -1)}
    names.update((name, (name, -1)) for name in kserve_detections.OUTPUTS)
    for index in range(scale_count):
        for base in MAP_OUTPUTS:
            names[output_name(base, index)] = (base, index)
        for head in heads[1:]:
            names.setdefault(output_name(head_output(head), index), (head_key(head.name), index))
    return names


def requested_options(
    request, options: ScoreOptions, heads: tuple[HeadInfo, ...]
) -> tuple[ScoreOptions, set[str] | None]:
    """(the options narrowed to the requested outputs, their names; None: all)."""
    names = [output.name for output in request.outputs]
    known = catalog(heads, len(options.scales))
    unknown = [name for name in names if name not in known]
    if unknown:
        raise InvalidOption(
            f"unknown output(s) {unknown[:5]}: this request can give {sorted(known)}"
        )
    shared = [o.name for o in request.outputs if "shared_memory_region" in o.parameters]
    if shared:
        raise InvalidOption(
            f"output(s) {shared[:5]} ask for a shared memory region, which densemap does not "
            "serve: request them without one; outputs come in raw_output_contents"
        )
    classified = [o.name for o in request.outputs if "classification" in o.parameters]
    if classified:
        raise InvalidOption(
            f"output(s) {classified[:5]} ask for Triton classification (class_count), which "
            "dense maps do not support: leave class_count at 0 and use the request parameters "
            "top_k (per cell, outputs top_k_indices/top_k_scores) or image_top_k"
        )
    if not names:
        return options, None
    wanted = {known[name][0] for name in names}
    detections = options.detections
    if wanted & set(kserve_detections.OUTPUTS):
        detections = detections or DetectionOptions()
    else:
        detections = None
    if wanted & {"top_k_indices", "top_k_scores"} and options.top_k == 0:
        raise InvalidOption("top-k outputs need the request parameter top_k > 0")
    narrowed = dataclasses.replace(
        options,
        include_map="scores" in wanted,
        argmax="argmax" in wanted,
        top_k=options.top_k if wanted & {"top_k_indices", "top_k_scores"} else 0,
        detections=detections,
        heads=tuple(head.name for head in heads[1:] if head_key(head.name) in wanted),
    )
    return narrowed, set(names)


def estimated_bytes(
    cost: RequestCost, wanted: set[str] | None, heads: tuple[HeadInfo, ...], num_classes: int
) -> int:
    """A lower bound of the ModelInferResponse's size: only the outputs asked for."""
    if wanted is None:
        return response_bytes(cost.scales, num_classes=num_classes)
    known = catalog(heads, len(cost.scales))
    per_scale: dict[int, set[str]] = {}
    for name in wanted:
        key, index = known[name]
        if index >= 0:
            per_scale.setdefault(index, set()).add(key)
    return response_bytes(
        cost.scales,
        num_classes=num_classes,
        wanted=per_scale,
        image_scores=IMAGE_SCORES in wanted,
    )


def set_geometry(output, geometry) -> None:
    """Geometry of the map an output belongs to, as output parameters."""
    output.parameters["scale"].double_param = geometry.scale
    output.parameters["resize"].string_param = ",".join(repr(v) for v in geometry.resize)
    for pair in GEOMETRY_PAIRS:
        output.parameters[pair].string_param = ",".join(str(v) for v in getattr(geometry, pair))
