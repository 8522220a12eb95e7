"""Find a traced classifier's head, check its trunk is local, and rewrite the head as convs.

The head is found from the output backwards: a chain of per-feature ops on ``(N, F)``
tensors (Linear, activations, dropout, BatchNorm1d, softmax), fed by a flatten of the trunk's
``C x h x w`` output, optionally through a global pool over H, W. Everything upstream of
that is the trunk, which must be local everywhere (see :mod:`convert.torch_ops`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from convert.torch_ops import (
    RESHAPE_OPS,
    adaptive_pool_change,
    global_problem,
    head_pool_kind,
    is_elementwise,
    module_of,
    op_name,
    single_input,
    softmax_kind,
    spatial_size_source,
    tensor_inputs,
)
from convert.torch_trace import describe, shape_of
from service.errors import ConversionError

PASSTHROUGH_OPS = frozenset({"dropout", "contiguous", "clone"})


@dataclass
class Head:
    chain: list[fx.Node]  # per-feature head ops in graph order, from before the first Linear
    reshapes: list[fx.Node]  # flatten/view/reshape/squeeze nodes, the one nearest the head first
    pool: fx.Node | None  # the pool between trunk and flatten, if any
    pool_kind: str  # "none", "identity", "avg" or "max"
    trunk_end: fx.Node  # the last node of the trunk (its output is N x C x h x w)
    trunk_output: tuple[int, int, int]
    feature_volume: tuple[int, int, int]  # what the first Linear sees, as C x h x w
    final_activation: str | None
    identity_pools: list[fx.Node] = field(default_factory=list)


def find_head(gm: fx.GraphModule, *, size: tuple[int, int]) -> Head:
    size_text = f"{size[0]}x{size[1]}"
    node = _output_node(gm).args[0]
    shape = shape_of(node) if isinstance(node, fx.Node) else None
    if shape is None or len(shape) != 2:
        raise ConversionError(
            f"the model's output has shape {shape} at input size {size_text}, expected "
            "(batch, classes): it has no Linear classifier head to convert (a model that "
            "already outputs a score map is fully convolutional as it is)."
        )
    chain: list[fx.Node] = []
    while node.op != "placeholder" and len(shape_of(node) or ()) == 2:
        source = single_input(node)
        if source is None or not _is_head_op(gm, node):
            break
        chain.append(node)
        node = source
    chain.reverse()
    linears = [n for n in chain if isinstance(module_of(gm, n), nn.Linear)]
    if not linears:
        raise ConversionError(
            f"the model has no Linear classifier head: its output comes from {describe(gm, node)}. "
            "densemap converts classifiers whose head is nn.Linear layers on the flattened "
            "(or globally pooled) trunk output."
        )
    if len({n.target for n in linears}) != len(linears):
        raise ConversionError("a Linear layer is used twice in the head: not supported.")

    reshapes: list[fx.Node] = []
    if head_pool_kind(gm, node) in ("avg", "max") and len(shape_of(node)) == 2:
        pool: fx.Node | None = node  # x.mean((2, 3)) straight into the head
    else:
        while _is_reshape(gm, node):
            reshapes.append(node)
            node = single_input(node)
        if not reshapes:
            raise ConversionError(
                f"the classifier head is fed by {describe(gm, node)}, which is not a supported "
                "form: expected a flatten/view/reshape of the trunk's C x h x w output, or a "
                "global average/max pool over H and W. Attention heads, class tokens and other "
                "global ops have no exact dense form."
            )
        pool = node if head_pool_kind(gm, node) is not None else None
    trunk_end = single_input(pool) if pool is not None else node
    trunk_shape = shape_of(trunk_end) or ()
    if len(trunk_shape) != 4 or min(trunk_shape) < 1:
        raise ConversionError(
            f"at input size {size_text} the trunk output ({describe(gm, trunk_end)}) has shape "
            f"{trunk_shape}, not a non-empty N x C x h x w volume: the input size is too small "
            "or the trunk is not convolutional; pass the classifier's training input size."
        )
    pool_kind = _pool_kind(gm, pool, size_text)
    channels, height, width = trunk_shape[1:]
    volume = (channels, 1, 1) if pool_kind in ("avg", "max") else (channels, height, width)
    _check_pre_linear_ops(gm, chain, linears[0], volume)
    return Head(
        chain=chain,
        reshapes=reshapes,
        pool=pool,
        pool_kind=pool_kind,
        trunk_end=trunk_end,
        trunk_output=(channels, height, width),
        feature_volume=volume,
        final_activation=final_activation(gm),
    )


def check_trunk(gm: fx.GraphModule, head: Head) -> None:
    """Raise on any op upstream of the head with no exact dense form; collect identity
    adaptive pools into ``head.identity_pools`` (``rewrite`` removes them)."""
    trunk = _ancestors(head.trunk_end)
    input_dependent: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            input_dependent.add(node)
        if node not in trunk or node.op in ("placeholder", "get_attr"):
            continue
        if any(arg in input_dependent for arg in node.all_input_nodes):
            input_dependent.add(node)
        change = adaptive_pool_change(gm, node)
        if change is not None:
            if change[0] == change[1]:
                head.identity_pools.append(node)
                continue
            raise _adaptive_pool_error(gm, node, change, in_trunk=True)
        problem = global_problem(gm, node)
        if problem is not None:
            raise ConversionError(
                f"{describe(gm, node)} is {problem}. It is computed per image, not per window "
                "(as in squeeze-and-excitation, attention or global-context blocks), so the "
                "classifier has no exact dense form."
            )
        _check_local_shapes(gm, node, input_dependent)


def final_activation(gm: fx.GraphModule) -> str | None:
    """'softmax' / 'log_softmax' when the forward ends in one over the classes, else None."""
    node = _output_node(gm).args[0]
    while isinstance(node, fx.Node) and _is_passthrough(gm, node):
        node = node.args[0]
    return softmax_kind(gm, node) if isinstance(node, fx.Node) else None


# -- helpers ------------------------------------------------------------------------------
def _output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "output")


def _is_passthrough(gm: fx.GraphModule, node: fx.Node) -> bool:
    module = module_of(gm, node)
    if module is not None:
        return isinstance(module, (nn.Dropout, nn.Identity))
    return op_name(node) in PASSTHROUGH_OPS and bool(node.args)


def _is_head_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    module = module_of(gm, node)
    if isinstance(module, (nn.Linear, nn.BatchNorm1d)):
        return True
    if softmax_kind(gm, node) is not None or is_elementwise(gm, node):
        return spatial_size_source(node) is None
    return False


def _is_reshape(gm: fx.GraphModule, node: fx.Node) -> bool:
    module = module_of(gm, node)
    if not (isinstance(module, nn.Flatten) or op_name(node) in RESHAPE_OPS):
        return False
    source = single_input(node)
    if source is None:
        return False
    out_shape, in_shape = shape_of(node), shape_of(source)
    return (
        len(in_shape) > len(out_shape) >= 2
        and out_shape[0] == in_shape[0]
        and math.prod(out_shape) == math.prod(in_shape)
    )


def _pool_kind(gm: fx.GraphModule, pool: fx.Node | None, size_text: str) -> str:
    if pool is None:
        return "none"
    change = adaptive_pool_change(gm, pool)
    if change is not None and change[0] == change[1]:
        return "identity"
    kind = head_pool_kind(gm, pool)
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


def _check_pre_linear_ops(gm, chain, first_linear, volume) -> None:
    """Per-feature parameters before the first Linear see C*h*w features, which do not map
    onto the C channels of a volume unless h = w = 1."""
    for node in chain[: chain.index(first_linear)]:
        module = module_of(gm, node)
        per_feature = isinstance(module, nn.BatchNorm1d) or (
            isinstance(module, nn.PReLU) and module.num_parameters > 1
        )
        if per_feature and volume[1:] != (1, 1):
            raise ConversionError(
                f"{describe(gm, node)} has per-feature parameters on the flattened C x h x w "
                "trunk output, before the first Linear: it has no convolutional form."
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
