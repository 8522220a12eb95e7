"""Rewrite a traced classifier's head into convolutions (the graph surgery half).

:func:`rewrite` takes the :class:`~densemap.convert.from_torch.fc_head.FcHead` that ``find_fc_head`` and
``check_trunk`` validated and, in place on the ``GraphModule``:

- removes identity adaptive pools and the flatten/view/reshape/permute nodes before the head
  (before every head of a multi-head classifier, once each when heads share them);
- turns a global average/max pool into ``AvgPool2d((h, w), stride=1)`` / ``MaxPool2d``;
- turns the first Linear into ``Conv2d(C, O, (h, w))`` and later ones into 1x1 convs, copying
  weights with asserted shapes (the kernel taps follow the flatten order, permutes
  included); BatchNorm1d becomes BatchNorm2d; per-feature vectors are read as (1, F, 1, 1);
- makes a softmax / log-softmax run over dim 1, the classes of the NCHW map.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from densemap.convert.from_torch.fc_head import FcHead, Feed
from densemap.convert.from_torch.ops import module_of, op_name, single_input, softmax_kind
from densemap.convert.from_torch.trace import shape_of
from densemap.service.errors import ConversionError


def rewrite(gm: fx.GraphModule, head: FcHead) -> list[str]:
    """Rewrite ``gm``'s graph in place into the fully-convolutional form; returns the names
    of the layers taken out."""
    graph = gm.graph
    removed = []
    identity = [feed.pool for feed in head.feeds if feed.pool_kind == "identity"]
    moves = [node for feed in head.feeds for node in feed.moves]
    for node in head.identity_pools + identity + moves:
        if node in removed:
            continue  # read by two heads' feeds: taken out once
        removed.append(node)
        node.replace_all_uses_with(single_input(node))
        graph.erase_node(node)
    slid = set()
    for feed in head.feeds:
        if feed.pool_kind in ("avg", "max") and feed.pool not in slid:
            slid.add(feed.pool)
            _slide_pool(gm, feed)
    for node, vector in head.constants:
        _per_channel(graph, node, vector)
    for node in head.chain:
        module = module_of(gm, node)
        if isinstance(module, nn.Linear):
            feed = head.first_linears.get(node)
            volume = feed.feature_volume if feed else (module.in_features, 1, 1)
            order = feed.feature_order if feed else None
            conv = _linear_to_conv(module, volume, node.target, order)
            _set_submodule(gm, str(node.target), conv)
        elif isinstance(module, nn.BatchNorm1d):
            _set_submodule(gm, str(node.target), _batchnorm_2d(module))
        elif isinstance(module, (nn.Softmax, nn.LogSoftmax)):
            module.dim = 1  # classes are the channel axis of the NCHW map
        elif softmax_kind(gm, node) is not None:
            _set_softmax_dim(node)
    _erase_dead_size_nodes(graph)
    return [str(node.target) if node.op == "call_module" else node.name for node in removed]


def _slide_pool(gm: fx.GraphModule, head: Feed) -> None:
    """Global pool over the trunk's h x w -> the same pool sliding with stride 1."""
    _, height, width = head.trunk_output
    pool_type = nn.AvgPool2d if head.pool_kind == "avg" else nn.MaxPool2d
    sliding = pool_type((height, width), stride=1, padding=0)
    node = head.pool
    if node.op == "call_module":
        _set_submodule(gm, str(node.target), sliding)
        return
    name = "fc_head_pool"
    while hasattr(gm, name):
        name += "_"
    gm.add_submodule(name, sliding)
    with gm.graph.inserting_after(node):
        new_node = gm.graph.call_module(name, (head.trunk_end,))
    node.replace_all_uses_with(new_node)
    gm.graph.erase_node(node)


def _per_channel(graph: fx.Graph, node: fx.Node, vector: fx.Node) -> None:
    """A per-feature vector of shape (F,) or (1, F) would broadcast over the map's width:
    read it as (1, F, 1, 1), one value per channel, the features of the map."""
    with graph.inserting_before(node):
        laid_out = graph.call_method("reshape", (vector, 1, -1, 1, 1))
    node.replace_input_with(vector, laid_out)


def _linear_to_conv(linear: nn.Linear, volume, path, order=None) -> nn.Conv2d:
    channels, height, width = volume
    out_features, in_features = linear.weight.shape
    if in_features != channels * height * width:
        raise ConversionError(
            f"layer '{path}' expects {in_features} input features but the trunk gives "
            f"C x h x w = {channels}x{height}x{width} = {channels * height * width}: pass "
            "the classifier's training input size."
        )
    weight = linear.weight
    conv = nn.Conv2d(
        channels, out_features, (height, width), bias=linear.bias is not None,
        device=weight.device, dtype=weight.dtype,
    )  # fmt: skip
    # Feature f of the Linear reads element order[f] = c*h*w + y*w + x of the C x h x w
    # volume (plain flatten: order[f] = f, a view; after a permute, the permuted index), so
    # its weights go to kernel tap (c, y, x). Assert the shapes before each copy: indexing
    # and copy_ broadcast, so a wrong shape could otherwise copy silently.
    flat = weight.detach()
    if order is not None:
        assert tuple(order.shape) == (in_features,), (order.shape, in_features)
        flat = torch.zeros_like(flat)
        flat[:, torch.as_tensor(order)] = weight.detach()
    kernel = flat.reshape(out_features, channels, height, width)
    assert conv.weight.shape == kernel.shape, (conv.weight.shape, kernel.shape)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        if linear.bias is not None:
            assert conv.bias.shape == linear.bias.shape, (conv.bias.shape, linear.bias.shape)
            conv.bias.copy_(linear.bias)
    return conv.eval()


def _batchnorm_2d(norm: nn.BatchNorm1d) -> nn.BatchNorm2d:
    """A BatchNorm1d on (N, F) features after the first Linear sees them as F channels."""
    reference = next(iter(norm.buffers()), None) if norm.weight is None else norm.weight
    replacement = nn.BatchNorm2d(
        norm.num_features, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
        track_running_stats=norm.track_running_stats,
        device=None if reference is None else reference.device,
        dtype=None if reference is None else reference.dtype,
    )  # fmt: skip
    state = norm.state_dict()
    for key, value in replacement.state_dict().items():
        # Same per-feature vectors, only the module class changes: shapes must agree.
        assert state[key].shape == value.shape, (key, state[key].shape, value.shape)
    replacement.load_state_dict(state)
    return replacement.eval()


def _set_softmax_dim(node: fx.Node) -> None:
    if "dim" in node.kwargs or len(node.args) < 2:
        node.kwargs = {**node.kwargs, "dim": 1}
    else:
        node.args = (node.args[0], 1, *node.args[2:])


def _set_submodule(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    setattr(parent, name, module)


def _erase_dead_size_nodes(graph: fx.Graph) -> None:
    """Remove size()/shape/getitem nodes left without users by the reshape removal."""
    for node in reversed(list(graph.nodes)):
        dead = not node.users and shape_of(node) is None
        if dead and op_name(node) in ("size", "getattr", "getitem", "dim"):
            graph.erase_node(node)
