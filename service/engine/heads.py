"""A model's heads: which ONNX outputs are maps, how many channels each has, which come back.

A dense model may have several outputs over one trunk (contract version 2,
:class:`densemap.service.contract.Head`): the *primary* head (a classifier) goes through the
postprocess of :mod:`densemap.service.engine.postprocess` (softmax, top-k, argmax, detections...);
every *extra* head (box regression, landmarks, a second classifier) comes back as its own
map ``[channels, n_h, n_w]`` of the model's own values, cropped to the same cells as the
primary map and never softmaxed. Rules (docs/engine.md "Several heads"):

- loading: every head is an ONNX output of the main model and of each à-trous variant; a
  contract-v2 model has no output that is not a head; each head gives a 1x1 map on a
  window-size input and the primary's cell count on a larger one; a head's labels, when
  given, name its channels. Any mismatch is a ModelLoadError naming the head.
- requests: ``ScoreOptions.heads`` names the extra heads to return (None: all, (): none);
  naming the primary head is allowed and changes nothing (its outputs are ``scores``,
  top-k, argmax); an unknown name is InvalidOption naming the heads there are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from densemap.service.contract import ModelMetadata
from densemap.service.errors import InvalidOption, ModelLoadError


@dataclass(frozen=True)
class HeadInfo:
    """One head of a loaded model: its ONNX output name, kind, channel labels, channels."""

    name: str
    kind: str
    labels: tuple[str, ...]
    channels: int


def head_key(name: str) -> str:
    """The key of a head's map among a pass's outputs and a map's arrays ("map",
    "top_values"... never hold a '/')."""
    return "head/" + name


def check_outputs(
    metadata: ModelMetadata, inputs: Sequence[str], outputs: Sequence[str], *, file: str
) -> None:
    """The graph's input and outputs against the metadata's input and heads."""
    heads = [head.name for head in metadata.heads]
    missing = [name for name in heads if name not in outputs]
    if metadata.input_name not in inputs or missing:
        what = f"head(s) {missing}" if missing else f"input {metadata.input_name!r}"
        raise ModelLoadError(
            f"{file}: the metadata names {what}, but the graph has inputs {list(inputs)} and "
            f"outputs {list(outputs)}: the heads must be the ONNX outputs' names; reconvert "
            "the model or fix its metadata"
        )
    unnamed = [name for name in outputs if name not in heads]
    if unnamed and metadata.version >= 2:
        raise ModelLoadError(
            f"{file}: the graph has output(s) {unnamed} that the metadata does not list as "
            f"heads (its heads are {heads}): list every output under 'heads' or remove it"
        )


def check_head_maps(
    shapes: dict[str, tuple[int, ...]], *, cells: tuple[int, int], size: tuple[int, int], file: str
) -> None:
    """Every head's output ``[1, channels, n_h, n_w]`` has ``cells`` on a ``size`` input."""
    for name, shape in shapes.items():
        if len(shape) != 4 or shape[0] != 1:
            raise ModelLoadError(
                f"{file}: head {name!r} gave an output of shape {list(shape)}, not a map "
                "[1, channels, n_h, n_w]: every head must be a dense map over the trunk"
            )
        if tuple(shape[2:]) != tuple(cells):
            raise ModelLoadError(
                f"{file}: head {name!r} gave {shape[2]}x{shape[3]} cells on a "
                f"{size[0]}x{size[1]} input where the primary head gives {cells[0]}x"
                f"{cells[1]}: every head must have the model's geometry (window, stride)"
            )


def describe_heads(
    metadata: ModelMetadata, channels: dict[str, int], labels: tuple[str, ...]
) -> tuple[HeadInfo, ...]:
    """Every head, primary first (with the engine's labels), checking labels vs channels."""
    infos = []
    for index, head in enumerate(metadata.heads):
        head_labels = labels if index == 0 else head.labels
        if index and head.labels and len(head.labels) != channels[head.name]:
            raise ModelLoadError(
                f"head {head.name!r} has {channels[head.name]} channels but "
                f"{len(head.labels)} labels {list(head.labels)}: fix the metadata's labels"
            )
        infos.append(HeadInfo(head.name, head.kind, tuple(head_labels), channels[head.name]))
    return tuple(infos)


def select_heads(wanted, heads: tuple[HeadInfo, ...]) -> tuple[HeadInfo, ...]:
    """The extra heads a request returns (``wanted``: ScoreOptions.heads, distinct names),
    in model order."""
    extra = heads[1:]
    if wanted is None:
        return extra
    names = list(wanted)
    known = [head.name for head in heads]
    unknown = [name for name in names if name not in known]
    if unknown:
        primary = " (the first is the primary head: the scores map)" if len(known) > 1 else ""
        raise InvalidOption(
            f"the model has no head(s) {unknown[:5]}: its heads are {known}{primary}"
        )
    return tuple(head for head in extra if head.name in names)
