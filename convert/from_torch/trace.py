"""Trace a torch classifier with torch.fx and record the shape of every node at one input size.

This is the analysis half of the torch converter (:mod:`densemap.convert.from_torch.fc` does the rewrite):

- :func:`trace` turns a module into a ``GraphModule`` whose ``call_module`` targets are the
  original module paths (``features.0``, ``layer1.0.conv1``), so errors can name layers.
- :func:`propagate_shapes` runs one dummy batch through it and stores each tensor node's
  shape in ``node.meta["densemap_shape"]``; a forward that fails (input too small, wrong
  channel count) becomes a :class:`~densemap.service.errors.ConversionError` naming the layer and size.
- :func:`describe` gives a human name for a node (module path and type, or the op and the
  module it sits in).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from densemap.service.errors import ConversionError

SHAPE_KEY = "densemap_shape"
# Batch of two, not one: a batch of one hides squeeze() calls that drop the batch axis.
DUMMY_BATCH = 2


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` (already copied and in eval mode)."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        raise ConversionError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}). "
            "Make forward() free of Python control flow that depends on tensor values or "
            "shapes, or convert through ONNX instead (export the classifier, then "
            "'densemap convert MODEL.onnx')."
        ) from None


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The traced shape of a tensor node, or None for non-tensor nodes (sizes, ints)."""
    return node.meta.get(SHAPE_KEY)


def module_path(node: fx.Node) -> str:
    """The dotted path of the module a node belongs to ('' for the top-level forward)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack)) if stack else ""


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """A name for ``node`` that a user can find in their code."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return f"layer '{node.target}' ({module})"
    op = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "op")
    where = module_path(node)
    inside = f" in module '{where}'" if where else " in the top-level forward()"
    return f"'{op}' (fx node '{node.name}'){inside}"


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, size_text: str):
        super().__init__(gm)
        self.extra_traceback = False  # our ConversionError already names the layer
        self.size_text = size_text

    def run_node(self, node: fx.Node):
        try:
            value = super().run_node(node)
        except (RuntimeError, ValueError, IndexError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            failing = (
                self.module.get_submodule(str(node.target)) if node.op == "call_module" else None
            )
            hint = (
                "The trunk output at this size does not have the number of features the "
                "Linear was trained on"
                if isinstance(failing, nn.Linear)
                else "The input size is probably too small (or in_channels is wrong)"
            )
            raise ConversionError(
                f"the model does not run at input size {self.size_text}: "
                f"{describe(self.module, node)} failed with: {first_line}. {hint}: pass the "
                "size the classifier was trained on, e.g. --input-size 224."
            ) from None
        if isinstance(value, torch.Tensor):
            node.meta[SHAPE_KEY] = tuple(value.shape)
        return value


def infer_in_channels(gm: fx.GraphModule) -> int:
    """The input channel count of the first Conv2d the forward pass calls."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if isinstance(module, nn.Conv2d):
                return module.in_channels
    raise ConversionError(
        "cannot infer the number of input channels (no Conv2d found): pass in_channels "
        "(--in-channels)."
    )


def dummy_input(gm: fx.GraphModule, *, size: tuple[int, int], in_channels: int) -> torch.Tensor:
    """A deterministic random NCHW batch on the model's device and in its dtype."""
    reference = next(iter(gm.parameters()), None)
    dtype = reference.dtype if reference is not None else torch.float32
    device = reference.device if reference is not None else torch.device("cpu")
    if device.type == "meta":
        raise ConversionError(
            "the model's weights are on the meta device: load real weights first."
        )
    generator = torch.Generator().manual_seed(0)
    image_nchw = torch.rand((DUMMY_BATCH, in_channels, *size), generator=generator)
    return image_nchw.to(device=device, dtype=dtype)


def propagate_shapes(gm: fx.GraphModule, image_nchw: torch.Tensor):
    """Run ``image_nchw`` through ``gm``, record node shapes, return the model's output:
    one tensor, or a tuple/list or dict of tensors (one per head)."""
    size_text = f"{image_nchw.shape[-2]}x{image_nchw.shape[-1]} (HxW)"
    with torch.no_grad():
        output = _ShapeRecorder(gm, size_text).run(image_nchw)
    values = output.values() if isinstance(output, dict) else output
    several = isinstance(output, (tuple, list, dict))
    if not (isinstance(output, torch.Tensor) or several) or (
        several and not all(isinstance(v, torch.Tensor) for v in values)
    ):
        raise ConversionError(
            f"the model returns {type(output).__name__}, not a tensor of class scores or a "
            "tuple/list or dict of tensors (one per head): wrap it so that forward() returns "
            "the (N, classes) logits, or a flat tuple or dict of (N, F) tensors."
        )
    return output


def normalize_size(input_size: tuple[int, int] | int) -> tuple[int, int]:
    """``224`` or ``(224, 224)`` -> ``(224, 224)``, with a clear error for anything else."""
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        input_size = (input_size, input_size)
    try:
        height, width = input_size
    except (TypeError, ValueError):
        raise ConversionError(
            f"input_size must be an int or (height, width), got {input_size!r}"
        ) from None
    for value in (height, width):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConversionError(
                f"input_size must hold positive integers, got {input_size!r}: pass the "
                "classifier's training input size, e.g. 224 or (224, 224)."
            )
    return (height, width)
