"""The dense scoring engine: one converted model (plus its à-trous variants) in onnxruntime.

``Engine.score(image, options)`` is the one entry point the server, the folder scorer and
Ray workers call. Per requested scale it resizes the image (Pillow bilinear), picks the
net for the output stride (an à-trous variant in one pass, else shift-and-stitch over the
coarsest net whose stride the requested one divides), runs each pass in one go or in exact
tiles when its activations do not fit in what the memory budget leaves beside the request's
maps and copies (on CUDA: the whole budget, on the device), and turns the raw maps into
the requested outputs. Errors are those of :mod:`densemap.service.errors`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from densemap.service.contract import ModelMetadata
from densemap.service.engine import host_memory, image_input
from densemap.service.engine.arena_policy import PROCESS_POLICY
from densemap.service.engine.assembly import PostprocessCall
from densemap.service.engine.cost import (
    RequestCost,
)
from densemap.service.engine.dense import check_cancel
from densemap.service.engine.detections import DetectionPlan, candidates, plan_detections, select
from densemap.service.engine.device_memory import resolve_memory_budget
from densemap.service.engine.heads import HeadInfo
from densemap.service.engine.loading import load_nets
from densemap.service.engine.options import (
    DEFAULT_CUDA_REPORT_PRECISIONS,
    EngineConfig,
    ScoreOptions,
)
from densemap.service.engine.pass_budget import estimate_passes, pass_bytes_of
from densemap.service.engine.postprocess import OutputPlan, plan_outputs, rank_image_scores
from densemap.service.engine.precision import (
    AVAILABLE,
    NO_INT8,
    calibration_report,
    compare_precision,
    measure_precisions,
)
from densemap.service.engine.request_checks import (
    common_divisors,
    image_size,
    plan_stride,
    read_image,
)
from densemap.service.engine.result import PrecisionReport, ScoreResult
from densemap.service.engine.runtime import Runtime
from densemap.service.engine.scale_pass import ScalePlan, score_scale
from densemap.service.errors import (
    ImageTooSmall,
    InvalidOption,
    ModelLoadError,
)

log = logging.getLogger("densemap.engine")


class RequestPlan(NamedTuple):
    """What one request's options ask of the model, checked against it."""

    outputs: OutputPlan
    detect: DetectionPlan | None
    net: object  # the DenseNet to run
    factor: tuple[int, int]  # shift-and-stitch factor per axis
    precision: str


