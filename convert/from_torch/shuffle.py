"""Torch path: ShuffleNet's channel shuffle, a per-position op written as views.

torchvision's ``channel_shuffle`` reads ``N, C, H, W = x.size()`` and runs
``x.view(N, g, C // g, H, W).transpose(1, 2).contiguous().view(N, C, H, W)``. The views
use the input's own H and W, so they follow any image size, but through a rank-5 tensor
and sizes read from the input, which the trunk checks refuse. What the chain computes is a
permutation of the channels, the same at every position.

:func:`fold_channel_shuffles` finds such chains (views/reshapes, transposes/permutes and
no-op ``contiguous`` from an ``N x C x H x W`` tensor back to its own shape, H and W passed
as the input's own sizes and kept as the two last axes throughout), reads the permutation
by pushing an index array through them at the traced shape, and replaces each chain with
``torch.index_select(x, 1, perm)``: local, and exported as a ``Gather`` on the channel axis.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx

from densemap.convert.from_torch.flatten import permutation
from densemap.convert.from_torch.ops import op_name
from densemap.convert.from_torch.trace import SHAPE_KEY, shape_of

VIEW_OPS = frozenset({"view", "reshape"})
MOVE_OPS = VIEW_OPS | {"transpose", "permute", "contiguous"}
MAX_CHAIN = 6


def _spatial_dim(arg, source: fx.Node) -> int | None:
    """2 or 3 when ``arg`` is ``source``'s own height or width (``x.size()[k]``,
    ``x.size(k)``, ``x.shape[k]``), else None."""
    if not isinstance(arg, fx.Node):
        return None
    if op_name(arg) == "size" and arg.args[0] is source and len(arg.args) > 1:
        return arg.args[1] % 4 if isinstance(arg.args[1], int) else None
    if arg.op == "call_function" and arg.target is operator.getitem:
        holder, key = arg.args
        is_size = op_name(holder) == "size" and len(holder.args) == 1
        is_shape = op_name(holder) == "getattr" and holder.args[1] == "shape"
        if (is_size or is_shape) and holder.args[0] is source and isinstance(key, int):
            return key % 4
    return None


def _not_spatial(arg, source: fx.Node) -> bool:
    """An int, the source's batch or channel count, or arithmetic on those."""
    if isinstance(arg, int):
        return True
    if _spatial_dim(arg, source) in (0, 1):
        return True
    arithmetic = isinstance(arg, fx.Node) and arg.op == "call_function"
    arithmetic = arithmetic and arg.target in (operator.floordiv, operator.mul, operator.add)
    return arithmetic and all(_not_spatial(a, source) for a in arg.args)


def _view_sizes(node: fx.Node) -> list:
    sizes = list(node.args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = list(sizes[0])
    return sizes


def _keeps_space(node: fx.Node, source: fx.Node, rank: int) -> bool:
    """H and W stay the two last axes, as the source's own sizes in every view."""
    if op_name(node) in VIEW_OPS:
        sizes = _view_sizes(node)
        trailing = [_spatial_dim(arg, source) for arg in sizes[-2:]]
        return trailing == [2, 3] and all(_not_spatial(a, source) for a in sizes[:-2])
    if op_name(node) in ("transpose", "permute"):
        perm = permutation(node, rank)
        return perm[-2:] == [rank - 2, rank - 1]
    return True  # contiguous


def _chain(first: fx.Node):
    source = first.args[0] if first.args else None
    shape = shape_of(source) if isinstance(source, fx.Node) else None
    if shape is None or len(shape) != 4 or op_name(first) not in VIEW_OPS:
        return None
    array = np.arange(int(np.prod(shape))).reshape(shape)
    nodes, node = [], first
    while len(nodes) < MAX_CHAIN:
        out_shape = shape_of(node)
        if out_shape is None or not _keeps_space(node, source, len(array.shape)):
            return None
        if op_name(node) in VIEW_OPS:
            array = array.reshape(out_shape)
        elif op_name(node) != "contiguous":
            array = np.transpose(array, permutation(node, array.ndim))
        nodes.append(node)
        if len(nodes) > 1 and array.shape == tuple(shape):
            return source, nodes, array
        users = list(node.users)
        if len(users) != 1 or op_name(users[0]) not in MOVE_OPS or users[0].args[0] is not node:
            return None
        node = users[0]
    return None


def _channel_permutation(array: np.ndarray) -> np.ndarray | None:
    """The channel order when ``array`` (indices into its own shape) only permutes axis 1,
    the same way for every batch item and position; else None."""
    coords = np.unravel_index(array, array.shape)
    grid = np.indices(array.shape)
    if any(not np.array_equal(coords[a], grid[a]) for a in (0, 2, 3)):
        return None
    perm = np.moveaxis(coords[1], 1, 0).reshape(array.shape[1], -1)
    if not np.all(perm == perm[:, :1]):
        return None
    return perm[:, 0]


def fold_channel_shuffles(gm: fx.GraphModule) -> int:
    """Replace every channel-shuffle chain of ``gm`` by an ``index_select`` on dim 1;
    returns how many. Shapes must have been traced (``propagate_shapes``)."""
    folded = 0
    for first in list(gm.graph.nodes):
        if getattr(first, "_erased", False):  # taken out by an earlier fold
            continue
        found = _chain(first)
        perm = None if found is None else _channel_permutation(found[2])
        if perm is None:
            continue
        source, nodes, _ = found
        name = f"channel_shuffle_{folded}"
        device = next((p.device for p in gm.parameters()), torch.device("cpu"))
        gm.register_buffer(name, torch.as_tensor(perm, dtype=torch.long, device=device))
        with gm.graph.inserting_before(nodes[0]):
            indices = gm.graph.get_attr(name)
            select = gm.graph.call_function(torch.index_select, (source, 1, indices))
        select.meta[SHAPE_KEY] = shape_of(nodes[-1])
        select.meta["nn_module_stack"] = nodes[0].meta.get("nn_module_stack", {})
        nodes[-1].replace_all_uses_with(select)
        for node in reversed(nodes):
            gm.graph.erase_node(node)
        folded += 1
    if folded:
        _erase_dead_sizes(gm.graph)
    return folded


def _erase_dead_sizes(graph: fx.Graph) -> None:
    for node in reversed(list(graph.nodes)):
        if not node.users and shape_of(node) is None and node.op == "call_function":
            if node.target in (operator.getitem, operator.floordiv, operator.mul):
                graph.erase_node(node)
        elif not node.users and op_name(node) == "size":
            graph.erase_node(node)
