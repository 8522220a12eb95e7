"""Typed configuration of the engine and per-request scoring options."""

from __future__ import annotations

from dataclasses import dataclass

from densemap.service.engine.field_checks import (
    check_box_offsets,
    check_choice,
    check_flag,
    check_indices,
    check_int,
    check_items,
    check_names,
    check_number,
    check_pairs,
    check_precision,
    check_scales,
)
from densemap.service.errors import InvalidOption

DEFAULT_MAX_PIXELS = 256 * 1024 * 1024  # 16384 x 16384: refuse bigger images before decoding
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes one request may use on CPU: maps, copies and a pass
DEFAULT_INTRA_OP_THREADS = 0  # 0 lets onnxruntime choose (one per physical core)
DEFAULT_IMAGE_TOP_K = 5
# A request whose largest pass, or whose whole cost (maps, copies and a pass), needed more
# memory than this gives the CPU arena's free memory and glibc's free heap pages back when it
# ends (host_memory.py); smaller ones leave them for the next request (faster passes).
DEFAULT_ARENA_KEEP_BYTES = 256 * 1024 * 1024
# int8 needs the model's int8 copies (densemap convert --int8-calibration; precision.py)
AVAILABLE_PRECISIONS = ("fp32", "tf32", "fp16", "int8")
DEFAULT_PRECISION = "fp32"  # exact; "tf32", "fp16" and "int8" trade exactness for speed
DEFAULT_CUDA_REPORT_PRECISIONS = ("fp16",)
DEVICES = ("auto", "cpu", "cuda")
CONV_SEARCHES = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")  # cuDNN convolution algorithm search
MAX_WARMUP_SHAPES = 16
MAP_DTYPES = ("float32", "float16")  # ScoreOptions.dtype
MAP_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16"}  # the server's and CLI's spellings
# A conv is rewritten when its weights have at least this many elements and its kernel is
# bigger than 1x1. The heads of FC classifiers converted to convs are far above it (VGG-16's
# FC6: 7x7x512x4096 = 103 M, AlexNet's: 6x6x256x4096 = 38 M) and no trunk conv of a common
# classifier comes near it (VGG's widest 3x3x512x512 is 2.4 M; AlexNet's 11x11 first conv
# 35 k, which must stay a conv: unfolding a full-resolution image 121-fold would cost far
# more memory than any workspace). 1x1 convs are GEMMs already.
DEFAULT_FC_HEAD_UNFOLD_MIN_WEIGHTS = 1 << 24
FC_HEAD_UNFOLD_MODES = ("cuda", "always", "never")  # see service/engine/fc_head_unfold.py
DEFAULT_FC_HEAD_UNFOLD = "cuda"
# Which runtime runs a model's dense net (docs/engine.md "Runtimes"): onnxruntime, or torch
# (cuDNN with per-shape algorithm search, channels-last fp16; needs torch installed)
RUNTIMES = ("ort", "torch")
DEFAULT_RUNTIME = "ort"
# runtimes other than onnxruntime live outside service/ (which never imports torch) and are
# imported by name, only when a model asks for them; each has open_net(path, config)
RUNTIME_MODULES = {"torch": "densemap.convert.torch_runtime"}
# Detections (service/engine/detections.py, docs/engine.md "Detections")
DEFAULT_DETECTION_THRESHOLD = 0.5  # a cell whose class probability is >= this is a candidate
DEFAULT_NMS_IOU = 0.5  # suppress a box whose IoU with a better box of its class is > this
DEFAULT_MAX_DETECTIONS = 100  # per image, all classes and scales together
MAX_DETECTIONS = 10_000
BACKGROUND_LABEL = "background"  # left out of the default detection classes
# (dx1, dy1, dx2, dy2) added to a cell's window (x0, y0, x1, y1), in units of the window's
# width (dx) and height (dy): (0, 0, 0, 0) reports the window itself
DEFAULT_BOX_OFFSETS = (0.0, 0.0, 0.0, 0.0)
# How errors name a limit: by the flags an operator sets, then the Python field.
PIXEL_LIMIT_SETTING = (
    "the pixel limit (densemap serve --max-pixels or DENSEMAP_MAX_PIXELS, densemap score "
    "--max-pixels, EngineConfig.max_pixels)"
)
MEMORY_BUDGET_SETTING = (
    "the memory budget (--memory-budget of densemap serve and score, DENSEMAP_MEMORY_BUDGET, "
    "EngineConfig.memory_budget)"
)
TILING_SETTING = "turn tiling on (drop densemap serve --no-tiling; EngineConfig.tiling)"


