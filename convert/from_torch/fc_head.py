"""Find a traced classifier's head, check its trunk is local, and rewrite the head as convs.

The head is found from the output backwards: a chain of per-feature ops on ``(N, F)``
tensors (Linear, activations, dropout, BatchNorm1d, softmax), fed by a flatten of the trunk's
``C x h x w`` output, optionally through a global pool over H, W. Everything upstream of
that is the trunk, which must be local everywhere (see :mod:`densemap.convert.from_torch.ops`).
A forward with several outputs (a tuple or dict) has one such chain per output; they may
share ops (a shared Linear, then one per head) and must all read the same trunk output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch.fx as fx
from torch import nn

from densemap.convert.from_torch.fc_head_region import (
    classify_fc_head_ops,
    fc_head_region,
    input_dependent,
)
from densemap.convert.from_torch.flatten import feature_order, walk_moves
from densemap.convert.from_torch.layout import check_layouts, restore_nchw
from densemap.convert.from_torch.ops import (
    adaptive_pool_change,
    fc_head_pool_kind,
    global_problem,
    module_of,
    op_name,
    single_input,
    softmax_kind,
    spatial_size_source,
    tensor_inputs,
)
from densemap.convert.from_torch.outputs import ForwardOutputs, forward_outputs
from densemap.convert.from_torch.trace import describe, shape_of
from densemap.service.errors import ConversionError

PASSTHROUGH_OPS = frozenset({"dropout", "contiguous", "clone"})


@dataclass
class Feed:
    """One read of the trunk output by the head: a flatten (after moves) or a global pool.
    Heads of a multi-head classifier share one feed or each have their own."""

    source: fx.Node  # the (N, F) tensor the head ops read
    moves: list[fx.Node]  # flatten/view/permute/no-op nodes before the head, nearest it first
    pool: fx.Node | None  # the pool between trunk and flatten, if any
    pool_kind: str  # "none", "identity", "avg" or "max"
    trunk_end: fx.Node  # the last node of the trunk (its output is N x C x h x w)
    trunk_output: tuple[int, int, int]
    feature_volume: tuple[int, int, int]  # what the first Linear sees, as C x h x w
    feature_order: np.ndarray  # per first-Linear input feature: its flat index in the volume


@dataclass
class FcHead:
    """Every head of the classifier: the per-feature ops of all outputs (shared ones once)."""

    chain: list[fx.Node]  # per-feature (N, F) head ops in graph order (a DAG: x * sigmoid(x))
    feeds: list[Feed]
    final_activations: tuple[str | None, ...]  # per output, in the forward's order
    first_linears: dict[fx.Node, Feed] = field(default_factory=dict)  # read a feed
    constants: list[tuple[fx.Node, fx.Node]] = field(default_factory=list)  # (op, F-vector)
    identity_pools: list[fx.Node] = field(default_factory=list)

    @property
    def trunk_end(self) -> fx.Node:
        return self.feeds[0].trunk_end

    @property
    def trunk_output(self) -> tuple[int, int, int]:
        return self.feeds[0].trunk_output

    @property
    def pool_kind(self) -> str:
        return self.feeds[0].pool_kind


def find_fc_head(gm: fx.GraphModule, *, size: tuple[int, int], outputs: ForwardOutputs) -> FcHead:
    """The heads computing every output of ``gm`` from one trunk output."""
    size_text = f"{size[0]}x{size[1]}"
    dependent = input_dependent(gm)
    regions, feeds = [], {}
    for position, node in enumerate(outputs.nodes):
        where = f"{outputs.label(position)} of the forward" if outputs.several else ""
        shape = shape_of(node)
        if (shape is None or len(shape) != 2) and where:
            raise ConversionError(
                f"{where} has shape {shape} at input size {size_text}, expected (batch, "
                "features): every output of a classifier with several heads must be an "
                "(N, F) tensor computed per window from the trunk by its own head (a feature "
                "map or a per-image value has no dense form beside them)."
            )
        if shape is None or len(shape) != 2:
            raise ConversionError(
                f"the model's output has shape {shape} at input size {size_text}, expected "
                "(batch, classes): it has no Linear classifier head to convert (a model that "
                "already outputs a score map is fully convolutional as it is)."
            )
        what = f"the head of {where}" if where else "the classifier head"
        chain, source = fc_head_region(gm, node, dependent, what=what)
        if source not in feeds:
            feeds[source] = _feed(gm, source, size_text)
        feed = feeds[source]
        if not any(isinstance(module_of(gm, n), nn.Linear) for n in chain) and (
            feed.feature_volume[1:] != (1, 1)
        ):
            raise ConversionError(
                f"{'the model' if not where else where} has no Linear classifier head: it "
                f"flattens {describe(gm, feed.trunk_end)}. densemap converts classifiers whose "
                "head is nn.Linear layers on the flattened (or globally pooled) trunk output, "
                "or a conv head followed by a global pool (SqueezeNet)."
            )
        regions.append(chain)
    _same_trunk(gm, outputs, list(feeds.values()))
    in_chain = {n for chain in regions for n in chain}
    chain = [n for n in gm.graph.nodes if n in in_chain]
    linears = [n for n in chain if isinstance(module_of(gm, n), nn.Linear)]
    if len({n.target for n in linears}) != len(linears):
        raise ConversionError("a Linear layer is used twice in the head: not supported.")
    head = FcHead(
        chain=chain,
        feeds=list(feeds.values()),
        final_activations=tuple(final_activation(gm, node) for node in outputs.nodes),
    )
    head.first_linears, head.constants = classify_fc_head_ops(gm, chain, feeds, dependent)
    return head


def _feed(gm: fx.GraphModule, source: fx.Node, size_text: str) -> Feed:
    """How the head reads the trunk at ``source``: moves, pool, volume and flatten order."""
    if fc_head_pool_kind(gm, source) in ("avg", "max") and len(shape_of(source)) == 2:
        moves, pool = [], source  # x.mean((2, 3)) straight into the head
    else:
        moves, before = restore_nchw(gm, *walk_moves(gm, source))
        if not moves:
            raise ConversionError(
                f"the classifier head is fed by {describe(gm, source)}, which is not a "
                "supported form: expected a flatten/view/reshape (or permute) of the trunk's "
                "C x h x w output, or a global average/max pool over H and W. Attention "
                "heads, class tokens and other global ops have no exact dense form."
            )
        pool = before if fc_head_pool_kind(gm, before) is not None else None
    trunk_end = single_input(pool) if pool is not None else before
    trunk_shape = shape_of(trunk_end) or ()
    problem = global_problem(gm, trunk_end) if len(trunk_shape) != 4 else None
    if problem is not None:
        raise ConversionError(
            f"{describe(gm, trunk_end)} feeds the head and is {problem}: it is computed per "
            "image, not per window (attention), so the classifier has no exact dense form."
        )
    if len(trunk_shape) != 4 or min(trunk_shape) < 1:
        raise ConversionError(
            f"at input size {size_text} the trunk output ({describe(gm, trunk_end)}) has shape "
            f"{trunk_shape}, not a non-empty N x C x h x w volume: the input size is too small "
            "or the trunk is not convolutional; pass the classifier's training input size."
        )
    pool_kind = _pool_kind(gm, pool, size_text)
    channels, height, width = trunk_shape[1:]
    volume = (channels, 1, 1) if pool_kind in ("avg", "max") else (channels, height, width)
    order = (
        feature_order(gm, moves, shape_of(pool or trunk_end)[1:])
        if moves
        else np.arange(math.prod(volume))
    )
    return Feed(
        source=source, moves=moves, pool=pool, pool_kind=pool_kind, trunk_end=trunk_end,
        trunk_output=(channels, height, width), feature_volume=volume, feature_order=order,
    )  # fmt: skip


def _same_trunk(gm: fx.GraphModule, outputs: ForwardOutputs, feeds: list[Feed]) -> None:
    ends = {feed.trunk_end for feed in feeds}
    if len(ends) > 1:
        reads = "; ".join(
            f"{describe(gm, feed.source)} reads {describe(gm, feed.trunk_end)}" for feed in feeds
        )
        raise ConversionError(
            f"the heads of the {len(outputs.nodes)} outputs read different trunk positions "
            f"({reads}): every head must read the same trunk output (a head on an earlier "
            "layer has another geometry, no common grid)."
        )


def check_trunk(gm: fx.GraphModule, head: FcHead) -> None:
    """Raise on any op upstream of the head with no exact dense form; collect identity
    adaptive pools into ``head.identity_pools`` (``rewrite`` removes them)."""
    trunk = _ancestors(head.trunk_end)
    channel_last = check_layouts(gm, trunk, input_dependent(gm), head.trunk_end)
    dependent: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            dependent.add(node)
        if node not in trunk or node.op in ("placeholder", "get_attr"):
            continue
        if any(arg in dependent for arg in node.all_input_nodes):
            dependent.add(node)
        change = adaptive_pool_change(gm, node)
        if change is not None:
            if change[0] == change[1]:
                head.identity_pools.append(node)
                continue
            raise _adaptive_pool_error(gm, node, change, in_trunk=True)
        problem = None if node in channel_last else global_problem(gm, node)
        if problem is not None:
            raise ConversionError(
                f"{describe(gm, node)} is {problem}. It is computed per image, not per window "
                "(as in squeeze-and-excitation, attention or global-context blocks), so the "
                "classifier has no exact dense form."
            )
        _check_local_shapes(gm, node, dependent)


def final_activation(gm: fx.GraphModule, node: fx.Node | None = None) -> str | None:
    """'softmax' / 'log_softmax' when the output ``node`` (default: the forward's first)
    ends in one over the classes, 'sigmoid' when it ends in a sigmoid (independent
    per-class scores), else None."""
    node = node or forward_outputs(gm).nodes[0]
    while isinstance(node, fx.Node) and _is_passthrough(gm, node):
        node = node.args[0]
    if not isinstance(node, fx.Node):
        return None
    if isinstance(module_of(gm, node), nn.Sigmoid) or op_name(node) == "sigmoid":
        return "sigmoid"
    return softmax_kind(gm, node)


# -- helpers ------------------------------------------------------------------------------
def _is_passthrough(gm: fx.GraphModule, node: fx.Node) -> bool:
    module = module_of(gm, node)
    if module is not None:
        return isinstance(module, (nn.Dropout, nn.Identity))
    return op_name(node) in PASSTHROUGH_OPS and bool(node.args)


def _pool_kind(gm: fx.GraphModule, pool: fx.Node | None, size_text: str) -> str:
    if pool is None:
        return "none"
    change = adaptive_pool_change(gm, pool)
    if change is not None and change[0] == change[1]:
        return "identity"
    kind = fc_head_pool_kind(gm, pool)
    if kind in ("avg", "max"):
        return kind
    raise _adaptive_pool_error(gm, pool, change, in_trunk=False, size_text=size_text)


def _adaptive_pool_error(gm, node, change, *, in_trunk: bool, size_text: str = "") -> Exception:
    (in_h, in_w), (out_h, out_w) = change
    if in_trunk and (out_h, out_w) == (1, 1):
        return ConversionError(
            f"{describe(gm, node)} is a global pool inside the trunk: it is computed per "
            "image, not per window (squeeze-and-excitation or global-context block), so the "
            "classifier has no exact dense form."
        )
    at = f" at input size {size_text}" if size_text else ""
    return ConversionError(
        f"{describe(gm, node)} is not an identity{at}: it resamples the trunk's {in_h}x{in_w} "
        f"output to {out_h}x{out_w}. Pass the input size at which the trunk output is exactly "
        f"{out_h}x{out_w} (the classifier's training size, e.g. --input-size 224 for "
        "torchvision's VGG/AlexNet), where the pool is an identity and can be removed."
    )


def _check_local_shapes(gm, node, input_dependent) -> None:
    shape = shape_of(node)
    if shape is None:  # a size, an int: only the tensor ops that use it matter
        return
    size_source = spatial_size_source(node)
    if size_source is not None:
        raise ConversionError(
            f"{describe(gm, node)} depends on the input's height/width (through "
            f"'{size_source.name}'), so it would change meaning on a larger image: make the "
            "trunk use fixed sizes (e.g. a fixed pooling kernel)."
        )
    if len(shape) != 4:
        raise ConversionError(
            f"{describe(gm, node)} turns the trunk's N x C x H x W volume into a rank-"
            f"{len(shape)} tensor {shape} before the classifier head (attention or a global "
            "op): no exact dense form."
        )
    spatial = {shape_of(a)[2:] for a in tensor_inputs(node) if a in input_dependent}
    if len(spatial) > 1:
        raise ConversionError(
            f"{describe(gm, node)} combines trunk tensors of different spatial sizes "
            f"{sorted(spatial)}: a per-image value modulates the trunk (squeeze-and-excitation "
            "or global context), so the classifier has no exact dense form."
        )


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen
