"""Check a dense model and its à-trous variants against the classifier it came from.

For each image size (R + 3S plus a remainder, non-square by default) the reference is the
classifier's **own head on every window of its own trunk's output** over the whole image
(:mod:`densemap.convert.trunk_windows`: the classifier is cut where its head starts at R): exact for
every net, zero padding included, so a wrong rewrite fails whatever the net. Each net (the
main model, then every variant at its finer stride T) runs once, and its map is cropped to
n = (W - R) // T + 1 cells per axis (written models already return exactly n). Each row's
max |difference| is held to the limit of :mod:`densemap.convert.verify_limits`: a multiple of the
classifier's own float32 rounding, measured against float64 on windows of size R, with a
floor relative to the scores. A model with several heads is compared head by head.

- **crops** (the classifier on each window) are checked too on **unpadded** nets, where they
  equal the reference; on **padded** nets a crop sees zero padding at its border where the
  dense pass sees real neighbours (VGG paper, section 3.2): their difference is reported as
  information, never as the pass criterion;
- a classifier whose trunk cannot run on a larger image (a constant that depends on R) or
  that cannot be cut into one trunk and a head falls back to crops when unpadded; when
  padded the report says the check was not possible, and it does not pass;
- **variants**: unpadded, against crops at their stride; padded, their every k-th cell
  against the (checked) native map, and against the head on the trunk's windows at T when T
  is a multiple of the trunk's stride (shift-and-stitch moves the zero border: not exact);
- the torch path compares a padded net with the converted torch module only where the
  classifier cannot be cut (it slides windows that see one cell at R over real neighbours,
  where the written model reads that cell alone, as the classifier does).

Memory: the references are computed first and freed before each dense net runs alone, and
an ONNX classifier is held once, as its trunk and head. Big nets take a while (VGG-16:
minutes): with ``progress=None`` a progress bar goes to stderr when it is a terminal;
``progress=False`` keeps it quiet.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx

from densemap.convert import verify_limits
from densemap.convert.classifier_runner import crop_batches
from densemap.convert.pipeline import read_metadata
from densemap.convert.runtime import Float64Runner, OrtRunner
from densemap.convert.verify_limits import Tolerance
from densemap.convert.verify_reference import Reference
from densemap.convert.verify_report import (
    VerifyReport,
    VerifyRow,
)
from densemap.convert.verify_rows import Check, Expected, add_module_maps, on_trunk_grid
from densemap.service.contract import Geometry, ModelMetadata
from densemap.service.errors import ConversionError

__all__ = ["VerifyReport", "VerifyRow", "default_sizes", "precision_table", "verify"]

Pair = tuple[int, int]
PROGRESS_DELAY = 1.0  # seconds before the bar appears: quick verifications stay quiet


def default_sizes(window: Pair, stride: Pair) -> tuple[Pair, ...]:
    """R + 3S plus a remainder on one axis, R + 2S or R + S on the other: non-square."""
    rest = tuple(s // 2 for s in stride)
    return (
        (window[0] + 3 * stride[0] + rest[0], window[1] + 2 * stride[1] + rest[1] + 1 % stride[1]),
        (window[0] + stride[0] + 1 % stride[0], window[1] + 3 * stride[1] + rest[1]),
    )


class _Progress:
    """A tqdm bar over the verification's passes (classifier batches, dense passes)."""

    def __init__(self, total: int, enabled: bool | None) -> None:
        self.bar = None
        if sys.stderr.isatty() if enabled is None else enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, desc="verify", unit="pass", file=sys.stderr, delay=PROGRESS_DELAY
            )

    def step(self, what: str = "", count: int = 1) -> None:
        if self.bar is not None:
            if what:
                self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Net:
    """One dense file to check: the main model or a variant. Its session opens at first use
    and is closed by :meth:`close` (one net in memory at a time)."""

    def __init__(self, path: Path, geometry: Geometry, dtype: np.dtype, *, main: bool) -> None:
        self.path = path
        self.geometry = geometry
        self.label = "" if main else path.name
        self._dtype = dtype
        self._runner = None

    def run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the net on ``image``, by name."""
        if self._runner is None:
            self._runner = (
                Float64Runner(onnx.load(str(self.path)))
                if self._dtype == np.float64
                else OrtRunner(str(self.path), low_memory=True)
            )
        return self._runner.outputs(image)

    def close(self) -> None:
        self._runner = None


def verify(
    classifier,
    dense_path: str | os.PathLike,
    *,
    sizes=None,
    seed: int = 0,
    dtype=np.float32,
    progress: bool | None = None,
) -> VerifyReport:
    """Compare the dense model at ``dense_path`` and its à-trous variants with
    ``classifier`` (a torch module or an ONNX classifier's path)."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ConversionError(f"verify runs in float32 or float64, not {dtype}")
    dense_path = Path(dense_path)
    meta = read_metadata(dense_path)
    geometry = meta.geometry
    sizes = [
        (s, s) if isinstance(s, int) else tuple(s)
        for s in sizes or default_sizes(geometry.window, geometry.stride)
    ]
    for size in sizes:
        if min(geometry.cells(*size)) < 1:
            raise ConversionError(
                f"verify size {size} is smaller than the window {geometry.window}"
            )
    nets = [_Net(dense_path, geometry, dtype, main=True)]
    for variant in meta.variants:
        path = dense_path.parent / variant.file
        nets.append(_Net(path, read_metadata(path).geometry, dtype, main=False))
    reference = Reference(
        classifier, dtype, _graph_outputs(dense_path),
        window=geometry.window, channels=meta.preprocessing.channels,
    )  # fmt: skip
    classify = reference.classify
    # the converted torch module only where no exact reference is (it slides windows that
    # see one cell at R over real neighbours, where the written model reads that cell alone)
    padded_module = geometry.padded and classify.torch_module is not None and reference.cut is None
    passes = _count_passes(geometry, nets, sizes, padded_module, reference.cut)
    bar = _Progress(passes, progress)
    try:
        rng = np.random.default_rng(seed)
        windows = _random_image(
            rng, meta, geometry.window, dtype, batch=verify_limits.ROUNDING_WINDOWS
        )
        tolerances, at_window = _tolerances(classify, windows, dtype)  # frees its fp64 twin
        bar.step("float64 rounding at R", len(windows))
        images = [_random_image(rng, meta, size, dtype) for size in sizes]
        expected = Expected(reference, meta, bar)
        references = [expected.main(image, nets[0].geometry) for image in images]
        if padded_module:
            add_module_maps(classify, geometry, images, references, bar)
        variant_references = [
            [expected.variant(image, net) for image in images] for net in nets[1:]
        ]
        reference.close()  # before the dense nets run: memory
        check = Check(classify.names, meta, tolerances, bar)
        rows = check.main(nets[0], windows, at_window, images, references)
        for net, refs in zip(nets[1:], variant_references, strict=True):
            rows += check.variant(net, windows, at_window, images, refs)
    finally:
        bar.close()
    return VerifyReport(
        rows=tuple(rows),
        padded=geometry.padded,
        dtype=dtype.name,
        tolerance=tolerances[classify.names[0]],
        window=geometry.window,
        head_tolerances=tuple(tolerances.items()) if len(tolerances) > 1 else (),
        exact_unavailable=expected.unavailable,
        cut=reference.cut_label,
    )


def _count_passes(geometry: Geometry, nets, sizes, module: bool, cut) -> int:
    total = verify_limits.ROUNDING_WINDOWS + len(nets)
    for size in sizes:
        total += 2 + crop_batches(geometry.cells(*size)) + int(module)
        for net in nets[1:]:
            if not geometry.padded:
                total += 1 + crop_batches(net.geometry.cells(*size))
            else:
                total += 1 + int(on_trunk_grid(net.geometry.stride, cut))
    return total


def _random_image(rng, meta: ModelMetadata, size: Pair, dtype, *, batch: int = 1) -> np.ndarray:
    channels = meta.preprocessing.channels
    nchw = meta.preprocessing.layout == "NCHW"
    shape = (batch, channels, *size) if nchw else (batch, *size, channels)
    return rng.standard_normal(shape).astype(dtype)


def _tolerances(classify, windows, dtype) -> tuple[dict[str, Tolerance], dict]:
    """Each head's limit, from its own float32 rounding (one float64 run of the windows,
    made and freed before the float32 run: memory), and the classifier's scores."""
    if dtype == np.float64:
        return {name: Tolerance(dtype="float64") for name in classify.names}, classify.run(windows)
    try:
        run64 = classify.float64_run()
        windows64 = windows.astype(np.float64)
        # one window at a time: fp64 convolutions unfold their input (memory on big nets)
        outputs64 = [run64(windows64[i : i + 1]) for i in range(len(windows64))]
        del run64
    except Exception as exc:  # noqa: BLE001 - onnx.reference lacks an op or a type, ...
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        unmeasured = f"the classifier fails in float64: {reason}"
        tolerances = {
            name: Tolerance(dtype="float32", unmeasured=unmeasured) for name in classify.names
        }
        return tolerances, classify.run(windows)
    reference = classify.run(windows)
    return {
        name: verify_limits.from_scores(
            reference[name], np.concatenate([output[name] for output in outputs64])
        )
        for name in classify.names
    }, reference


def _graph_outputs(dense_path) -> list[str]:
    """The dense model's output names in graph order (a tuple forward's order)."""
    model = onnx.load(str(dense_path), load_external_data=False)
    return [value.name for value in model.graph.output]


def precision_table(dense_path: str | os.PathLike, *, seed: int = 0) -> str:
    """How far each faster precision's map is from fp32 on this model (informative, not a
    pass/fail check): fp16 as served by the engine, on a random image of R + 3S pixels.
    Measured on this machine's device; GPU fp16 kernels round alike but sum in another order.
    int8 copies (``--int8-calibration``): as measured on the calibration images when they
    were made (random noise is not what int8 was calibrated on).
    """
    from densemap.service.engine import Engine, EngineConfig

    engine = Engine(dense_path, config=EngineConfig(warmup=False))
    geometry = engine.metadata.geometry
    size = default_sizes(geometry.window, geometry.stride)[0]
    channels = engine.metadata.preprocessing.channels
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*size, channels), dtype=np.uint8)
    where = engine.providers[0].replace("ExecutionProvider", "")
    lines = [
        f"precisions vs fp32 on a random {size[0]}x{size[1]} image ({where}; informative)",
        f"  {'precision':<9}  {'max|dp|':>9}  {'max|dz|/range':>13}  argmax agreement",
    ]
    for precision in ("fp16",):
        report = engine.compare_precision(image, precision)
        lines.append(
            f"  {precision:<9}  {report.max_probability_deviation:>9.2e}  "
            f"{report.max_logit_deviation:>13.2e}  {report.argmax_agreement:.2%} "
            f"of {report.cells} cells"
        )
    for report in engine.precision_report:  # int8: its figures from calibration
        lines.append(
            f"  {report.precision:<9}  {report.max_probability_deviation:>9.2e}  "
            f"{report.max_logit_deviation:>13.2e}  {report.argmax_agreement:.2%} "
            f"of {report.cells} cells, on {report.image}"
        )
    return "\n".join(lines)
