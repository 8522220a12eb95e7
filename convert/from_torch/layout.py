"""Torch path: where the batch, channel, H and W axes are in every trunk tensor.

A trunk may move axes around: ConvNeXt's ``LayerNorm2d`` permutes to channels-last,
normalizes over C and permutes back, and its blocks apply ``nn.Linear`` to channels-last
tensors. Both act per position, so they convert as they are. But a ``transpose(2, 3)``
that swaps H and W before a conv would give a map whose axes are swapped on any image
that is not square, with no error: that is refused by name, as is a conv reading a
channels-last tensor and a trunk that ends with H and W anywhere but axes 2 and 3.

:func:`check_layouts` follows a layout (a tuple like ``("N", "C", "H", "W")``) through
permutes and transposes; every other op keeps its input's layout.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from densemap.convert.from_torch.flatten import PERMUTE_OPS, permutation
from densemap.convert.from_torch.ops import module_of, op_name, tensor_inputs
from densemap.convert.from_torch.trace import describe, shape_of
from densemap.service.errors import ConversionError

NCHW = ("N", "C", "H", "W")
# Ops that read channels at axis 1 and H, W at axes 2, 3.
NCHW_MODULES = (
    nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d, nn.AvgPool2d, nn.LPPool2d, nn.BatchNorm2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LocalResponseNorm,
)  # fmt: skip
NCHW_FUNCTIONS = frozenset(
    "conv2d max_pool2d avg_pool2d lp_pool2d batch_norm adaptive_avg_pool2d "
    "adaptive_max_pool2d local_response_norm pixel_shuffle".split()
)


def _channel_last_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A LayerNorm over one axis or a Linear: they act on the last axis only."""
    module = module_of(gm, node)
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.LayerNorm):
        return len(module.normalized_shape) == 1
    if op_name(node) == "layer_norm":
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        return isinstance(shape, (list, tuple)) and len(shape) == 1
    return False


def _swap_message(gm, node, layout, reason: str) -> ConversionError:
    swapped = tuple(a for a in layout if a in "HW") == ("W", "H")
    where = "swaps H and W" if swapped else f"holds its axes as {''.join(layout)}"
    return ConversionError(
        f"{describe(gm, node)} {reason}, but the trunk {where} there (a permute or transpose "
        "earlier): the dense map would come back with its axes moved, so it is refused. Keep "
        "the trunk N, C, H, W around every conv and pool, and at its end."
    )


def check_layouts(gm: fx.GraphModule, trunk: set[fx.Node], dependent, trunk_end) -> set[fx.Node]:
    """Follow the axis layout through the trunk; return the channels-last per-position ops
    (LayerNorm over C, Linear over C) that are local, raising on any op that reads H or W
    at the wrong axes."""
    layouts: dict[fx.Node, tuple[str, ...]] = {}
    local: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node not in trunk or node not in dependent or shape_of(node) is None:
            continue
        if node.op == "placeholder":
            layouts[node] = NCHW
            continue
        inputs = [a for a in tensor_inputs(node) if a in layouts]
        if not inputs:
            continue
        found = {layouts[a] for a in inputs}
        if len(found) > 1:
            raise _swap_message(gm, node, sorted(found)[0], "combines tensors of two layouts")
        layout = found.pop()
        if op_name(node) in PERMUTE_OPS and len(layout) == len(shape_of(node)):
            layout = tuple(layout[a] for a in permutation(node, len(layout)))
        elif len(shape_of(node)) != len(layout):
            layout = ()  # a rank change: the trunk check reports it
        module = module_of(gm, node)
        if (isinstance(module, NCHW_MODULES) or op_name(node) in NCHW_FUNCTIONS) and layout:
            if layout != NCHW:
                raise _swap_message(gm, node, layout, "reads channels at axis 1, H and W at 2, 3")
        if _channel_last_op(gm, node) and layout and layout[-1] == "C":
            local.add(node)
        layouts[node] = layout
    end = layouts.get(trunk_end)
    if end and end != NCHW:
        raise _swap_message(gm, trunk_end, end, "ends the trunk")
    return local


def layout_at(gm: fx.GraphModule, node: fx.Node, depth: int = 64) -> tuple[str, ...]:
    """The axis layout of a 4-D tensor, followed back through permutes to the last op that
    reads N, C, H, W (a conv, pool, norm) or the input; ops in between keep their input's."""
    if depth == 0 or node.op == "placeholder":
        return NCHW
    module = module_of(gm, node)
    if isinstance(module, NCHW_MODULES) or op_name(node) in NCHW_FUNCTIONS:
        return NCHW
    inputs = tensor_inputs(node)
    if not inputs:
        return NCHW
    layout = layout_at(gm, inputs[0], depth - 1)
    if op_name(node) in PERMUTE_OPS and len(layout) == len(shape_of(node) or ()):
        layout = tuple(layout[a] for a in permutation(node, len(layout)))
    return layout


def restore_nchw(gm: fx.GraphModule, moves: list[fx.Node], before: fx.Node):
    """Cut the moves before a head where a permute brings a channels-last tensor back to
    N, C, H, W (ConvNeXt's ``LayerNorm2d`` before its flatten): that permute belongs to
    the trunk, which must end N, C, H, W. Returns ``(moves, before)``."""
    layout = layout_at(gm, before)
    if layout == NCHW or len(layout) != 4:
        return moves, before
    for position in range(len(moves) - 1, -1, -1):  # from the trunk side
        node = moves[position]
        if op_name(node) not in PERMUTE_OPS or len(shape_of(node) or ()) != 4:
            return moves, before
        layout = tuple(layout[a] for a in permutation(node, 4))
        if layout == NCHW:
            return moves[:position], node
    return moves, before
