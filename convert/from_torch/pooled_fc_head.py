"""Torch path: a global pool followed by per-position ops before the flatten (ConvNeXt).

torchvision's ConvNeXt ends ``avgpool -> LayerNorm2d -> Flatten -> Linear``; its
``LayerNorm2d`` permutes to channels-last, normalizes over C and permutes back. After the
global pool that norm acts on one position's channels, so on the map it runs at every
position of the sliding pool's output. :func:`slide_inner_pool` turns such a global pool
(``AdaptiveAvgPool2d(1)``, ``x.mean((2, 3), keepdim=True)``, the max versions) into
``AvgPool2d((h, w), stride=1)`` (``MaxPool2d``) before the head is looked for: the trunk
then ends after the per-position ops with a 1x1 map at R, and the Linear becomes a 1x1
conv. A pool whose result meets the trunk again (squeeze-and-excitation) is left alone,
so the trunk check still refuses it.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from densemap.convert.from_torch.fc_head_region import input_dependent
from densemap.convert.from_torch.flatten import is_movement, is_volume_noop
from densemap.convert.from_torch.ops import fc_head_pool_kind, single_input
from densemap.convert.from_torch.trace import SHAPE_KEY, shape_of


def _descendants(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        for user in current.users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def _per_position_before_flatten(gm: fx.GraphModule, pool: fx.Node) -> bool:
    """Whether an op other than a move or no-op follows the pool while it is still 4-D."""
    node = pool
    while len(node.users) == 1:
        node = next(iter(node.users))
        if len(shape_of(node) or ()) != 4:
            return False
        if not (is_movement(gm, node) or is_volume_noop(gm, node)):
            return True
    return False


def slide_inner_pool(gm: fx.GraphModule) -> bool:
    """Replace the global pool described above by a sliding pool; returns whether it did.
    Shapes must have been traced (``propagate_shapes``)."""
    dependent = input_dependent(gm)
    for node in gm.graph.nodes:
        kind = fc_head_pool_kind(gm, node)
        source = single_input(node)
        if kind not in ("avg", "max") or source is None or len(shape_of(node) or ()) != 4:
            continue
        region = _descendants(node) | {node}
        joins = any(
            arg in dependent and arg not in region
            for user in region - {node}
            for arg in user.all_input_nodes
        )
        if joins or not _per_position_before_flatten(gm, node):
            continue
        height, width = shape_of(source)[2:]
        pool_type = nn.AvgPool2d if kind == "avg" else nn.MaxPool2d
        name = "fc_head_pool_sliding"
        while hasattr(gm, name):
            name += "_"
        gm.add_submodule(name, pool_type((height, width), stride=1, padding=0))
        with gm.graph.inserting_after(node):
            sliding = gm.graph.call_module(name, (source,))
        sliding.meta[SHAPE_KEY] = shape_of(node)
        node.replace_all_uses_with(sliding)
        gm.graph.erase_node(node)
        return True
    return False
