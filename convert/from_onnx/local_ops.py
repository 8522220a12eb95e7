"""Per-position ops of an ONNX trunk that are neither windows nor elementwise.

A dense map is exact when every op of the trunk is local. Besides convolutions, pools and
elementwise ops, some ops act on the channels of one position only, and so convert as
they are:

- ``LayerNormalization`` whose normalized axes (``axis`` to the last) hold no spatial axis:
  ConvNeXt's ``LayerNorm2d`` (Transpose to channels-last, normalize over C, Transpose back);
- ``MatMul`` of a spatial tensor whose last axis is not spatial by a constant matrix: a
  ``Linear`` on a channels-last tensor (ConvNeXt's blocks), a 1x1 convolution in effect;
- ``Gather`` with constant indices on the channel axis: a channel permutation or selection,
  what :mod:`densemap.convert.from_onnx.channel_moves` turns ShuffleNet's shuffle into;
- ``Slice`` with constant bounds on the channel axis (``x.chunk(2, dim=1)``).

:func:`local_field` returns the field of such a node's output (the same as its input's:
the node reads one position), ``None`` for any other node, and raises when a
normalization runs over a spatial axis (per image, not per window).
"""

from __future__ import annotations

import numpy as np
import onnx

from densemap.convert.from_onnx.graph import GraphIndex, attributes, node_label
from densemap.service.errors import ConversionError


def local_field(node: onnx.NodeProto, source, index: GraphIndex):
    """The output field of a per-position op reading the spatial tensor ``node.input[0]``
    (field ``source``), or ``None`` when ``node`` is not one of them."""
    op, attrs, rank = node.op_type, attributes(node), source.rank
    if op == "LayerNormalization":
        axis = attrs.get("axis", -1) % rank
        if set(range(axis, rank)) & set(source.axes):
            raise ConversionError(
                f"{node_label(node)} normalizes over a spatial axis (axis={attrs.get('axis', -1)}"
                " of a tensor whose H, W are at axes "
                f"{list(source.axes)}): it is computed per image, not per window, so the "
                "classifier has no exact dense form (only a LayerNorm over the channels, like "
                "ConvNeXt's, converts)"
            )
        return source
    if op == "MatMul":
        weight = index.constant(node.input[1])
        if weight is not None and weight.ndim == 2 and (rank - 1) not in source.axes:
            return source  # a Linear over the channels of a channels-last tensor
        return None
    if op == "Slice":
        return source if _slices_channels(node, source, index) else None
    if op == "Gather":
        axis = attrs.get("axis", 0) % rank
        indices = index.constant(node.input[1])
        if indices is not None and indices.ndim == 1 and axis != 0 and axis not in source.axes:
            return source  # picks channels: the same at every position
        return None
    return None


FULL_RANGE = 2**31 - 1  # exporters write INT_MAX or INT64_MAX for "to the end"


def _slice_bounds(node: onnx.NodeProto, index: GraphIndex):
    """(starts, ends, axes or None, steps or None) of a Slice, ``None`` when not constant."""
    if len(node.input) == 1:  # before opset 10: bounds are attributes
        attrs = attributes(node)
        return attrs.get("starts"), attrs.get("ends"), attrs.get("axes"), None
    bounds = []
    for position in range(1, 5):
        name = node.input[position] if position < len(node.input) else ""
        value = index.constant(name) if name else None
        if name and value is None:
            return None
        bounds.append(None if value is None else [int(v) for v in np.ravel(value)])
    return None if bounds[0] is None or bounds[1] is None else tuple(bounds)


def _slices_channels(node: onnx.NodeProto, source, index: GraphIndex) -> bool:
    """Whether a Slice with constant bounds cuts only the channel axis (any other axis it
    names is kept whole): the same channels at every position."""
    bounds = _slice_bounds(node, index)
    if bounds is None:
        return False
    starts, ends, axes, steps = bounds
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for axis, start, end, step in zip(axes, starts, ends, steps, strict=True):
        whole = start == 0 and end >= FULL_RANGE and step == 1
        if (axis % source.rank == 0 or axis % source.rank in source.axes) and not whole:
            return False
    return True