def _set(instance, name: str, value) -> None:
    """Store the canonical form of a checked field of a frozen dataclass."""
    object.__setattr__(instance, name, value)


def _check_detection_settings(instance, *, unset_allowed: bool) -> None:
    """Check and store the canonical ``threshold``, ``iou``, ``max_count`` and
    ``across_classes`` of DetectionDefaults or DetectionOptions; None (a request's "the
    model's") is left as it is where ``unset_allowed``."""
    if not unset_allowed:
        for name in ("threshold", "iou", "max_count", "across_classes"):
            if getattr(instance, name) is None:
                raise InvalidOption(f"detections.{name} must be given, got None")
    for name in ("threshold", "iou"):
        if getattr(instance, name) is not None:
            value = check_number(f"detections.{name}", getattr(instance, name), 0.0, 1.0)
            _set(instance, name, value)
    if instance.max_count is not None:
        count = check_int(
            "detections.max_count", instance.max_count, minimum=1, maximum=MAX_DETECTIONS
        )
        _set(instance, "max_count", count)
    if instance.across_classes is not None:
        flag = check_flag("detections.across_classes", instance.across_classes)
        _set(instance, "across_classes", flag)


@dataclass(frozen=True)
class DetectionDefaults:
    """A model's detection settings, for the fields a request's :class:`DetectionOptions`
    leaves unset (None): its ``densemap.json`` ``"detections"`` (model_settings.py), else
    these defaults. The digits model's, for example, suppress across classes at IoU 0.3."""

    threshold: float = DEFAULT_DETECTION_THRESHOLD
    iou: float = DEFAULT_NMS_IOU
    max_count: int = DEFAULT_MAX_DETECTIONS
    across_classes: bool = False

    def __post_init__(self) -> None:
        """Check every field (InvalidOption naming it, as densemap.json spells it)."""
        _check_detection_settings(self, unset_allowed=False)


