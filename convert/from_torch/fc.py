"""Turn a torch window classifier into an equivalent fully-convolutional module.

``fully_convolutional(model, input_size=224)`` traces the model with torch.fx, runs one
dummy batch at ``input_size`` to learn every tensor's shape, then rewrites the head:

- the first Linear after the trunk becomes ``Conv2d(C, O, (h, w))`` where ``C x h x w`` is
  the trunk output at ``input_size``; its weight is ``weight.view(O, C, h, w)`` because
  PyTorch flattens C, H, W in that order. Later Linears become 1x1 convs;
- flatten / view / reshape / squeeze between the trunk and the head are removed;
- an adaptive pool that is an identity at ``input_size`` is removed; a global average (max)
  pool feeding the head (``AdaptiveAvgPool2d(1)``, ``x.mean((2, 3))``, ``amax``) becomes a
  sliding ``AvgPool2d((h, w), stride=1)`` (``MaxPool2d``) over the trunk output;
- a final softmax / log-softmax runs over the channel axis (dim 1) of the NCHW map;
- a forward returning a tuple or dict of outputs (several heads on one trunk) gives a
  module returning the same structure of maps, one per head.

Anything with no exact dense form (a global op inside the trunk, an attention head, a
non-identity adaptive pool) raises :class:`~densemap.service.errors.ConversionError` naming the layer.
The result is checked against the original at ``input_size`` before it is returned.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from densemap.convert.from_torch import fc_head as torch_fc_head
from densemap.convert.from_torch import rewrite as torch_rewrite
from densemap.convert.from_torch.outputs import (
    ForwardOutputs,
    OrderedOutputs,
    forward_outputs,
    head_names,
    output_values,
)
from densemap.convert.from_torch.pooled_fc_head import slide_inner_pool
from densemap.convert.from_torch.shuffle import fold_channel_shuffles
from densemap.convert.from_torch.trace import (
    dummy_input,
    infer_in_channels,
    normalize_size,
    propagate_shapes,
    trace,
)
from densemap.service.errors import ConversionError

# Max |dense - original| at input_size, relative to 1 + max|original|. fp64 must agree to
# rounding; fp32 conv and matmul sum in different orders (error ~ sqrt(C*h*w) * 6e-8).
CHECK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3}
LOW_PRECISION_TOLERANCE = 5e-2


@dataclass(frozen=True)
class TorchConversion:
    """A converted module and what the conversion found out about the classifier."""

    module: nn.Module
    input_size: tuple[int, int]
    in_channels: int
    trunk_output: tuple[int, int, int]  # C, h, w of the trunk at input_size
    fc_head_pool: str  # "none", "identity", "avg" or "max" (of the first output's head)
    num_classes: int  # channels of the first output
    final_activation: str | None  # of the first output: "softmax", "log_softmax", "sigmoid"
    removed: tuple[str, ...]  # module paths / node names taken out of the graph
    outputs: ForwardOutputs | None = None  # the forward's output structure
    channels: tuple[int, ...] = ()  # per output, in the forward's order
    final_activations: tuple[str | None, ...] = ()  # per output, in the forward's order

    def head_names(self, given: Sequence[str] = ()) -> tuple[str, ...]:
        """The heads' names: dict keys, ``given`` names, ``output0``... or ``scores``."""
        return head_names(self.outputs, given)

    def ordered_module(self) -> nn.Module:
        """The module, returning a flat tuple of maps in the forward's order when the
        classifier has several outputs (what the ONNX exporter names)."""
        if not self.outputs.several:
            return self.module
        return OrderedOutputs(self.module, self.outputs.keys).eval()

    @property
    def ends_in_softmax(self) -> bool:
        return self.final_activation == "softmax"


def fully_convolutional(
    model: nn.Module, *, input_size: tuple[int, int] | int, in_channels: int | None = None
) -> nn.Module:
    """An eval-mode fully-convolutional copy of ``model`` (``model`` is not modified)."""
    return convert_classifier(model, input_size=input_size, in_channels=in_channels).module


