"""The heads of a dense model: its outputs, their kinds and labels, and which one is primary.

A classifier may compute several outputs from one trunk: class scores plus box regression
(and landmarks), as OverFeat's localisation or the cascade face detectors do. Every output
becomes a dense map with the model's geometry and is described in the metadata as a
:class:`densemap.service.contract.Head`. This module turns what the converter read from the dense
graph (each output's name and final op) and what the user asked for (:class:`HeadOptions`)
into the contract's heads, primary first:

- the kind is inferred from the final op (softmax -> ``probabilities``, sigmoid ->
  ``sigmoid``, none or log-softmax -> ``logits``) unless :attr:`HeadOptions.kinds` names
  it; box and landmark outputs need ``regression`` (raw values, never softmaxed);
- the primary head (the one top-k, argmax, heat-maps and detections read) is
  :attr:`HeadOptions.primary`, else the first head that classifies;
- ``labels`` of the primary head may also come from the converter's ``labels`` argument.

Every name the options use must be a head of the model; the error lists the heads there are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import onnx

from densemap.convert.geometry import compute_geometry
from densemap.service.contract import HEAD_KINDS, OUTPUT_KINDS, Geometry, Head
from densemap.service.errors import ConversionError, ModelLoadError

FINAL_OPS = {"Softmax": "softmax", "LogSoftmax": "log_softmax", "Sigmoid": "sigmoid"}
# Final ops the converter recognises -> the contract's kind. Log-probabilities are logits
# (their softmax is the probabilities).
FINAL_KINDS = {"softmax": "probabilities", "sigmoid": "sigmoid"}


def _pairs(value, what: str) -> tuple[tuple[str, object], ...]:
    if isinstance(value, Mapping):
        value = tuple(value.items())
    try:
        return tuple((str(name), item) for name, item in value)
    except (TypeError, ValueError):
        raise ConversionError(
            f"{what} must map head names to values, e.g. {{'boxes': ...}}, got {value!r}"
        ) from None


@dataclass(frozen=True)
class HeadOptions:
    """What the user says about the heads. ``kinds`` and ``labels`` map head names to a kind
    (``logits``, ``probabilities``, ``sigmoid`` or ``regression``) and to channel labels;
    ``names`` names the outputs of a torch forward that returns a tuple (default
    ``output0``, ``output1``, ...; a dict forward is named by its keys)."""

    kinds: Mapping[str, str] | tuple[tuple[str, str], ...] = ()
    labels: Mapping[str, Sequence[str]] | tuple[tuple[str, tuple[str, ...]], ...] = ()
    primary: str | None = None
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        kinds = _pairs(self.kinds, "head kinds")
        for name, kind in kinds:
            if kind not in HEAD_KINDS:
                raise ConversionError(
                    f"head {name!r}: kind must be one of {', '.join(HEAD_KINDS)}, got {kind!r}"
                )
        labels = tuple((name, tuple(str(v) for v in values)) for name, values in
                       _pairs(self.labels, "head labels"))  # fmt: skip
        for what, pairs in (("a kind", kinds), ("labels", labels)):
            names = [name for name, _ in pairs]
            twice = sorted({name for name in names if names.count(name) > 1})
            if twice:
                raise ConversionError(f"head {twice[0]!r} is given {what} twice")
        if isinstance(self.names, str):
            raise ConversionError(f"head names must be a sequence of names, got {self.names!r}")
        names = tuple(str(name) for name in self.names)
        if len(set(names)) != len(names) or "" in names:
            raise ConversionError(f"head names must be unique and non-empty, got {list(names)}")
        object.__setattr__(self, "kinds", kinds)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "names", names)

    def mentioned(self) -> list[tuple[str, str]]:
        """(name, what mentions it) for every head name the options use."""
        found = [(name, f"a kind ({kind})") for name, kind in self.kinds]
        found += [(name, "labels") for name, _ in self.labels]
        if self.primary is not None:
            found.append((self.primary, "the primary head"))
        return found


@dataclass(frozen=True)
class DenseOutput:
    """One output of a dense graph, as the converter reads it."""

    name: str
    final_activation: str | None = None  # 'softmax', 'log_softmax', 'sigmoid' or None

    @property
    def inferred_kind(self) -> str:
        return FINAL_KINDS.get(self.final_activation, "logits")


def final_activation(model: onnx.ModelProto, output: str | None = None) -> str | None:
    """'softmax', 'log_softmax' or 'sigmoid' when that op computes the output named
    ``output`` (default: the first), else None."""
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get(output or model.graph.output[0].name)
    while node is not None and node.op_type in ("Identity", "Transpose", "Dropout"):
        node = producers.get(node.input[0])
    return None if node is None else FINAL_OPS.get(node.op_type)


def dense_outputs(model: onnx.ModelProto) -> list[DenseOutput]:
    """Every output of a dense graph with its final op, in the graph's order."""
    return [
        DenseOutput(name=value.name, final_activation=final_activation(model, value.name))
        for value in model.graph.output
    ]


