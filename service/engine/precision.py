"""Arithmetic precision of a pass: exact fp32 by default, faster tf32, fp16, int8 on request.

- ``fp32``: IEEE float32 everywhere (TF32 off on CUDA): the exact path, the default.
- ``tf32``: the CUDA EP's TF32 convolutions/matmuls (10-bit mantissa products, float32
  storage). On CPU there is no TF32: the pass runs in fp32.
- ``fp16``: a half-precision copy of the model, made at first use with onnxruntime's
  ``float16`` converter (fp16 input and output: no casts at the edges; the preprocess graph
  casts the normalised image, the postprocess graph computes softmax and top-k in fp32),
  run with ``prefer_nhwc`` on CUDA (tensor cores). cuDNN may find no fp16 algorithm for
  some kernels under HEURISTIC search (docs/engine.md "Precision": VGG-16's 7x7 head conv,
  in NHWC and NCHW alike): a failed pass is retried with EXHAUSTIVE search, then in NCHW
  (:data:`FP16_CUDA_SETTINGS`), never on the CPU.
- ``int8``: the model's int8 copy (``NAME.int8.onnx``, one per à-trous variant), written by
  ``densemap convert --int8-calibration IMAGES_DIR`` with onnxruntime's static QDQ
  quantization (int8 weights per channel, int8 activations, float32 input and output:
  fed like the fp32 net). For CPUs: faster than fp32 where the CPU has int8 dot products
  (VNNI; README benchmarks). Its deviation from fp32, measured on the calibration images
  at conversion (metadata), leads the engine's precision report; a model without copies
  refuses it, saying how to make them.
- ``bf16``: refused with the reason: onnxruntime's CPU and CUDA execution providers have no
  bfloat16 convolution kernel.

Deviations from fp32 are measured, not assumed: ``tests/bench/gpu_check.py`` and
``Engine.compare_precision`` report max deviation and argmax agreement per model.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from densemap.service.engine.fc_head_unfold import PROTOBUF_LIMIT, applies, unfold_huge_convs
from densemap.service.engine.field_checks import check_precision
from densemap.service.engine.onnxruntime_package import ort
from densemap.service.engine.options import AVAILABLE_PRECISIONS, EngineConfig
from densemap.service.engine.result import PrecisionReport
from densemap.service.engine.session import create_session, open_model_bytes
from densemap.service.errors import InvalidOption, ModelLoadError

log = logging.getLogger("densemap.engine")
AVAILABLE = AVAILABLE_PRECISIONS  # bf16: see field_checks.check_precision
NO_INT8 = (
    "precision 'int8' needs the model's int8 copies: convert it with "
    "'densemap convert ... --int8-calibration IMAGES_DIR' (a few images like the ones it "
    "scores), or use fp32"
)
# (channels-last, cuDNN search) of the fp16 session on CUDA, in the order tried: each failed
# pass moves to the next. None = EngineConfig.cuda_conv_search.
FP16_CUDA_SETTINGS = ((True, None), (True, "EXHAUSTIVE"), (False, "EXHAUSTIVE"))


def to_float16(path: Path, *, unfold_min_weights: int | None = None) -> bytes:
    """The model at ``path`` with float16 weights, input and output, serialised; with
    ``unfold_min_weights``, its huge-kernel convs unfolded first (fc_head_unfold.py)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path))  # with external weights, if any
    if unfold_min_weights is not None:
        unfold_huge_convs(model, min_weights=unfold_min_weights)
    half = convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)
    if half.ByteSize() > PROTOBUF_LIMIT:
        raise ModelLoadError(
            f"{path.name}: its float16 copy is over protobuf's 2 GiB limit: use fp32 or tf32"
        )
    return half.SerializeToString()