@dataclass(frozen=True)
class EngineConfig:
    """How an :class:`~densemap.service.engine.Engine` loads and runs its model."""

    device: str = "auto"  # "auto" (CUDA when it really loads, else CPU), "cpu" or "cuda"
    intra_op_threads: int = DEFAULT_INTRA_OP_THREADS
    max_pixels: int = DEFAULT_MAX_PIXELS
    # bytes one request may use: its maps and copies plus one pass's activations, tiled to
    # fit (service/engine/pass_budget.py); None: 1 GiB on CPU, half the free GPU memory on
    # CUDA (service/engine/device_memory.py)
    memory_budget: int | None = None
    tiling: bool = True  # False: an image over the budget is refused (ImageTooLarge)
    warmup: bool = True
    spin_wait: bool = True  # False: idle onnxruntime threads yield their core (batch decoding)
    # for requests that do not choose one. "tf32": TF32 convolutions on Ampere+ GPUs, faster,
    # but maps then differ from the CPU's (docs/engine.md "Precision"), so exact fp32 is the
    # default.
    precision: str = DEFAULT_PRECISION
    # measured against fp32 at load (with warm-up), reported by GetModel; None: fp16 on
    # CUDA, none on CPU (where fp16 is rarely worth its load time)
    report_precisions: tuple[str, ...] | None = None
    # image shapes (height, width) scored once at load, so their first request is not slow
    warmup_shapes: tuple[tuple[int, int], ...] = ()
    arena_keep_bytes: int = DEFAULT_ARENA_KEEP_BYTES
    # cuDNN convolution algorithm search: HEURISTIC, the default, is cheap on a new shape;
    # EXHAUSTIVE is faster once a shape has been seen but slow on its first request (list
    # warm-up shapes in densemap.json if you choose it; docs/engine.md "Per-shape stalls"
    # has the figures); "DEFAULT": one fixed algorithm, no search.
    cuda_conv_search: str = "HEURISTIC"
    # the object box of a cell relative to its window, for detections that do not set one
    # (a model's densemap.json "box_offsets"); see DetectionOptions.box_offsets
    box_offsets: tuple[float, float, float, float] = DEFAULT_BOX_OFFSETS
    # the detection settings of requests that do not set their own (densemap.json "detections")
    detections: DetectionDefaults = DetectionDefaults()
    # huge-kernel convs (a classifier's FC6 as a 7x7 conv) as unfold + MatMul: "cuda"
    # (CUDA sessions: no cuDNN workspace), "always" or "never" (service/engine/fc_head_unfold.py)
    fc_head_unfold: str = DEFAULT_FC_HEAD_UNFOLD
    fc_head_unfold_min_weights: int = DEFAULT_FC_HEAD_UNFOLD_MIN_WEIGHTS
    runtime: str = DEFAULT_RUNTIME  # "ort" (onnxruntime) or "torch" (convert/torch_runtime/)

    def __post_init__(self) -> None:
        """Check every field (InvalidOption naming it); what needs the model (int8 copies)
        is checked when an engine loads it."""
        check_choice("EngineConfig.device", self.device, DEVICES)
        counts = {  # field: its minimum
            "intra_op_threads": 0,  # 0: onnxruntime chooses
            "max_pixels": 1,
            "arena_keep_bytes": 0,
            "fc_head_unfold_min_weights": 1,
        }
        if self.memory_budget is not None:  # None: chosen for the device (device_memory.py)
            counts["memory_budget"] = 1
        for name, minimum in counts.items():
            _set(
                self, name, check_int(f"EngineConfig.{name}", getattr(self, name), minimum=minimum)
            )
        for name in ("tiling", "warmup", "spin_wait"):
            _set(self, name, check_flag(f"EngineConfig.{name}", getattr(self, name)))
        _set(self, "precision", check_precision(self.precision, "EngineConfig.precision"))
        if self.report_precisions is not None:
            name = "EngineConfig.report_precisions"
            chosen = check_items(name, self.report_precisions, "precision names")
            _set(self, "report_precisions", tuple(check_precision(p, name) for p in chosen))
        shapes = check_pairs(
            "EngineConfig.warmup_shapes", self.warmup_shapes, limit=MAX_WARMUP_SHAPES
        )
        _set(self, "warmup_shapes", shapes)
        check_choice("EngineConfig.cuda_conv_search", self.cuda_conv_search, CONV_SEARCHES)
        _set(self, "box_offsets", check_box_offsets("EngineConfig.box_offsets", self.box_offsets))
        if not isinstance(self.detections, DetectionDefaults):  # checked when it was built
            raise InvalidOption(
                f"EngineConfig.detections must be a DetectionDefaults, got {self.detections!r}"
            )
        check_choice("EngineConfig.fc_head_unfold", self.fc_head_unfold, FC_HEAD_UNFOLD_MODES)
        check_choice("EngineConfig.runtime", self.runtime, RUNTIMES)