def convert_classifier(
    model: nn.Module, *, input_size: tuple[int, int] | int, in_channels: int | None = None
) -> TorchConversion:
    """Like :func:`fully_convolutional`, also reporting trunk size, head pool and softmax."""
    if not isinstance(model, nn.Module):
        raise ConversionError(f"expected a torch nn.Module, got {type(model).__name__}")
    size = normalize_size(input_size)
    gm = trace(copy.deepcopy(model).eval())
    channels = in_channels if in_channels is not None else infer_in_channels(gm)
    image_nchw = dummy_input(gm, size=size, in_channels=channels)
    reference = propagate_shapes(gm, image_nchw)
    fold_channel_shuffles(gm)  # ShuffleNet: views through H, W -> a channel index_select
    slide_inner_pool(gm)  # ConvNeXt: global pool -> LayerNorm over C -> flatten
    outputs = forward_outputs(gm)

    head = torch_fc_head.find_fc_head(gm, size=size, outputs=outputs)
    torch_fc_head.check_trunk(gm, head)
    removed = torch_rewrite.rewrite(gm, head)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    gm.eval()

    references = output_values(reference, outputs)
    _check_against_original(gm, outputs, image_nchw, references, size)
    return TorchConversion(
        module=gm,
        input_size=size,
        in_channels=channels,
        trunk_output=head.trunk_output,
        fc_head_pool=head.pool_kind,
        num_classes=int(references[0].shape[1]),
        final_activation=head.final_activations[0],
        removed=tuple(removed),
        outputs=outputs,
        channels=tuple(int(value.shape[1]) for value in references),
        final_activations=head.final_activations,
    )


def ends_in_softmax(model: nn.Module) -> bool:
    """Whether ``model`` (original or converted) ends in a softmax over the classes, so its
    scores are probabilities. A final log-softmax does not count (log-probabilities)."""
    return final_activation(model) == "softmax"


def final_activation(model: nn.Module) -> str | None:
    """'softmax', 'log_softmax', 'sigmoid' or None: the last non-trivial op of the forward."""
    gm = model if isinstance(model, fx.GraphModule) else trace(model)  # tracing runs nothing
    return torch_fc_head.final_activation(gm)


def _check_against_original(
    gm: fx.GraphModule, outputs: ForwardOutputs, image_nchw: torch.Tensor, references, size
) -> None:
    """The dense module at input_size must give the original's outputs in 1x1 maps."""
    with torch.no_grad():
        result = gm(image_nchw)
    try:
        maps = output_values(result, outputs)
    except (KeyError, IndexError, TypeError):
        maps = (result,)
    for position, (score_map, reference) in enumerate(zip(maps, references, strict=False)):
        what = f" ({outputs.label(position)})" if outputs.several else ""
        expected = (reference.shape[0], reference.shape[1], 1, 1)
        if not isinstance(score_map, torch.Tensor) or tuple(score_map.shape) != expected:
            got = tuple(score_map.shape) if isinstance(score_map, torch.Tensor) else score_map
            raise ConversionError(
                f"internal check failed: the converted module gives {got}{what} at input size "
                f"{size[0]}x{size[1]}, expected {expected}. Please report this model."
            )
        scores = score_map.flatten(1)
        diff = (scores - reference).abs().max().item()
        scale = 1.0 + reference.abs().max().item()
        tolerance = CHECK_TOLERANCE.get(reference.dtype, LOW_PRECISION_TOLERANCE)
        if not diff <= tolerance * scale:
            raise ConversionError(
                f"internal check failed: the converted module differs from the original by "
                f"{diff:.3g}{what} at input size {size[0]}x{size[1]} (allowed "
                f"{tolerance * scale:.3g}). The head contains an op the converter does not "
                "understand: please report it."
            )