class PrecisionSessions:
    """The non-fp32 sessions of one net, created at first use and kept."""

    def __init__(
        self, path: Path, config: EngineConfig, *, on_cuda: bool, int8_path: Path | None = None
    ) -> None:
        self._path = path
        self._int8_path = int8_path  # the net's int8 copy, None: it has none
        self._config = config
        self._on_cuda = on_cuda
        self._sessions: dict[str, tuple[ort.InferenceSession, str]] = {}
        self._fp16_setting = 0  # index into FP16_CUDA_SETTINGS
        self._lock = threading.Lock()

    def session_for(self, precision: str, fp32: ort.InferenceSession):
        """(session, element type) at ``precision``; ``fp32`` is the net's exact session."""
        if precision == "fp32" or (precision == "tf32" and not self._on_cuda):
            return fp32, "float32"
        with self._lock:
            if precision not in self._sessions:
                self._sessions[precision] = self._open(precision)
            return self._sessions[precision]

    def _open(self, precision: str) -> tuple[ort.InferenceSession, str]:
        if precision == "tf32":
            config = replace(self._config, device="cuda")
            return create_session(self._path, config, tf32=True), "float32"
        if precision == "fp16":
            nhwc, search = FP16_CUDA_SETTINGS[self._fp16_setting]
            config = replace(self._config, cuda_conv_search=search or self._config.cuda_conv_search)
            model = self._float16_model()  # again after a refusal: rare, and no copy is kept
            return open_model_bytes(model, config, cuda=self._on_cuda, nhwc=nhwc), "float16"
        if precision == "int8":
            if self._int8_path is None:
                raise InvalidOption(f"{self._path.name}: {NO_INT8}")
            config = replace(self._config, device="cuda" if self._on_cuda else "cpu")
            return create_session(self._int8_path, config), "float32"
        raise InvalidOption(f"precision {precision!r} is not available")

    def _float16_model(self) -> bytes:
        try:
            unfold = applies(self._config.fc_head_unfold, cuda=self._on_cuda)
            minimum = self._config.fc_head_unfold_min_weights if unfold else None
            return to_float16(self._path, unfold_min_weights=minimum)
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - the converter raises many types
            raise ModelLoadError(f"{self._path.name}: no float16 copy: {exc}") from None

    def demote(self, precision: str, error: Exception) -> bool:
        """After a failed fp16 pass on CUDA (cuDNN may find no algorithm for some kernels
        under HEURISTIC search or in NHWC), reopen the session with the next of
        :data:`FP16_CUDA_SETTINGS` and say whether the pass is worth retrying."""
        last = len(FP16_CUDA_SETTINGS) - 1
        if not self._on_cuda or precision != "fp16" or self._fp16_setting >= last:
            return False
        with self._lock:
            self._fp16_setting += 1
            nhwc, search = FP16_CUDA_SETTINGS[self._fp16_setting]
            log.warning(
                "%s: fp16 pass failed (%s); using %s convolutions and %s cuDNN search from now on",
                self._path.name,
                " ".join(str(error).split())[:200],
                "NHWC" if nhwc else "NCHW",
                search or self._config.cuda_conv_search,
            )
            self._sessions[precision] = self._open(precision)
        return True


def compare_maps(
    precision: str,
    exact: np.ndarray,
    other: np.ndarray,
    *,
    image: str,
    probabilities: bool = False,
) -> PrecisionReport:
    """The report for the map ``other`` against ``exact`` (both [C, n_h, n_w]): logits, or
    the model's own probabilities when ``probabilities`` (softmax or sigmoid outputs)."""
    from densemap.service.engine.postprocess import softmax  # the engine's numpy softmax

    exact = exact.astype(np.float32)
    other = other.astype(np.float32)
    spread = float(exact.max() - exact.min()) or 1.0
    agree = exact.argmax(axis=0) == other.argmax(axis=0)
    as_probabilities = (lambda v: v) if probabilities else softmax
    return PrecisionReport(
        precision=precision,
        max_probability_deviation=float(
            np.abs(as_probabilities(other) - as_probabilities(exact)).max()
        ),
        max_logit_deviation=float(np.abs(other - exact).max()) / spread,
        argmax_agreement=float(agree.mean()),
        cells=int(agree.size),
        image=image,
    )


def compare_precision(engine, image, precision: str, *, output_stride=None) -> PrecisionReport:
    """Score ``image`` with ``engine`` in fp32 and in ``precision``: how far apart they are."""
    from densemap.service.engine.options import ScoreOptions

    # logits where the model gives them; a softmax or sigmoid model's own scores otherwise
    own_probabilities = engine.metadata.output_kind != "logits"
    options = ScoreOptions(
        output_stride=output_stride,
        probabilities=own_probabilities,
        image_top_k=0,
        precision="fp32",
        heads=(),  # the primary head's map is compared
    )
    exact = engine.score(image, options).maps[0].scores
    other = engine.score(image, replace(options, precision=precision)).maps[0].scores
    what = "image bytes" if isinstance(image, (bytes, bytearray)) else "array"
    return compare_maps(
        check_precision(precision), exact, other, image=what, probabilities=own_probabilities
    )


def calibration_report(copies) -> PrecisionReport:
    """The int8 copies' deviation from fp32 measured on the calibration images (metadata)."""
    return PrecisionReport(
        precision="int8",
        max_probability_deviation=copies.max_probability_deviation,
        max_logit_deviation=copies.max_logit_deviation,
        argmax_agreement=copies.argmax_agreement,
        cells=copies.cells,
        image=f"{copies.images} calibration images (at conversion)",
    )


def measure_precisions(engine, precisions) -> tuple[PrecisionReport, ...]:
    """The load-time report: each precision against fp32 on a uniform-noise image of
    2R + 3S pixels per axis (several cells, deterministic)."""
    geometry = engine.metadata.geometry
    size = tuple(2 * r + 3 * s for r, s in zip(geometry.window, geometry.stride, strict=True))
    channels = engine.metadata.preprocessing.channels
    noise = np.random.default_rng(0).integers(0, 256, (*size, channels), dtype=np.uint8)
    return tuple(
        replace(compare_precision(engine, noise, p), image=f"uniform noise {size[0]}x{size[1]}")
        for p in precisions
    )
