"""Check a dense model against its classifier: crop by crop, on random images.

For each image size (R + 3S plus a remainder, non-square by default) every window crop
runs through the original classifier (batched), the dense model runs once, and the map is
cropped to n = (W - R) // S + 1 cells per axis (the engine's rule). A model with several
heads is compared head by head: each dense output with the classifier's own output for
that head (a dict by key, a tuple or ONNX outputs in order). Max |difference|:

- **unpadded nets** must agree to the tolerance (fp32: 1e-4 x max(1, max|score|), the
  rounding of summing in another order; fp64: 1e-9 x the same);
- **padded nets** differ by design: a crop sees zero padding at its border where the dense
  pass sees real neighbours (VGG paper, section 3.2). The crop rows are reported as
  expected, and exactness is checked against the converted torch module instead (torch
  path), plus the classifier on an image of exactly R, where both see the same zeros.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from convert.pipeline import read_metadata
from convert.reference import Classifier, by_head, crop_scores
from convert.runtime import Float64Runner, OrtRunner
from service.contract import ModelMetadata
from service.errors import ConversionError

Pair = tuple[int, int]
TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9}


@dataclass(frozen=True)
class VerifyRow:
    size: Pair
    cells: Pair
    against: str
    max_diff: float
    limit: float | None  # None: a difference that is expected (padding), not checked
    head: str = ""  # the output compared (models with several heads)

    @property
    def ok(self) -> bool:
        return self.limit is None or self.max_diff <= self.limit

    @property
    def verdict(self) -> str:
        if self.limit is None:
            return "expected (padding)"
        return "ok" if self.ok else "FAIL"


@dataclass(frozen=True)
class VerifyReport:
    rows: tuple[VerifyRow, ...]
    padded: bool
    dtype: str

    @property
    def passed(self) -> bool:
        return all(row.ok for row in self.rows)

    @property
    def max_checked_diff(self) -> float:
        return max((row.max_diff for row in self.rows if row.limit is not None), default=0.0)

    def table(self) -> str:
        heads = [row.head for row in self.rows]
        width = max(map(len, heads)) if len(set(heads)) > 1 else 0
        head = f"{'head':<{width}}  " if width else ""
        lines = [
            f"verify ({self.dtype}): dense model vs window-by-window classifier",
            f"  {'image':>9}  {'cells':>5}  {head}{'compared with':<26}  {'max|diff|':>9}  "
            f"{'limit':>7}  result",
        ]
        for row in self.rows:
            size, cells = f"{row.size[0]}x{row.size[1]}", f"{row.cells[0]}x{row.cells[1]}"
            limit = "-" if row.limit is None else f"{row.limit:.1e}"
            head = f"{row.head:<{width}}  " if width else ""
            lines.append(
                f"  {size:>9}  {cells:>5}  {head}{row.against:<26}  {row.max_diff:>9.2e}  "
                f"{limit:>7}  {row.verdict}"
            )
        if self.padded:
            lines += [
                "  padded net: each crop sees zero padding at its border where the dense pass",
                "  sees real neighbours (VGG paper sec. 3.2), so crop differences are expected;",
                "  exactness is checked against the converted module and at the window size.",
            ]
        lines.append("  PASSED" if self.passed else "  FAILED: differences past the limit")
        return "\n".join(lines)


def default_sizes(window: Pair, stride: Pair) -> tuple[Pair, ...]:
    """R + 3S plus a remainder on one axis, R + 2S or R + S on the other: non-square."""
    rest = tuple(s // 2 for s in stride)
    return (
        (window[0] + 3 * stride[0] + rest[0], window[1] + 2 * stride[1] + rest[1] + 1 % stride[1]),
        (window[0] + stride[0] + 1 % stride[0], window[1] + 3 * stride[1] + rest[1]),
    )


def _dense_runner(dense_path: Path, dtype: np.dtype):
    """Runs the dense model: {output name: map}, in the graph's order."""
    if dtype == np.float64:
        return Float64Runner(onnx.load(str(dense_path))).outputs
    return OrtRunner(str(dense_path)).outputs