@dataclass(frozen=True)
class ResolvedHeads:
    """The contract's heads (primary first) and each output's final op."""

    heads: tuple[Head, ...] = field(default_factory=tuple)
    final_activations: Mapping[str, str | None] = field(default_factory=dict)

    @property
    def primary(self) -> Head:
        return self.heads[0]


def resolve_heads(
    outputs: Sequence[DenseOutput], options: HeadOptions | None = None, *, labels=()
) -> ResolvedHeads:
    """The heads of a dense model whose outputs are ``outputs`` (in graph order)."""
    options = options or HeadOptions()
    names = [output.name for output in outputs]
    listing = ", ".join(names)
    for name, what in options.mentioned():
        if name not in names:
            raise ConversionError(
                f"the model has no head {name!r} (given {what}); its heads are: {listing}"
            )
    kinds = dict(options.kinds)
    chosen = dict(options.labels)
    try:
        heads = [
            Head(output.name, kinds.get(output.name, output.inferred_kind),
                 chosen.get(output.name, ()))
            for output in outputs
        ]  # fmt: skip
    except ModelLoadError as exc:  # a name the contract refuses
        raise ConversionError(str(exc)) from None
    primary = _primary(heads, options.primary, listing)
    if labels:
        if primary.labels:
            raise ConversionError(
                f"labels for the primary head {primary.name!r} are given twice (as labels "
                "and as that head's labels): give them once"
            )
        primary = Head(primary.name, primary.kind, tuple(labels))
    others = tuple(head for head in heads if head.name != primary.name)
    finals = {output.name: output.final_activation for output in outputs}
    return ResolvedHeads(heads=(primary, *others), final_activations=finals)


def _primary(heads: list[Head], wanted: str | None, listing: str) -> Head:
    kinds = ", ".join(f"{head.name} ({head.kind})" for head in heads)
    if wanted is not None:
        head = next(head for head in heads if head.name == wanted)
        if not head.classifies:
            raise ConversionError(
                f"the primary head must classify, but {head.name!r} is {head.kind}: pick "
                f"another head ({kinds}) or give it a kind among {', '.join(OUTPUT_KINDS)}"
            )
        return head
    for head in heads:
        if head.classifies:
            return head
    raise ConversionError(
        f"no head classifies ({kinds}): the primary head, which top-k, argmax and "
        f"detections read, needs a kind among {', '.join(OUTPUT_KINDS)}"
    )


def heads_geometry(dense: onnx.ModelProto, *, window: tuple[int, int]) -> Geometry:
    """The geometry of a dense model: every output's must agree (one trunk, one grid)."""
    names = [value.name for value in dense.graph.output]
    geometries = {name: compute_geometry(dense, window=window, output=name) for name in names}
    first = geometries[names[0]]
    for name in names[1:]:
        if geometries[name] != first:
            raise ConversionError(
                f"heads {names[0]!r} and {name!r} have different geometry ({first} and "
                f"{geometries[name]}): every head must read the same trunk output"
            )
    return first


def check_channels(heads: Sequence[Head], channels: Mapping[str, int]) -> None:
    """Each head's labels must match its channel count."""
    for index, head in enumerate(heads):
        count = channels[head.name]
        if not head.labels or len(head.labels) == count:
            continue
        if index == 0:
            raise ConversionError(
                f"{len(head.labels)} labels were given but the model has {count} classes"
                + (f" (head {head.name!r})" if len(heads) > 1 else "")
            )
        raise ConversionError(
            f"{len(head.labels)} labels were given for head {head.name!r}, which has "
            f"{count} channels"
        )