@dataclass(frozen=True)
class DetectionOptions:
    """Turn the maps into boxes: threshold, then non-maximum suppression per class.

    - ``classes``: class indices to report; None = every class but one labelled
      ``background``.
    - ``threshold``: a cell is a candidate of class c when its probability of c is >= this.
    - ``iou``: greedy NMS per class over all scales together drops a box whose IoU with a
      better-scoring box of its class is > this (1.0 keeps every candidate).
    - ``max_count``: at most this many detections per image, best first.
    - ``across_classes``: NMS over all classes at once (a box then also suppresses
      overlapping boxes of other classes, e.g. a look-alike class at an object's fringe).
    - ``box_offsets``: (dx1, dy1, dx2, dy2): the box of cell (i, j) is its window
      (x0, y0, x1, y1) in original-image pixels plus (dx1 * w, dy1 * h, dx2 * w, dy2 * h),
      w and h being the window's size there; None uses the model's (EngineConfig).

    ``threshold``, ``iou``, ``max_count`` and ``across_classes`` left None take the model's
    settings (:class:`DetectionDefaults`, ``EngineConfig.detections``: its densemap.json),
    else 0.5, 0.5, 100 and False; a value given here always wins.
    """

    classes: tuple[int, ...] | None = None
    threshold: float | None = None
    iou: float | None = None
    max_count: int | None = None
    across_classes: bool | None = None
    box_offsets: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        """Check every field (InvalidOption naming it); class indices are bounded by the
        model's class count when a request reaches it."""
        if self.classes is not None:
            _set(self, "classes", check_indices("detections.classes", self.classes))
        _check_detection_settings(self, unset_allowed=True)  # None: the model's
        if self.box_offsets is not None:
            _set(self, "box_offsets", check_box_offsets("detections.box_offsets", self.box_offsets))


@dataclass(frozen=True)
class ScoreOptions:
    """What to compute for one image. Defaults give the native-stride probability map.

    - ``output_stride``: None for the native stride S, else an int S/k that the model
      supports (à-trous variant in one pass, else shift-and-stitch).
    - ``scales``: image scales; each gives its own map, image scores average over them.
    - ``probabilities``: softmax over the class axis (True) or raw logits (False).
    - ``dtype``: "float32" or "float16" for returned maps.
    - ``top_k``: per-cell top-k classes (0 = off).
    - ``classes``: keep only these class indices in the returned map (None = all).
    - ``argmax``: also return the per-cell label map.
    - ``include_map``: return the score map itself (False: only top-k/argmax/image scores).
    - ``image_top_k``: how many image-level classes to report.
    - ``precision``: "fp32" (exact), "tf32", "fp16" or "int8" (models converted with
      ``--int8-calibration``); None uses the model's default.
    - ``detections``: also return boxes (:class:`DetectionOptions`); None = off.
    - ``heads``: names of the model's extra heads to return (models with several outputs,
      ``ScaleMap.head_maps``); None = all of them, () = none.
    """

    output_stride: int | None = None
    scales: tuple[float, ...] = (1.0,)
    probabilities: bool = True
    dtype: str = "float32"
    top_k: int = 0
    classes: tuple[int, ...] | None = None
    argmax: bool = False
    include_map: bool = True
    image_top_k: int = DEFAULT_IMAGE_TOP_K
    precision: str | None = None
    detections: DetectionOptions | None = None
    heads: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        """Check every field (InvalidOption naming it). What depends on the model (a stride
        it supports, class indices below its class count, its heads, int8 copies) is
        checked by :meth:`Engine.check_options <densemap.service.engine.Engine.check_options>`."""
        if self.output_stride is not None:
            _set(self, "output_stride", check_int("output_stride", self.output_stride, minimum=1))
        _set(self, "scales", check_scales(self.scales))
        for name in ("probabilities", "argmax", "include_map"):
            _set(self, name, check_flag(name, getattr(self, name)))
        dtype = (
            MAP_DTYPE_ALIASES.get(self.dtype, self.dtype) if isinstance(self.dtype, str) else None
        )
        if dtype not in MAP_DTYPES:
            choices = (*MAP_DTYPES, *MAP_DTYPE_ALIASES)
            raise InvalidOption(f"dtype must be one of {choices}, got {self.dtype!r}")
        _set(self, "dtype", dtype)
        for name in ("top_k", "image_top_k"):
            _set(self, name, check_int(name, getattr(self, name), minimum=0))
        if self.classes is not None:
            _set(self, "classes", check_indices("classes", self.classes))
        if self.precision is not None:
            _set(self, "precision", check_precision(self.precision))
        if self.detections is not None and not isinstance(self.detections, DetectionOptions):
            raise InvalidOption(
                f"detections must be a DetectionOptions or None, got {self.detections!r}"
            )
        if self.heads is not None:
            _set(self, "heads", check_names("heads", self.heads, "head names"))
