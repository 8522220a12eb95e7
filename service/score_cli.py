"""``densemap score PATH... --out DIR``: score image files and folders into maps and heat-maps.

Light to import: the engine, the gRPC client and ray load only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from densemap.service.batch.storage import MAP_DTYPES, SAVE_MODES
from densemap.service.engine.options import (
    AVAILABLE_PRECISIONS,
    DEFAULT_DETECTION_THRESHOLD,
    DEFAULT_MAX_DETECTIONS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_NMS_IOU,
)
from densemap.service.engine.repository import MODELS_HELP
from densemap.service.errors import InvalidOption
from densemap.service.plain_numbers import parse_decimal, parse_integer

_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_RAY_ADDRESS = re.compile(r"auto|local|[a-z][a-z0-9+]*://\S+|[\w.\-]+:\d+")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", metavar="PATH", help="image files and folders")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--glob",
        action="append",
        default=[],
        metavar="PAT",
        help="only files whose path (relative to the folder) matches, e.g. '*.png' (repeatable)",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--models", metavar="DIR", help=MODELS_HELP)
    model.add_argument("--model", default=None, metavar="NAME", help="model name (default: digits)")
    model.add_argument("--server", metavar="HOST:PORT", help="score through a 'densemap serve'")
    model.add_argument(
        "--token",
        metavar="TOKEN",
        help="--server: the server's bearer token (default: $DENSEMAP_AUTH_TOKEN; prefer the "
        "variable, command lines are visible to other users)",
    )
    model.add_argument("--tls", action="store_true", help="--server: connect with TLS")
    model.add_argument(
        "--ca-cert",
        metavar="PEM",
        help="--server: the CA certificate that signed the server's (implies --tls; default: "
        "the system's roots)",
    )
    opts = parser.add_argument_group("scoring options (as the engine's)")
    opts.add_argument(
        "--output-stride",
        type=int,
        metavar="N",
        help="output stride S/k (default: the model's stride S)",
    )
    opts.add_argument("--scales", default="1", metavar="LIST", help="image scales, e.g. 1,1.5")
    opts.add_argument("--logits", action="store_true", help="raw logits instead of probabilities")
    opts.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="map dtype")
    opts.add_argument(
        "--top-k", type=int, default=0, metavar="K", help="per-cell top-k classes; 0: off"
    )
    opts.add_argument(
        "--precision",
        choices=AVAILABLE_PRECISIONS,
        default=None,
        help="fp32 (exact), tf32 or fp16 (faster on GPUs), int8 (faster on CPUs; models "
        "converted with --int8-calibration); default: the model's own, fp32",
    )
    opts.add_argument(
        "--heads",
        metavar="LIST",
        help="models with several heads: the extra heads to store, e.g. boxes,landmarks, or "
        "'none' (default: all of them; the class map is always kept)",
    )
    opts.add_argument(
        "--max-pixels",
        type=int,
        metavar="N",
        help=f"refuse images with more pixels, read from the header (default "
        f"{DEFAULT_MAX_PIXELS}; with --server the server's own --max-pixels applies)",
    )
    opts.add_argument(
        "--memory-budget",
        metavar="SIZE",
        help="memory one request may use (its maps and copies, plus one pass's activations, "
        "which are tiled to fit): bytes, or 512M, 2G (default: 1G)",
    )
    found = parser.add_argument_group("detections (docs/score.md)")
    found.add_argument(
        "--detections",
        action="store_true",
        help="also find boxes: detections.jsonl (a line per image) and detections.coco.json",
    )
    found.add_argument(
        "--threshold",
        type=float,
        metavar="P",
        help="minimum class probability of a box (default: the model's densemap.json, else "
        f"{DEFAULT_DETECTION_THRESHOLD})",
    )
    found.add_argument(
        "--nms-iou",
        type=float,
        metavar="IOU",
        help="drop a box whose IoU with a better one of its class is above this (default: "
        f"the model's densemap.json, else {DEFAULT_NMS_IOU})",
    )
    found.add_argument(
        "--max-detections",
        type=int,
        metavar="N",
        help="at most N boxes per image (default: the model's densemap.json, else "
        f"{DEFAULT_MAX_DETECTIONS})",
    )
    found.add_argument(
        "--detection-classes",
        metavar="LIST",
        help="class indices to detect, e.g. 1,3 (default: all but 'background')",
    )
    found.add_argument(
        "--across-classes",
        action=argparse.BooleanOptionalAction,
        help="NMS over all classes at once, or per class (--no-across-classes) (default: the "
        "model's densemap.json, else per class)",
    )
    out = parser.add_argument_group("outputs (docs/score.md)")
    out.add_argument(
        "--save",
        choices=SAVE_MODES,
        default="maps",
        help="what each image's .npz keeps: the maps, only the per-cell top-k (needs "
        "--top-k), the per-cell best class and its score, or no .npz (boxes in "
        "detections.jsonl with --detections; none: summary only)",
    )
    out.add_argument(
        "--map-dtype",
        choices=tuple(MAP_DTYPES),
        default="fp16",
        help="stored score dtype: fp16 (the engine's values rounded to float16) or fp32 "
        "(as the engine computed them)",
    )
    out.add_argument(
        "--no-compress", action="store_true", help="store the .npz uncompressed (faster, larger)"
    )
    out.add_argument("--heatmap", action="store_true", help="also write a PNG overlay per image")
    out.add_argument(
        "--heatmap-class",
        metavar="NAME",
        help="draw this class (label, or index 0..C-1, also on models without labels) "
        "[implies --heatmap]",
    )
    out.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist")
    run = parser.add_argument_group("execution")
    run.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="decode/write threads (default: min(4, CPUs)); with --ray, actors "
        "(default: one per node, or per GPU with --gpus)",
    )
    run.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on Ray Data; ADDRESS: 'auto', 'local' or the cluster's GCS HOST:PORT "
        "(Ray Client ray:// is refused: Ray Data cannot run under it) "
        "(default without ADDRESS: $RAY_ADDRESS, else a local cluster)",
    )
    run.add_argument("--gpus", action="store_true", help="Ray: one GPU per actor")


def parse_bytes(text: str, flag: str = "--memory-budget") -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise InvalidOption(f"{flag} {text!r} is not a size: use bytes, or 512M, 2G")
    value = int(float(match.group(1)) * _SIZE_SUFFIXES[match.group(2).upper()])
    if value <= 0:
        raise InvalidOption(f"{flag} must be positive")
    return value


def parse_scales(text: str) -> tuple[float, ...]:
    """``--scales 1,1.5``; ScoreOptions checks the values."""
    try:
        return tuple(parse_decimal(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidOption(f"--scales {text!r} must be numbers separated by commas") from None


def parse_heads(text: str | None) -> tuple[str, ...] | None:
    """``--heads``: None (all), ``none`` -> (), else the comma-separated names."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise InvalidOption(f"--heads {text!r}: give head names separated by commas, or none")
    return names


