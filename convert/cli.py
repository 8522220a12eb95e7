"""``densemap convert``: a classifier (reference architecture + weights, or ONNX) -> dense ONNX.

    densemap convert --arch vgg16 --weights vgg16.pth --input-size 224 -o vgg16.onnx
    densemap convert --arch lenet5 --random-weights -o trial.onnx     # untrained, recorded
    densemap convert CLASSIFIER.onnx -o DENSE.onnx [--flatten-order hwc] [--verify]
    densemap convert DETECTOR.onnx -o DENSE.onnx --head boxes=regression [--primary-head scores]
    densemap convert CLASSIFIER.onnx -o DIR/model.onnx --int8-calibration IMAGES_DIR  # + int8

Light to import: torch is imported inside :func:`run`, and only for ``--arch``.
Every bad input ends in one line on stderr and a non-zero exit; nothing is left at the
output path (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from convert.head_cli import add_head_arguments, head_summary, read_head_options
from service.errors import ConversionError, DensemapError

QUIET_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")
TORCH_MISSING = (
    "converting a torch architecture needs torch: pip install 'densemap[convert]' "
    "(ONNX classifiers convert without it)"
)


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
    add_head_arguments(parser)
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
    from service.contract import parse_labels

    try:
        labels = parse_labels(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConversionError(f"cannot read {flag}{path}: {exc}") from None
    if not labels:
        raise ConversionError(f"{flag}{path} is empty: give one label per line")
    return labels


def read_preprocessing(value: str | None):
    """A preset name as it is (the model's layout adapts it), a JSON file read now."""
    from convert.preprocessing import PRESETS, read_file

    if value is None or value in PRESETS:
        return value
    return read_file(Path(value))


def _check_arguments(args) -> None:
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
        from convert.preprocessing import MISSING

        raise ConversionError(MISSING)
    if args.classifier is not None and args.classifier.resolve() == args.output.resolve():
        raise ConversionError("-o must differ from the classifier file, which it would replace")


def _convert_arch(args, labels, preprocessing, strides, heads):
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConversionError(TORCH_MISSING) from None
    from convert import archs, convert_torch
    from convert.from_torch.weights import load_weights

    spec = archs.get_spec(args.arch)
    size = parse_size(args.input_size, "--input-size") if args.input_size else spec.input_size
    model = archs.build(args.arch, num_classes=args.num_classes, input_size=size)
    source = f"{spec.name}:random-weights"
    if args.weights is not None:
        model = load_weights(model, args.weights, trust_pickle=args.trust_pickle) or model
        source = f"{spec.name}:{args.weights.name}"
    model.eval()
    result = convert_torch(
        model,
        args.output,
        input_size=size,
        labels=labels,
        preprocessing=preprocessing or spec.preprocessing,
        strides=strides,
        source=source,
        heads=heads,
        random_weights=args.random_weights,
        int8_calibration=args.int8_calibration,
    )
    return result, model


def _summary(result) -> str:
    g = result.metadata.geometry
    lines = [
        f"wrote {result.path}: window {g.window[0]}x{g.window[1]}, stride "
        f"{g.stride[0]}x{g.stride[1]}, receptive field {g.receptive_field[0]}x"
        f"{g.receptive_field[1]} at offset {g.receptive_field_offset}, "
        f"{'padded' if g.padded else 'unpadded'}, {result.metadata.output_kind}"
        + _final_note(getattr(result, "final_activation", None))
    ]
    if result.metadata.extra_heads:
        lines.append(head_summary(result.metadata))
    lines += [
        f"wrote {path} (stride {v.stride[0]}x{v.stride[1]})"
        for path, v in zip(result.variant_paths, result.metadata.variants, strict=True)
    ]
    return "\n".join(lines + _int8_summary(result))


def _final_note(activation: str | None) -> str:
    """Final ops the contract's output kind does not name (it knows logits, probabilities)."""
    if activation == "log_softmax":
        return " (log-probabilities: a softmax of them gives the probabilities)"
    if activation == "sigmoid":
        return " (the classifier ends in a Sigmoid: its scores are per-class sigmoids)"
    return ""


def _int8_summary(result) -> list[str]:
    copies = result.metadata.int8
    if copies is None:
        return []
    names = ", ".join(str(path) for path in result.int8_paths)
    return [
        f"wrote {names} (int8, calibrated on {copies.images} images: argmax agreement with "
        f"fp32 {copies.argmax_agreement:.2%} of {copies.cells} cells, max|dp| "
        f"{copies.max_probability_deviation:.2e}, max|dz|/range {copies.max_logit_deviation:.2e})"
    ]


def _remove_outputs(result) -> None:
    for path in (result.path, *result.variant_paths, *result.int8_paths):
        path.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except DensemapError:
        raise
    except Exception as exc:  # one clear line instead of a traceback, unless --debug
        if getattr(args, "debug", False):
            raise
        raise ConversionError(
            f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)"
        ) from None


def _run(args: argparse.Namespace) -> int:
    from convert import convert_onnx, verify
    from convert.int8 import agreement_warning
    from convert.verify import precision_table

    if not getattr(args, "debug", False):  # the exporters' optimiser logs every pass at INFO
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)

    _check_arguments(args)
    labels = read_labels(args.labels)
    preprocessing = read_preprocessing(args.preprocessing)
    strides = parse_strides(args.strides)
    heads = read_head_options(args)
    if args.arch is not None:
        result, classifier = _convert_arch(args, labels, preprocessing, strides, heads)
    else:
        classifier = args.classifier
        result = convert_onnx(
            classifier,
            args.output,
            flatten_order=args.flatten_order,
            labels=labels,
            preprocessing=preprocessing,
            strides=strides,
            heads=heads,
            int8_calibration=args.int8_calibration,
        )
    print(_summary(result))
    warning = agreement_warning(result.metadata.int8) if result.metadata.int8 else None
    if warning:
        print(f"densemap convert: warning: {warning}", file=sys.stderr)
    if result.metadata.random_weights:
        print(
            f"densemap convert: warning: {result.path} has random, untrained weights "
            "(--random-weights): its scores mean nothing; its metadata says random_weights",
            file=sys.stderr,
        )
    if not args.verify:
        return 0
    try:
        report = verify(classifier, result.path)
    except BaseException:
        _remove_outputs(result)
        raise
    print(report.table())
    if not report.passed:
        _remove_outputs(result)
        print(f"densemap convert: verification failed, removed {result.path}")
        return 1
    print(precision_table(result.path))
    return 0
