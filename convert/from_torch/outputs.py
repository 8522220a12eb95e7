"""Torch path: the outputs of a classifier's forward, one per head.

A classifier returns one tensor of class scores, or several tensors computed from the same
trunk by their own heads (class scores plus box regression, landmarks...): a tuple or list,
or a dict from names to tensors. :func:`forward_outputs` reads that structure from the
traced graph; every entry must be an ``(N, F)`` tensor and becomes its own dense map. The
heads are named by the dict keys, or ``output0``, ``output1``, ... for a tuple unless the
user names them (:func:`head_names`); a single tensor is ``scores``.
:class:`OrderedOutputs` makes a converted module return a flat tuple in that order, which
is what the ONNX exporter names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from densemap.service.errors import ConversionError

SINGLE_NAME = "scores"


@dataclass(frozen=True)
class ForwardOutputs:
    """The output structure of a traced forward: ``keys`` is None for one tensor, else the
    tuple indices or dict keys, in order; ``nodes`` the graph nodes that compute them."""

    keys: tuple[int | str, ...] | None
    nodes: tuple[fx.Node, ...]

    @property
    def several(self) -> bool:
        return self.keys is not None

    def label(self, position: int) -> str:
        """How errors name one output: ``output 'boxes'`` or ``output 1``."""
        if self.keys is None:
            return "the output"
        key = self.keys[position]
        return f"output {key!r}" if isinstance(key, str) else f"output {key}"


def forward_outputs(gm: fx.GraphModule) -> ForwardOutputs:
    """Read the structure ``gm``'s forward returns (a node, a tuple/list or a dict of them)."""
    value = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if isinstance(value, fx.Node):
        return ForwardOutputs(None, (value,))
    if isinstance(value, dict):
        keys = tuple(value)
        if not all(isinstance(key, str) and key for key in keys):
            raise ConversionError(
                f"the forward returns a dict with keys {list(keys)}: head names must be "
                "non-empty strings"
            )
        items = tuple(value.values())
    elif isinstance(value, (tuple, list)):
        keys, items = tuple(range(len(value))), tuple(value)
    else:
        raise ConversionError(
            f"the forward returns {type(value).__name__}: expected a tensor of class scores, or "
            "a tuple/list or dict of (N, F) tensors (one per head)"
        )
    outputs = ForwardOutputs(keys, items)
    if not items:
        raise ConversionError("the forward returns an empty tuple or dict: nothing to convert")
    for position, item in enumerate(items):
        if not isinstance(item, fx.Node):
            raise ConversionError(
                f"{outputs.label(position)} of the forward is {type(item).__name__}, not a "
                "tensor: return a flat tuple or dict of (N, F) tensors, one per head"
            )
    if len(set(items)) != len(items):
        raise ConversionError("the forward returns the same tensor twice: one head per output")
    return outputs


def head_names(outputs: ForwardOutputs, given: Sequence[str] = ()) -> tuple[str, ...]:
    """The heads' names: ``given`` (for a tensor or a tuple), the dict keys, or defaults."""
    count = len(outputs.nodes)
    if given:
        if outputs.keys is not None and isinstance(outputs.keys[0], str):
            raise ConversionError(
                "the forward returns a dict: its keys name the heads "
                f"({', '.join(outputs.keys)}); do not give head names"
            )
        if len(given) != count:
            raise ConversionError(
                f"{len(given)} head names were given ({', '.join(given)}) but the forward "
                f"returns {count} output{'s' if count > 1 else ''}"
            )
        return tuple(given)
    if outputs.keys is None:
        return (SINGLE_NAME,)
    return tuple(key if isinstance(key, str) else f"output{key}" for key in outputs.keys)


def output_values(value, outputs: ForwardOutputs) -> tuple[torch.Tensor, ...]:
    """The tensors of a forward's result, in the order of ``outputs.keys``."""
    if outputs.keys is None:
        return (value,)
    return tuple(value[key] for key in outputs.keys)


class OrderedOutputs(nn.Module):
    """A module whose forward returns its inner module's outputs as a flat tuple, ordered
    by ``keys`` (dict keys or tuple indices): the ONNX exporter names them in that order."""

    def __init__(self, module: nn.Module, keys: Sequence[int | str]) -> None:
        super().__init__()
        self.module = module
        self.keys = tuple(keys)

    def forward(self, x):
        result = self.module(x)
        return tuple(result[key] for key in self.keys)
