"""Torch path: the per-feature part of a classifier head, between the flattened trunk output
and the scores.

:func:`fc_head_region` collects, from the output backwards, every op on ``(N, F)`` tensors that
acts per feature (Linear, BatchNorm1d, activations, dropout, softmax, elementwise ops with
weights or constants); the head may branch and join (``x * torch.sigmoid(x)``). It must
read one tensor: the flatten or global pool of the trunk. :func:`classify_fc_head_ops` tells
which Linears read the flattened volume (they become ``(h, w)`` convs, later ones 1x1) and
which per-feature vectors (``x * scale + bias``, scale of shape ``(F,)``) must be laid out as
``(1, F, 1, 1)``: on the map the features are channels, and an ``(F,)`` vector would
broadcast over the width instead.
"""

from __future__ import annotations

import math

import numpy as np
import torch.fx as fx
from torch import nn

from densemap.convert.from_torch.ops import (
    is_elementwise,
    module_of,
    op_name,
    softmax_kind,
    spatial_size_source,
    tensor_inputs,
)
from densemap.convert.from_torch.trace import describe, shape_of
from densemap.service.errors import ConversionError

PER_CHANNEL_FUNCTIONS = frozenset({"prelu", "batch_norm"})  # weights act on dim 1 as they are


def input_dependent(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on the image (the rest are weights and constants)."""
    dependent: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    return dependent


def _is_fc_head_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    if len(shape_of(node) or ()) != 2:
        return False
    module = module_of(gm, node)
    if isinstance(module, (nn.Linear, nn.BatchNorm1d)):
        return True
    if softmax_kind(gm, node) is not None or is_elementwise(gm, node):
        return spatial_size_source(node) is None
    return op_name(node) in PER_CHANNEL_FUNCTIONS


def fc_head_region(
    gm, output: fx.Node, dependent, *, what: str = "the classifier head"
) -> tuple[list[fx.Node], fx.Node]:
    """The per-feature ops that compute the output from one (N, F) source, and that source.
    ``what`` names the head in errors."""
    region: set[fx.Node] = set()
    frontier: set[fx.Node] = set()
    stack = [output]
    while stack:
        node = stack.pop()
        if node in region or node in frontier:
            continue
        if node.op != "placeholder" and _is_fc_head_op(gm, node):
            region.add(node)
            stack.extend(a for a in tensor_inputs(node) if a in dependent)
        else:
            frontier.add(node)
    if len(frontier) != 1:
        names = ", ".join(sorted(describe(gm, n) for n in frontier))
        raise ConversionError(
            f"{what} reads several tensors ({names}): expected one flattened or "
            "globally pooled trunk output (attention, class tokens and other global ops have "
            "no exact dense form)."
        )
    return [n for n in gm.graph.nodes if n in region], frontier.pop()


def classify_fc_head_ops(gm, chain, feeds: dict, dependent):
    """Mark the Linears that read a feed (the flattened or pooled volume: ``feeds`` maps
    each source node to its :class:`~densemap.convert.from_torch.fc_head.Feed`), and collect the
    per-feature vectors (``x * scale + bias``) that must be laid out along the channels."""
    first_linears: dict[fx.Node, object] = {}
    constants: list[tuple[fx.Node, fx.Node]] = []
    # per node: the feed it still reads before any Linear, or None after a Linear
    before_linear: dict[fx.Node, object] = dict(feeds)
    for node in chain:
        inputs = [a for a in tensor_inputs(node) if a in dependent]
        flags = {id(before_linear[a]) for a in inputs}
        if len(flags) != 1:
            mixed = None in (before_linear[a] for a in inputs)
            raise ConversionError(
                f"{describe(gm, node)} combines features "
                + ("from before and after a Linear layer" if mixed else "of two trunk reads")
                + ": no convolutional form."
            )
        feed = before_linear[inputs[0]]
        post = feed is None
        module = module_of(gm, node)
        if isinstance(module, nn.Linear):
            if not post:
                first_linears[node] = feed
            before_linear[node] = None
            continue
        before_linear[node] = feed
        per_feature = isinstance(module, nn.BatchNorm1d) or (
            isinstance(module, nn.PReLU) and module.num_parameters > 1
        )
        vectors = [a for a in tensor_inputs(node) if a not in dependent and _numel(a) > 1]
        if op_name(node) in PER_CHANNEL_FUNCTIONS:
            per_feature, vectors = per_feature or bool(vectors), []
        pooled = not post and feed.feature_volume[1:] == (1, 1)
        ordered = not post and np.array_equal(
            feed.feature_order, np.arange(len(feed.feature_order))
        )
        if not post and (per_feature or vectors) and not (pooled and ordered):
            raise ConversionError(
                f"{describe(gm, node)} has per-feature parameters on the flattened C x h x w "
                "trunk output, before the first Linear: it has no convolutional form."
            )
        features = shape_of(node)[1]
        for vector in vectors:
            if shape_of(vector) not in ((features,), (1, features)):
                raise ConversionError(
                    f"{describe(gm, node)} combines the {features} features with a tensor of "
                    f"shape {shape_of(vector)}: only per-feature vectors ({features},) or "
                    f"(1, {features}) and scalars have a per-channel form."
                )
            constants.append((node, vector))
    return first_linears, constants


def _numel(node: fx.Node) -> int:
    return math.prod(shape_of(node))
