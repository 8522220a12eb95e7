"""Classify the ops of a traced torch classifier: which are local, which are global.

A window classifier becomes an exact dense net only if every op of its trunk is local (its
output at a position depends on a bounded neighbourhood) and the head is a chain of
per-feature ops. These predicates look at one ``torch.fx`` node and its traced shapes
(:func:`densemap.convert.from_torch.trace.shape_of`); :mod:`densemap.convert.from_torch.fc` decides what to do.
"""

from __future__ import annotations

import operator

import torch.fx as fx
from torch import nn

from densemap.convert.from_torch.trace import shape_of

# Per-element (or per-channel) modules: they commute with the FC -> conv rewrite.
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.PReLU,
    nn.Threshold, nn.Dropout, nn.AlphaDropout, nn.Identity,
)  # fmt: skip
ELEMENTWISE_OPS = frozenset(
    "relu relu_ relu6 gelu silu sigmoid tanh hardswish hardsigmoid hardtanh leaky_relu elu "
    "selu celu softplus mish dropout alpha_dropout contiguous clone add sub mul truediv neg "
    "abs clamp clamp_min clamp_max pow".split()
)
RESHAPE_OPS = frozenset({"flatten", "view", "reshape", "squeeze"})
SOFTMAX_OPS = {"softmax": "softmax", "log_softmax": "log_softmax"}
SOFTMAX_MODULES = {nn.Softmax: "softmax", nn.LogSoftmax: "log_softmax"}
REDUCTION_OPS = frozenset(
    "mean sum amax amin max min std var norm prod logsumexp argmax argmin nansum nanmean "
    "median std_mean var_mean count_nonzero".split()
)
ATTENTION_OPS = frozenset(
    "matmul bmm baddbmm einsum mm scaled_dot_product_attention multi_head_attention_forward "
    "interpolate upsample layer_norm group_norm instance_norm".split()
)
ADAPTIVE_POOL_MODULES = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
GLOBAL_MODULES = (
    nn.MultiheadAttention, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d, nn.Upsample, nn.Flatten, nn.Linear, nn.Transformer,
    nn.TransformerEncoderLayer, nn.TransformerEncoder,
)  # fmt: skip


def op_name(node: fx.Node) -> str:
    """'mean', 'flatten', 'add'... for call_function/call_method nodes, '' otherwise."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        if node.target is getattr:
            return "getattr"
        return getattr(node.target, "__name__", "")
    return ""


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [arg for arg in node.all_input_nodes if shape_of(arg) is not None]


def single_input(node: fx.Node) -> fx.Node | None:
    """The only tensor input of ``node``, or None when it has zero or several."""
    inputs = tensor_inputs(node)
    return inputs[0] if len(inputs) == 1 else None


def is_elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    module = module_of(gm, node)
    if module is not None:
        return isinstance(module, ELEMENTWISE_MODULES)
    return op_name(node) in ELEMENTWISE_OPS or node.target in (operator.neg, operator.pos)


def softmax_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """'softmax' / 'log_softmax' for a softmax node over dim 1 or -1 of (N, K), else None."""
    module = module_of(gm, node)
    if module is not None:
        kind = SOFTMAX_MODULES.get(type(module))
        return kind if kind and module.dim in (None, 1, -1) else None
    kind = SOFTMAX_OPS.get(op_name(node))
    return kind if kind and softmax_dim(node) in (None, 1, -1) else None


def softmax_dim(node: fx.Node):
    if "dim" in node.kwargs:
        return node.kwargs["dim"]
    return node.args[1] if len(node.args) > 1 else None


def reduced_dims(node: fx.Node) -> tuple[int, ...] | None:
    """Normalized dims a reduction node reduces (all dims when none is given), or None
    when the node is not a reduction (e.g. torch.max(a, b) is elementwise)."""
    if op_name(node) not in REDUCTION_OPS or not node.args:
        return None
    shape = shape_of(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    if shape is None:
        return None
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if isinstance(dim, fx.Node):
        return None if shape_of(dim) is not None else tuple(range(len(shape)))
    if dim is None:
        return tuple(range(len(shape)))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return tuple(sorted(d % len(shape) for d in dims))


def fc_head_pool_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """'avg' / 'max' for a global pool of an NCHW tensor over H and W, 'adaptive_avg' /
    'adaptive_max' for an adaptive pool whose output is not 1x1, None otherwise."""
    module = module_of(gm, node)
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        kind = "avg" if isinstance(module, nn.AdaptiveAvgPool2d) else "max"
        return kind if shape_of(node)[2:] == (1, 1) else f"adaptive_{kind}"
    name = op_name(node)
    if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d") and shape_of(node) is not None:
        kind = "avg" if "avg" in name else "max"
        return kind if shape_of(node)[2:] == (1, 1) else f"adaptive_{kind}"
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if source is None or len(shape_of(source) or ()) != 4:
        return None
    if reduced_dims(node) == (2, 3) and name in ("mean", "amax"):
        return "avg" if name == "mean" else "max"
    return None


def adaptive_pool_change(gm: fx.GraphModule, node: fx.Node) -> tuple[tuple, tuple] | None:
    """(input spatial size, output spatial size) for an adaptive pool node, else None."""
    module = module_of(gm, node)
    is_pool = isinstance(module, ADAPTIVE_POOL_MODULES) or op_name(node).startswith("adaptive_")
    source = single_input(node)
    if not is_pool or source is None or shape_of(node) is None:
        return None
    return shape_of(source)[2:], shape_of(node)[2:]


def global_problem(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why ``node`` (inside the trunk) has no exact dense form, or None when it is local."""
    module = module_of(gm, node)
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) >= 2:
        return "it normalizes over the spatial axes (per image, not per window)"
    if isinstance(module, GLOBAL_MODULES):
        return "a global, attention or fully-connected op inside the trunk"
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    rank = len(shape_of(source) or ()) if source is not None else 0
    dims = reduced_dims(node)
    if dims is not None and any(d >= 2 for d in dims) and rank >= 3:
        return "a reduction over the spatial axes (a global pool)"
    if (module is not None and type(module) in SOFTMAX_MODULES) or op_name(node) in SOFTMAX_OPS:
        dim = module.dim if module is not None else softmax_dim(node)
        if dim is None or rank < 3 or dim % rank >= 2:
            return "a softmax over the spatial axes (attention)"
    if op_name(node) in ATTENTION_OPS:
        return "an attention, resize or per-image normalization op"
    return None


def spatial_size_source(node: fx.Node) -> fx.Node | None:
    """A size()/shape node that feeds ``node``'s arguments with a spatial extent (H or W).

    Ops whose arguments depend on the input's H, W (``F.avg_pool2d(x, x.shape[2:])``)
    change meaning on a larger image. Batch (dim 0) and channel (dim 1) sizes are fine.
    """
    stack = [(arg, node) for arg in node.all_input_nodes if shape_of(arg) is None]
    seen: set[fx.Node] = set()
    while stack:
        current, consumer = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        name = op_name(current)
        if name in ("size", "getattr") and isinstance(current.args[0], fx.Node):
            rank = len(shape_of(current.args[0]) or ())
            if name == "size" and len(current.args) > 1 and isinstance(current.args[1], int):
                if rank and current.args[1] % rank >= 2:
                    return current
                continue
            index = consumer.args[1] if op_name(consumer) == "getitem" else None
            if not (isinstance(index, int) and rank and index % rank < 2):
                return current
            continue
        stack.extend((arg, current) for arg in current.all_input_nodes if shape_of(arg) is None)
    return None