class Engine:
    """A converted dense model, ready to score images (thread-safe: sessions are shared)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        config: EngineConfig = EngineConfig(),
        name: str | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        path = Path(model_path)
        self._config = config
        self._name = name or (path.parent.name if path.name == "model.onnx" else path.stem)
        loaded = load_nets(path, config=config, labels=labels, name=self._name)
        self._metadata: ModelMetadata = loaded.metadata
        self._labels = loaded.labels
        self._num_classes = loaded.num_classes
        self._heads = loaded.heads  # primary first
        self._nets = loaded.nets  # main net first, then à-trous variants
        self._providers = loaded.providers
        self._runtime = Runtime(providers=loaded.providers, config=config)
        self._memory_budget = resolve_memory_budget(config, on_cuda=self._runtime.on_cuda)
        self._default_precision = config.precision  # canonical: EngineConfig checked it
        try:
            for precision in (self._default_precision, *(config.report_precisions or ())):
                self._check_available(precision)
        except InvalidOption as exc:
            raise ModelLoadError(f"model {self._name!r}: EngineConfig: {exc}") from None
        int8 = self._metadata.int8
        self._precision_report: tuple[PrecisionReport, ...] = (
            () if int8 is None else (calibration_report(int8),)
        )
        if config.warmup:
            self._warm_up_shapes(config.warmup_shapes)
            chosen = config.report_precisions
            if chosen is None:
                chosen = DEFAULT_CUDA_REPORT_PRECISIONS if self._runtime.on_cuda else ()
            self._precision_report += measure_precisions(self, chosen)

    # -- properties ----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def metadata(self) -> ModelMetadata:
        return self._metadata

    @property
    def labels(self) -> tuple[str, ...]:
        return self._labels

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def heads(self) -> tuple[HeadInfo, ...]:
        """Every output map of the model, primary (classification) head first: name, kind,
        channel labels, channels (docs/engine.md "Several heads")."""
        return self._heads

    @property
    def providers(self) -> tuple[str, ...]:
        """onnxruntime providers the sessions really run on, best first."""
        return self._providers

    @property
    def config(self) -> EngineConfig:
        return self._config

    @property
    def supported_strides(self) -> tuple[int, ...]:
        """Output strides ``score`` accepts: native first, then every S/k with integer S/k."""
        return common_divisors(self._metadata.geometry.stride)

    @property
    def atrous_strides(self) -> tuple[int, ...]:
        """Output strides served in one pass by an à-trous variant."""
        return tuple(v.stride[0] for v in self._metadata.variants if v.stride[0] == v.stride[1])

    @property
    def memory_budget(self) -> int:
        """Bytes one request may use (chosen for the device unless EngineConfig.memory_budget
        is set): its maps and working copies, and on CPU, in what they leave, one pass's
        activations (tiled to fit); on CUDA a pass's activations have the whole budget on
        the device. ``estimate_request`` and the server's admission use the same figure."""
        return self._memory_budget

    @property
    def default_precision(self) -> str:
        """The precision of requests that do not choose one (EngineConfig.precision)."""
        return self._default_precision

    @property
    def precisions(self) -> tuple[str, ...]:
        """Precisions a request may ask for ("tf32" runs as fp32 on CPU; "int8" only with
        the model's int8 copies)."""
        return tuple(p for p in AVAILABLE if p != "int8" or self._metadata.int8 is not None)

    @property
    def precision_report(self) -> tuple[PrecisionReport, ...]:
        """Deviation from fp32: int8's measured on the calibration images at conversion
        (models with int8 copies), then each precision in EngineConfig.report_precisions
        measured at load (warm-up) on a noise image (none without warm-up)."""
        return self._precision_report

    def compare_precision(
        self, image: bytes | np.ndarray, precision: str, *, output_stride: int | None = None
    ) -> PrecisionReport:
        """Score ``image`` in fp32 and in ``precision``; report how far they are apart."""
        return compare_precision(self, image, precision, output_stride=output_stride)

    # -- public helpers ------------------------------------------------------------------
    def decode(self, data: bytes) -> np.ndarray:
        """Encoded image -> uint8 HxWxC in the model's color order, EXIF orientation applied."""
        preprocessing = self._metadata.preprocessing
        return image_input.decode(
            data, color=preprocessing.color, max_pixels=self._config.max_pixels
        )

    def estimate_bytes(self, height: int, width: int, *, output_stride: int | None = None) -> int:
        """Activation bytes of the largest pass on a height x width image (untiled)."""
        net, _ = self._plan_stride(output_stride)
        window = self._metadata.geometry.window
        sizes = (height, width)
        if any(not isinstance(v, (int, np.integer)) or isinstance(v, bool) for v in sizes):
            raise InvalidOption(f"height and width must be ints, got {height!r} x {width!r}")
        if height < window[0] or width < window[1]:
            raise ImageTooSmall(
                f"a {height}x{width} image is smaller than the model's window R = "
                f"{window[0]}x{window[1]}: it has no pass to estimate"
            )
        return net.estimate_bytes(height, width)

    def estimate_macs(self, height: int, width: int, *, output_stride: int | None = None) -> int:
        """Multiply-accumulates of scoring a height x width image at ``output_stride`` (every
        k x k shift of a finer stride), as ``estimate_request(...).macs`` counts them."""
        net, factor = self._plan_stride(output_stride)
        return factor[0] * factor[1] * net.estimate_macs(height, width)

    def check_options(self, options: ScoreOptions) -> None:
        """Refuse options this model cannot take, before any image: InvalidOption naming
        the fix (a stride it does not support, classes it does not have, logits of a model
        that ends in a softmax, an unknown head, int8 without int8 copies). ScoreOptions
        checked its own values when it was built; ``score`` and ``estimate_request`` run
        this check too."""
        self._plan(options)

    def estimate_request(
        self,
        height: int,
        width: int,
        options: ScoreOptions = ScoreOptions(),
        *,
        float_input: bool = False,
    ) -> RequestCost:
        """What scoring a height x width image with ``options`` costs (:mod:`.cost`).

        Raises what ``score`` would raise before its first pass, in milliseconds:
        InvalidOption for bad options, ImageTooSmall, and ImageTooLarge over the pixel
        limit or when the maps and copies, or a pass's smallest tile, exceed the memory
        budget. ``float_input``: the image is a float32 CxHxW array (4 bytes a sample).
        """
        sizes = (height, width)
        if any(not isinstance(v, (int, np.integer)) or isinstance(v, bool) for v in sizes):
            raise InvalidOption(f"height and width must be ints, got {height!r} x {width!r}")
        request = self._plan(options)
        return estimate_passes(
            request.net,
            request.factor,
            request.outputs,
            scales=options.scales,
            original=(int(height), int(width)),
            pixel_bytes=self._metadata.preprocessing.channels * (4 if float_input else 1),
            num_classes=self._num_classes,
            window=self._metadata.geometry.window,
            max_pixels=self._config.max_pixels,
            budget=self._memory_budget,
            on_cuda=self._runtime.on_cuda,
            tiling=self._config.tiling,
        )

    def estimate_image(
        self, image: bytes | np.ndarray, options: ScoreOptions = ScoreOptions()
    ) -> RequestCost:
        """:meth:`estimate_request` for ``image``: encoded bytes (their header only is read)
        or an array, as ``score`` takes them."""
        height, width, float_input = image_size(
            image, preprocessing=self._metadata.preprocessing, max_pixels=self._config.max_pixels
        )
        return self.estimate_request(height, width, options, float_input=float_input)

    # -- scoring -------------------------------------------------------------------------
    def score(
        self,
        image: bytes | np.ndarray,
        options: ScoreOptions = ScoreOptions(),
        *,
        cancel: Callable[[], bool] | None = None,
    ) -> ScoreResult:
        """Score one image: one :class:`ScaleMap` per scale, plus image-level scores."""
        started = time.perf_counter()
        timings = dict.fromkeys(("decode", "preprocess", "infer", "postprocess"), 0.0)
        if cancel is not None and not callable(cancel):
            raise InvalidOption(f"cancel must be a callable returning bool, got {cancel!r}")
        cost = self.estimate_image(image, options)  # refuses before any pixel is decoded
        request = self._plan(options)
        plan, detect, net, factor = request.outputs, request.detect, request.net, request.factor
        check_cancel(cancel, "before decoding")
        uint8_hwc, float_chw = self._read_image(image, timings)
        pixels = uint8_hwc if uint8_hwc is not None else float_chw.transpose(1, 2, 0)
        height, width = pixels.shape[:2]
        if (height, width) != cost.image_size:  # an orientation the header did not show
            cost = self.estimate_request(height, width, options, float_input=float_chw is not None)
        scales = tuple(scale.scale for scale in cost.scales)
        sizes = [scale.size for scale in cost.scales]
        scale_plan = ScalePlan(
            runtime=self._runtime,
            metadata=self._metadata,
            net=net,
            factor=factor,
            post=PostprocessCall(plan, detect=detect),
            precision=request.precision,
            room=cost.activation_budget,
            pass_bytes=pass_bytes_of(net, plan, self._num_classes),
            tiling=self._config.tiling,
            num_classes=self._num_classes,
            model_name=self._name,
            cancel=cancel,
        )
        maps, image_scores, found = [], [], []
        for index, (scale, size) in enumerate(zip(scales, sizes, strict=True)):
            check_cancel(cancel, f"before scale {scale}")
            scale_map, scale_scores, assembly = score_scale(
                scale_plan,
                uint8_hwc=uint8_hwc,
                float_chw=float_chw,
                scale=scale,
                size=size,
                original=(height, width),
                timings=timings,
            )
            maps.append(scale_map)
            image_scores.append(scale_scores)
            if detect is not None:
                tic = time.perf_counter()
                found.append(candidates(assembly.above(), detect, scale_map.geometry, index))
                timings["postprocess"] += time.perf_counter() - tic
        # the held bytes plus the largest pass after tiling (cost.activation_bytes): a big
        # request gives its buffers back unless it is one of a stream of its size
        keep = self._config.arena_keep_bytes
        if PROCESS_POLICY.should_release(cost.peak_bytes, keep_bytes=keep):
            self.release_memory()
        mean_scores = np.mean(image_scores, axis=0)
        tic = time.perf_counter()
        detections = None if detect is None else select(found, detect, self._labels)
        timings["postprocess"] += time.perf_counter() - tic
        timings["total"] = time.perf_counter() - started
        return ScoreResult(
            maps=maps,
            image_scores=mean_scores.astype(np.float32),
            image_top_k=rank_image_scores(mean_scores, plan),
            labels=self._labels,
            image_size=(int(height), int(width)),
            timings=timings,
            detections=detections,
            heads=plan.heads,
        )

    def release_memory(self) -> None:
        """Give freed memory back to the system: the CPU arena's unused buffers (shared by
        every engine of the process) and glibc's free heap pages."""
        self._runtime.release_memory()
        for net in self._nets:  # the torch runtime's cached CUDA blocks (convert/torch_runtime/)
            getattr(net.session, "release_memory", lambda: None)()
        host_memory.trim()

    # -- internals -----------------------------------------------------------------------
    def _warm_up_shapes(self, shapes) -> None:
        """Score a blank image of each configured shape, so that their first real request
        finds the device's per-shape state (cuDNN algorithms, buffers) ready."""
        channels = self._metadata.preprocessing.channels
        for height, width in shapes:
            blank = np.zeros((int(height), int(width), channels), dtype=np.uint8)
            self.score(blank, ScoreOptions(image_top_k=0, include_map=False, top_k=1))

    def _check_available(self, precision: str) -> None:
        if precision not in self.precisions:
            raise InvalidOption(f"{self._name}: {NO_INT8}")  # the one model-dependent one

    def _plan(self, options: ScoreOptions) -> RequestPlan:
        """What ``options`` ask of this model, checked against it (check_options)."""
        if not isinstance(options, ScoreOptions):
            raise InvalidOption(
                f"options must be a ScoreOptions, got {type(options).__name__}: "
                "build one with ScoreOptions(...)"
            )
        outputs = plan_outputs(
            options,
            num_classes=self._num_classes,
            output_kind=self._metadata.output_kind,
            heads=self._heads,
        )
        detect = None
        if options.detections is not None:
            detect = plan_detections(
                options.detections,
                labels=self._labels,
                num_classes=self._num_classes,
                box_offsets=self._config.box_offsets,
                defaults=self._config.detections,
            )
        net, factor = self._plan_stride(options.output_stride)
        precision = options.precision or self._default_precision
        self._check_available(precision)
        return RequestPlan(outputs, detect, net, factor, precision)

    def _plan_stride(self, output_stride):
        return plan_stride(self._nets, output_stride, name=self._name, atrous=self.atrous_strides)

    def _read_image(self, image, timings):
        preprocessing = self._metadata.preprocessing
        limit = self._config.max_pixels
        return read_image(image, preprocessing=preprocessing, max_pixels=limit, timings=timings)

    def __repr__(self) -> str:
        return f"Engine(name={self._name!r}, providers={self._providers})"