def split_ray_address(ray: str | None, paths: list[str]) -> tuple[str | None, list[str]]:
    """``--ray PATH`` (no address given, a path after it) puts PATH back among the inputs."""
    if ray is None or ray == "":
        return ray, paths
    if _RAY_ADDRESS.fullmatch(ray) and not os.path.exists(ray):
        return ray, paths
    return "", [ray, *paths]


def detection_options(args: argparse.Namespace):
    """DetectionOptions of ``--detections`` (None without it); its settings need it."""
    from densemap.service.engine.options import DetectionOptions

    names = ("threshold", "nms_iou", "max_detections", "detection_classes", "across_classes")
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) is not None]
    if not getattr(args, "detections", False):
        if given:
            raise InvalidOption(f"{', '.join(given)} apply to --detections: add --detections")
        return None
    values: dict = {}  # DetectionOptions checks the values
    for name, field in (("threshold", "threshold"), ("nms_iou", "iou")):
        if getattr(args, name) is not None:
            values[field] = getattr(args, name)
    if args.max_detections is not None:
        values["max_count"] = args.max_detections
    if args.detection_classes is not None:
        try:
            values["classes"] = tuple(
                parse_integer(v) for v in args.detection_classes.split(",") if v.strip()
            )
        except ValueError:
            raise InvalidOption(
                f"--detection-classes {args.detection_classes!r} must be class indices "
                "separated by commas, e.g. 1,3"
            ) from None
    if args.across_classes is not None:  # unset: the model's own setting
        values["across_classes"] = args.across_classes
    return DetectionOptions(**values)


