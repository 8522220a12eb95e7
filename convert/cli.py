"""``densemap convert``: a classifier (reference architecture + weights, or ONNX) -> dense ONNX.

    densemap convert --arch vgg16 --weights vgg16.pth --input-size 224 -o vgg16.onnx
    densemap convert --arch lenet5 --random-weights -o trial.onnx     # untrained, recorded
    densemap convert CLASSIFIER.onnx -o DENSE.onnx [--flatten-order hwc] [--verify]
    densemap convert DETECTOR.onnx -o DENSE.onnx --head boxes=regression [--primary-head scores]
    densemap convert CLASSIFIER.onnx -o DIR/model.onnx --int8-calibration IMAGES_DIR  # + int8

The flags and how they are read live in :mod:`densemap.convert.flags`; this module runs the command.
Light to import: torch is imported inside :func:`run`, and only for ``--arch``.
Every bad input ends in one line on stderr and a non-zero exit; nothing is left at the
output path (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys

from densemap.convert.flags import (
    add_arguments,
    check_arguments,
    parse_size,
    parse_strides,
    read_detection_settings,
    read_head_options,
    read_labels,
    read_preprocessing,
)
from densemap.service.errors import ConversionError, DensemapError

__all__ = ["add_arguments", "run"]  # the subcommand's interface (service/cli.py)

QUIET_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")
TORCH_MISSING = (
    "converting a torch architecture needs torch: pip install 'densemap[convert]' "
    "(ONNX classifiers convert without it)"
)


def _convert_arch(args, labels, preprocessing, strides, heads):
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConversionError(TORCH_MISSING) from None
    from densemap.convert import archs, convert_torch
    from densemap.convert.from_torch.weights import load_weights

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


def head_summary(metadata) -> str:
    """One line naming every head of a converted model, primary first."""
    return "heads: " + ", ".join(_head_text(head) for head in metadata.heads)


def _head_text(head) -> str:
    labels = f", {len(head.labels)} labels" if head.labels else ""
    return f"{head.name} ({head.kind}{labels})"


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
    from densemap.convert import convert_onnx, verify
    from densemap.convert.int8 import agreement_warning
    from densemap.convert.verify import precision_table

    if not getattr(args, "debug", False):  # the exporters' optimiser logs every pass at INFO
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)

    check_arguments(args)
    detection_settings = read_detection_settings(args)
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
    if args.verify:
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
    if detection_settings:
        from densemap.service.engine.model_settings import write_detection_settings

        written = write_detection_settings(result.path.parent, detection_settings)
        print(f"wrote {written}: detections {detection_settings}")
    return 0
