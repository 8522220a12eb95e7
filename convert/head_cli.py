"""The head flags of ``densemap convert``: kinds, labels and the primary head.

    densemap convert DETECTOR.onnx -o dense.onnx --head boxes=regression \\
        --head-labels scores=labels.txt --primary-head scores

``--head NAME=KIND`` and ``--head-labels NAME=FILE`` repeat, one per head. A malformed
flag or an unknown kind is an argparse usage error (exit 2); a head name the model does not
have is refused once the model is read, naming the heads it has (exit 2, see
:func:`convert.heads.resolve_heads`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_head_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--head",
        dest="head_kinds",
        action="append",
        type=_head_kind,
        default=[],
        metavar="NAME=KIND",
        help="kind of one output of the classifier: logits, probabilities, sigmoid or "
        "regression (box/landmark values); repeatable (default: from its final op)",
    )
    parser.add_argument(
        "--head-labels",
        action="append",
        type=_head_file,
        default=[],
        metavar="NAME=FILE",
        help="channel labels of one output, one per line; repeatable (default: none)",
    )
    parser.add_argument(
        "--primary-head",
        metavar="NAME",
        help="the head that top-k, argmax and detections read (default: the first that classifies)",
    )


def _name_value(text: str, value: str) -> tuple[str, str]:
    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise argparse.ArgumentTypeError(f"expected NAME={value} (e.g. boxes=...), got {text!r}")
    return name.strip(), rest.strip()


def _head_kind(text: str) -> tuple[str, str]:
    """``--head NAME=KIND``: argparse reports a bad one as a usage error (exit 2)."""
    from service.contract import HEAD_KINDS

    name, kind = _name_value(text, "KIND")
    if kind not in HEAD_KINDS:
        raise argparse.ArgumentTypeError(
            f"kind of head {name!r} must be one of {', '.join(HEAD_KINDS)}, got {kind!r}"
        )
    return name, kind


def _head_file(text: str) -> tuple[str, Path]:
    name, path = _name_value(text, "FILE")
    return name, Path(path)


def read_head_options(args):
    """The --head, --head-labels and --primary-head flags as HeadOptions."""
    from convert.cli import read_labels
    from convert.heads import HeadOptions

    labels = [
        (name, read_labels(path, f"--head-labels {name}=")) for name, path in args.head_labels
    ]
    return HeadOptions(kinds=args.head_kinds, labels=labels, primary=args.primary_head)


def head_summary(metadata) -> str:
    """One line naming every head of a converted model, primary first."""
    return "heads: " + ", ".join(_head_text(head) for head in metadata.heads)


def _head_text(head) -> str:
    labels = f", {len(head.labels)} labels" if head.labels else ""
    return f"{head.name} ({head.kind}{labels})"