RAY_CLIENT_REFUSED = (
    "{address}: Ray Client (ray://) cannot run Ray Data pipelines; give the cluster's GCS "
    "address instead, --ray HOST:PORT (port 6379 unless `ray start --head --port` says "
    "otherwise), from a machine that reaches every node, or run the command on the "
    "cluster: ray job submit --address http://HEAD:8265 -- densemap score ... --ray"
)


def refuse_ray_client(address: str | None) -> None:
    """Ray Data needs a full driver: under Ray Client it fails deep inside Ray."""
    named = f"--ray {address}" if address else f"RAY_ADDRESS={os.environ.get('RAY_ADDRESS')}"
    if (address or os.environ.get("RAY_ADDRESS", "")).lower().startswith("ray://"):
        raise InvalidOption(RAY_CLIENT_REFUSED.format(address=named))


def build_request(args: argparse.Namespace):
    from densemap.service.batch.run import BatchRequest, RayConfig
    from densemap.service.batch.scorers import DEFAULT_MODEL, ModelChoice
    from densemap.service.batch.server_target import server_target
    from densemap.service.batch.storage import Storage
    from densemap.service.engine.options import EngineConfig, ScoreOptions

    ray_address, paths = split_ray_address(args.ray, list(args.paths))
    if not paths:
        raise InvalidOption("give at least one image file or folder to score")
    if args.server and (args.models or args.memory_budget or args.max_pixels is not None):
        raise InvalidOption(
            "--models, --memory-budget and --max-pixels apply to in-process scoring, not "
            "--server (the server's own limits apply: densemap serve --max-pixels, "
            "--memory-budget)"
        )
    remote = [flag for flag in ("token", "tls", "ca_cert") if getattr(args, flag, None)]
    if remote and not args.server:
        flags = ", ".join("--" + flag.replace("_", "-") for flag in remote)
        verb = "applies" if len(remote) == 1 else "apply"
        raise InvalidOption(f"{flags} {verb} to --server HOST:PORT: add --server")
    if args.server and args.ray is not None:
        raise InvalidOption(
            "--server and --ray are exclusive: Ray actors load the model themselves"
        )
    if args.ray is not None:
        refuse_ray_client(ray_address)
    if args.gpus and args.ray is None:
        raise InvalidOption("--gpus applies to --ray; in-process scoring uses CUDA when present")
    # Idle onnxruntime threads yield their cores to the decode/write threads (spinning ones
    # burnt more CPU per image than the bare engine: docs/score.md).
    engine = EngineConfig(
        spin_wait=False,
        memory_budget=parse_bytes(args.memory_budget) if args.memory_budget else None,
        max_pixels=DEFAULT_MAX_PIXELS if args.max_pixels is None else args.max_pixels,
    )
    options = ScoreOptions(
        output_stride=args.output_stride,
        scales=parse_scales(args.scales),
        probabilities=not args.logits,
        dtype="float16" if args.dtype == "fp16" else "float32",
        top_k=args.top_k,
        precision=args.precision,
        detections=detection_options(args),
        heads=parse_heads(args.heads),
    )
    ray = None
    if args.ray is not None:
        ray = RayConfig(address=ray_address or None, actors=args.workers, gpus=args.gpus)
    return BatchRequest(
        paths=tuple(paths),
        out_dir=args.out,
        options=options,
        model=ModelChoice(model=args.model or DEFAULT_MODEL, models_dir=args.models, engine=engine),
        globs=tuple(args.glob),
        server=server_target(args.server, token=args.token, tls=args.tls, ca_cert=args.ca_cert)
        if args.server
        else None,
        heatmap=bool(args.heatmap or args.heatmap_class),
        heatmap_class=args.heatmap_class,
        storage=Storage(save=args.save, map_dtype=args.map_dtype, compress=not args.no_compress),
        overwrite=args.overwrite,
        workers=min(4, os.cpu_count() or 1) if args.workers is None else args.workers,
        ray=ray,
        debug=bool(getattr(args, "debug", False)),
    )


def run(args: argparse.Namespace) -> int:
    from densemap.service.batch.progress import printable
    from densemap.service.batch.run import run_batch

    request = build_request(args)
    outcome = run_batch(request)
    if outcome.failed:
        print(
            f"densemap score: {outcome.failed} image(s) failed (listed above, and with "
            f"status 'failed' in {printable(os.path.join(outcome.out_dir, 'summary.jsonl'))})",
            file=sys.stderr,
            flush=True,
        )
    print(outcome.progress.final_line(outcome.out_dir), flush=True)
    return 1 if outcome.failed else 0