def _random_image(rng, meta: ModelMetadata, size: Pair, dtype) -> np.ndarray:
    prep = meta.preprocessing
    shape = (1, prep.channels, *size) if prep.layout == "NCHW" else (1, *size, prep.channels)
    return rng.standard_normal(shape).astype(dtype)


def _max_diff(a: np.ndarray, b: np.ndarray, dtype) -> tuple[float, float]:
    limit = TOLERANCE[np.dtype(dtype)] * max(1.0, float(np.abs(b).max()))
    return float(np.abs(a - b).max()), limit


def verify(
    classifier,
    dense_path: str | os.PathLike,
    *,
    sizes=None,
    seed: int = 0,
    dtype=np.float32,
) -> VerifyReport:
    """Compare the dense model at ``dense_path`` with ``classifier`` (module or ONNX path)."""
    dtype = np.dtype(dtype)
    if dtype not in TOLERANCE:
        raise ConversionError(f"verify runs in float32 or float64, not {dtype}")
    meta = read_metadata(dense_path)
    geometry = meta.geometry
    dense = _dense_runner(Path(dense_path), dtype)
    names = _graph_outputs(dense_path)
    classify = Classifier(classifier, dtype, names)
    rng = np.random.default_rng(seed)
    rows = []
    window_image = _random_image(rng, meta, geometry.window, dtype)
    got, expected = dense(window_image), classify.run(window_image)
    for name in names:
        diff, limit = _max_diff(got[name][0, :, 0, 0], expected[name][0], dtype)
        whole = "classifier, whole window"
        rows.append(VerifyRow(geometry.window, (1, 1), whole, diff, limit, head=name))
    module = None
    if geometry.padded and classify.torch_module is not None:
        from convert.from_torch.fc import fully_convolutional

        module = fully_convolutional(classify.torch_module, input_size=geometry.window)
    for size in sizes or default_sizes(geometry.window, geometry.stride):
        size = (size, size) if isinstance(size, int) else tuple(size)
        cells = geometry.cells(*size)
        if min(cells) < 1:
            raise ConversionError(
                f"verify size {size} is smaller than the window {geometry.window}"
            )
        image = _random_image(rng, meta, size, dtype)
        maps = {name: m[0, :, : cells[0], : cells[1]] for name, m in dense(image).items()}
        crops = crop_scores(classify.run, image, meta, cells)
        expected = None
        if module is not None:
            import torch

            with torch.no_grad():
                value = classify.as_numpy(module(torch.from_numpy(image)))
            expected = by_head(value, names, "the converted torch module")
        for name in names:
            diff, limit = _max_diff(maps[name], crops[name], dtype)
            label = f"crops ({cells[0] * cells[1]} windows)"
            checked = None if geometry.padded else limit
            rows.append(VerifyRow(size, cells, label, diff, checked, head=name))
            if expected is not None:
                own = expected[name][0, :, : cells[0], : cells[1]]
                diff, limit = _max_diff(maps[name], own, dtype)
                rows.append(VerifyRow(size, cells, "converted torch module", diff, limit, name))
    return VerifyReport(rows=tuple(rows), padded=geometry.padded, dtype=dtype.name)


def _graph_outputs(dense_path) -> list[str]:
    """The dense model's output names in graph order (a tuple forward's order)."""
    model = onnx.load(str(dense_path), load_external_data=False)
    return [value.name for value in model.graph.output]


def precision_table(dense_path: str | os.PathLike, *, seed: int = 0) -> str:
    """How far each faster precision's map is from fp32 on this model (informative, not a
    pass/fail check): fp16 as served by the engine, on a random image of R + 3S pixels.
    Measured on this machine's device; GPU fp16 kernels round alike but sum in another order.
    """
    from service.engine import Engine, EngineConfig

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
    return "\n".join(lines)
