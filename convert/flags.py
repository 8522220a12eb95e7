"""The flags of ``densemap convert``, and how they are read: this module owns them.

:func:`add_arguments` declares every flag (the head flags too: ``--head NAME=KIND`` and
``--head-labels NAME=FILE`` repeat, one per head); the ``read_*``/``parse_*`` functions turn
their values into what the converter takes, and :func:`check_arguments` refuses
combinations that cannot work. A malformed head flag or an unknown kind is an argparse
usage error (exit 2); a head name the model does not have is refused once the model is read,
naming the heads it has (exit 2, see :func:`densemap.convert.heads.resolve_heads`). :mod:`densemap.convert.cli`
runs the command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from densemap.service.engine.options import (
    DEFAULT_DETECTION_THRESHOLD,
    DEFAULT_MAX_DETECTIONS,
    DEFAULT_NMS_IOU,
    DetectionDefaults,
)
from densemap.service.errors import ConversionError, InvalidOption


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "classifier", nargs="?", type=Path, help="a fixed-size ONNX classifier to convert"
    )
    parser.add_argument("--arch", help="a reference architecture (lenet5, alexnet, vgg16, ...)")
    parser.add_argument("--weights", type=Path, help="state_dict (.pth) for --arch (required)")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="convert --arch with untrained random weights instead of --weights (trials, "
        "benchmarks; the metadata records it)",
    )
    parser.add_argument("--num-classes", type=int, help="classes of --arch (default: its own)")
    parser.add_argument(
        "--input-size", help="training window of --arch: 224 or HxW (default: the arch's own)"
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="dense ONNX to write")
    parser.add_argument("--labels", type=Path, help="text file, one class label per line")
    parser.add_argument(
        "--preprocessing",
        metavar="PRESET|FILE.json",
        help="how pixels become the model's input, required for ONNX classifiers: imagenet "
        "(/255, ImageNet mean/std), caffe (BGR 0-255 minus mean), unit (/255), none (raw "
        "0-255) or a JSON file (layout, color, scale, mean, std); --arch: its own",
    )
    parser.add_argument(
        "--strides",
        help="output strides to provide, e.g. 32,16,8 (à-trous variants; default: the native "
        "stride only)",
    )
    parser.add_argument(
        "--flatten-order",
        choices=("auto", "chw", "hwc"),
        default="auto",
        help="flatten order of an ONNX classifier when the graph does not tell",
    )
    _add_head_arguments(parser)
    _add_detection_arguments(parser)
    parser.add_argument(
        "--int8-calibration",
        type=Path,
        metavar="IMAGES_DIR",
        help="also write int8 copies (NAME.int8.onnx, one per à-trous variant too) for "
        "precision 'int8' on CPUs, calibrated on these images (onnxruntime static QDQ); "
        "their deviation from fp32 goes into the metadata (default: none, fp32 only)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check every written net against the classifier's own head on its trunk's "
        "windows (and crops on unpadded nets); exit 1 and remove the files on a failure",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow --weights to be a pickled module (runs code from the file)",
    )


def _add_detection_arguments(parser: argparse.ArgumentParser) -> None:
    found = parser.add_argument_group(
        "detection settings of the model, written to densemap.json beside -o (densemap score "
        'and serve use them for requests that set none; docs/engine.md "Detections")'
    )
    unset = "(default: not written; densemap score then uses {})"
    found.add_argument(
        "--threshold",
        type=float,
        metavar="P",
        help="minimum class probability of a box " + unset.format(DEFAULT_DETECTION_THRESHOLD),
    )
    found.add_argument(
        "--nms-iou",
        type=float,
        metavar="IOU",
        help="drop a box whose IoU with a better one of its class is above this "
        + unset.format(DEFAULT_NMS_IOU),
    )
    found.add_argument(
        "--max-detections",
        type=int,
        metavar="N",
        help="at most N boxes per image " + unset.format(DEFAULT_MAX_DETECTIONS),
    )
    found.add_argument(
        "--across-classes",
        action=argparse.BooleanOptionalAction,
        help="NMS over all classes at once, or per class (--no-across-classes) "
        + unset.format("per class"),
    )


# flag (its argparse dest) -> the DetectionDefaults field it sets
DETECTION_FLAGS = (
    ("threshold", "threshold"),
    ("nms_iou", "iou"),
    ("max_detections", "max_count"),
    ("across_classes", "across_classes"),
)


def read_detection_settings(args) -> dict:
    """The detection settings given (DetectionDefaults keys), each checked by
    DetectionDefaults as a load checks densemap.json; ConversionError naming the flag, before
    anything is converted."""
    settings: dict = {}
    for flag, key in DETECTION_FLAGS:
        value = getattr(args, flag)
        if value is None:
            continue
        try:
            DetectionDefaults(**{key: value})
        except InvalidOption as exc:
            raise ConversionError(f"--{flag.replace('_', '-')}: {exc}") from None
        settings[key] = value
    return settings


def _add_head_arguments(parser: argparse.ArgumentParser) -> None:
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
    from densemap.service.contract import HEAD_KINDS

    name, kind = _name_value(text, "KIND")
    if kind not in HEAD_KINDS:
        raise argparse.ArgumentTypeError(
            f"kind of head {name!r} must be one of {', '.join(HEAD_KINDS)}, got {kind!r}"
        )
    return name, kind


def _head_file(text: str) -> tuple[str, Path]:
    name, path = _name_value(text, "FILE")
    return name, Path(path)


def parse_size(text: str, name: str) -> tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ConversionError(f"{name} must be N or HxW, got {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise ConversionError(f"{name} must be N or HxW with positive numbers, got {text!r}")
    return (values[0], values[1])


def parse_strides(text: str | None) -> list[tuple[int, int]]:
    if not text:
        return []
    return [parse_size(part, "--strides") for part in text.split(",") if part.strip()]


def read_labels(path: Path | None, flag: str = "--labels ") -> tuple[str, ...]:
    if path is None:
        return ()
    from densemap.service.contract import parse_labels

    try:
        labels = parse_labels(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConversionError(f"cannot read {flag}{path}: {exc}") from None
    if not labels:
        raise ConversionError(f"{flag}{path} is empty: give one label per line")
    return labels


def read_preprocessing(value: str | None):
    """A preset name as it is (the model's layout adapts it), a JSON file read now."""
    from densemap.convert.preprocessing import PRESETS, read_file

    if value is None or value in PRESETS:
        return value
    return read_file(Path(value))


def check_arguments(args) -> None:
    if args.classifier is None and args.arch is None:
        raise ConversionError(
            "nothing to convert: give an ONNX classifier file (densemap convert model.onnx "
            "-o dense.onnx) or a torch architecture (--arch NAME --weights FILE.pth)"
        )
    if args.classifier is not None and args.arch is not None:
        raise ConversionError(
            f"give an ONNX classifier file ({args.classifier}) or --arch {args.arch}, not both"
        )
    if args.arch is None:
        extra = [
            flag
            for flag, value in (
                ("--weights", args.weights),
                ("--num-classes", args.num_classes),
                ("--input-size", args.input_size),
                ("--trust-pickle", args.trust_pickle),
                ("--random-weights", args.random_weights),
            )
            if value
        ]
        if extra:
            raise ConversionError(f"{', '.join(extra)} only apply with --arch")
    elif args.flatten_order != "auto":
        raise ConversionError("--flatten-order only applies to ONNX classifiers")
    elif args.weights is None and not args.random_weights:
        raise ConversionError(
            f"--arch {args.arch} needs its trained weights: --weights FILE.pth (a state_dict). "
            "To convert untrained random weights on purpose (a trial, a benchmark), pass "
            "--random-weights: the metadata records it"
        )
    elif args.weights is not None and args.random_weights:
        raise ConversionError("give --weights or --random-weights, not both")
    if args.classifier is not None and args.preprocessing is None:
        from densemap.convert.preprocessing import MISSING

        raise ConversionError(MISSING)
    if args.classifier is not None and args.classifier.resolve() == args.output.resolve():
        raise ConversionError("-o must differ from the classifier file, which it would replace")


def read_head_options(args):
    """The --head, --head-labels and --primary-head flags as HeadOptions."""
    from densemap.convert.heads import HeadOptions

    labels = [
        (name, read_labels(path, f"--head-labels {name}=")) for name, path in args.head_labels
    ]
    return HeadOptions(kinds=args.head_kinds, labels=labels, primary=args.primary_head)
