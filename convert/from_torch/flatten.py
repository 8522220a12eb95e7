"""Torch path: the data movement between the trunk and the first Linear, and the order it
gives the features.

Between the trunk's ``N x C x h x w`` output (or its global pool) and the head, classifiers
only move data: ``flatten``, ``view``, ``reshape``, ``squeeze``, and in ports of Caffe or
Keras models a ``permute``/``transpose`` first (``x.permute(0, 3, 2, 1)`` flattens W, H, C).
Pushing an index array through exactly those nodes (with the shapes traced at the window
size) tells, for every input feature of the first Linear, which ``(c, y, x)`` element of
the trunk output it reads: the Linear becomes a conv whose kernel holds each weight at
that tap, whatever the order. Eval-mode no-ops on the volume (dropout, identity,
``contiguous``; Inception-v3 drops out between its pool and its flatten) are walked over.
"""

from __future__ import annotations

import math

import numpy as np
import torch.fx as fx
from torch import nn

from densemap.convert.from_torch.ops import module_of, op_name, single_input
from densemap.convert.from_torch.trace import describe, shape_of
from densemap.service.errors import ConversionError

RESHAPE_OPS = frozenset({"flatten", "view", "reshape", "squeeze"})
PERMUTE_OPS = frozenset({"permute", "transpose"})
VOLUME_NOOPS = frozenset({"dropout", "contiguous", "clone", "feature_dropout"})
NOOP_MODULES = (nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.Identity)


def is_volume_noop(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An op that returns its input unchanged in eval mode (dropout, identity, ...)."""
    module = module_of(gm, node)
    if module is not None:
        return isinstance(module, NOOP_MODULES)
    return op_name(node) in VOLUME_NOOPS and single_input(node) is not None


def is_movement(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A flatten/view/reshape/squeeze/permute/transpose of one tensor, batch axis kept."""
    module = module_of(gm, node)
    name = op_name(node)
    if not (isinstance(module, nn.Flatten) or name in RESHAPE_OPS | PERMUTE_OPS):
        return False
    source = single_input(node)
    if source is None or shape_of(node) is None or shape_of(source) is None:
        return False
    out_shape, in_shape = shape_of(node), shape_of(source)
    return out_shape[:1] == in_shape[:1] and math.prod(out_shape) == math.prod(in_shape)


def walk_moves(gm: fx.GraphModule, source: fx.Node) -> tuple[list[fx.Node], fx.Node]:
    """The movement and no-op nodes ending at ``source`` (nearest the head first), and the
    node they read."""
    moves, node = [], source
    while is_movement(gm, node) or (moves and is_volume_noop(gm, node)):
        moves.append(node)
        node = single_input(node)
    return moves, node


def permutation(node: fx.Node, rank: int) -> list[int]:
    args = [a for a in node.args[1:]] + list(node.kwargs.values())
    if op_name(node) == "transpose":
        a, b = (int(v) % rank for v in args[:2])
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
    return [int(d) % rank for d in dims]


def feature_order(gm: fx.GraphModule, moves: list[fx.Node], volume_shape) -> np.ndarray:
    """For each input feature of the head, its flat index into ``volume_shape`` (C, h, w) of
    batch item 0. Raises when the movement mixes batch items or is not a reordering."""
    batch = shape_of(moves[-1].all_input_nodes[0])[0] if moves else 1
    array = np.arange(batch * math.prod(volume_shape)).reshape(batch, *volume_shape)
    for node in reversed(moves):
        if op_name(node) in PERMUTE_OPS:
            perm = permutation(node, array.ndim)
            if perm[0] != 0:
                raise ConversionError(
                    f"{describe(gm, node)} moves the batch axis: not a per-image classifier."
                )
            array = np.transpose(array, perm)
        elif not is_volume_noop(gm, node):
            array = array.reshape(shape_of(node))  # C order, like torch's view/reshape
    if array.ndim != 2:
        raise ConversionError(
            f"the head reads a rank-{array.ndim} tensor {array.shape}; expected (batch, features)"
        )
    flat = array[0]
    size = math.prod(volume_shape)
    if len(flat) != size or not np.array_equal(np.sort(flat), np.arange(size)):
        raise ConversionError(
            "the flatten before the head does not read each element of one image's trunk "
            "output exactly once: not a per-image classifier."
        )
    return flat
