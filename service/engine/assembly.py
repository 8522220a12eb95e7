"""Assembling one scale's outputs from its passes and tiles, which the device computed.

Each pass (or tile) returns, for the cells it keeps, only what the caller asked for: map
values, per-cell top-k and argmax, plus the per-class sum of cell probabilities and a count
of non-finite raw values, and the map of each extra head asked for (cropped to the same
cells, :mod:`densemap.service.engine.heads`). :class:`MapAssembly` writes them where the cells belong in the
final map (``Placement``: rows and columns as ranges, stepped for shift-and-stitch) and
turns the whole into a :class:`~densemap.service.engine.result.ScaleMap`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from densemap.service.contract import Pair
from densemap.service.engine import graphs
from densemap.service.engine.heads import head_key
from densemap.service.engine.onnxruntime_package import ort
from densemap.service.engine.postprocess import OutputPlan
from densemap.service.engine.result import MapGeometry, ScaleMap
from densemap.service.engine.runtime import Runtime
from densemap.service.errors import ModelLoadError

Placement = Callable[[dict[str, np.ndarray], range, range], None]


class PostprocessCall:
    """One request's postprocess graph inputs and the outputs it fetches."""

    def __init__(self, plan: OutputPlan, *, detect=None) -> None:
        """``detect``: a DetectionPlan (classes, threshold) whose cells above the threshold
        come back too, sparse (densemap.service.engine.detections)."""
        self.plan = plan
        self.detect = detect
        outputs = [graphs.PROB_SUM, graphs.NONFINITE]
        if detect is not None:
            outputs += [graphs.ABOVE_CELLS, graphs.ABOVE_SCORES]
        if plan.include_map:
            outputs.append(graphs.MAP)
        if plan.top_k:
            outputs += [graphs.TOP_VALUES, graphs.TOP_INDICES]
        if plan.argmax:
            outputs.append(graphs.ARGMAX)
        self.outputs = tuple(outputs)
        self._host = {}
        if plan.top_k:
            self._host[graphs.K] = np.array([plan.top_k], np.int64)
        if plan.classes is not None:
            self._host[graphs.CLASSES] = np.array(plan.classes, np.int64)
        if detect is not None:
            self._host[graphs.DETECT_CLASSES] = np.array(detect.classes, np.int64)
            self._host[graphs.THRESHOLD] = np.array([detect.threshold], np.float32)

    @property
    def head_names(self) -> tuple[str, ...]:
        """The extra heads (ONNX outputs) a pass must bind besides the primary one."""
        return tuple(head.name for head in self.plan.heads)

    def run(
        self,
        runtime: Runtime,
        raw: ort.OrtValue,
        cells: tuple[int, int, int, int],
        *,
        raw_dtype,
        heads: dict[str, ort.OrtValue] | None = None,
    ) -> dict[str, np.ndarray]:
        """The outputs for cells [r0, r1) x [c0, c1) of the raw map ``raw`` [1, C, h, w]
        and of each extra head's raw map in ``heads``."""
        spec = graphs.PostprocessSpec(
            raw_dtype=raw_dtype,
            model_gives_probabilities=self.plan.model_gives_probabilities,
            return_probabilities=self.plan.probabilities,
            select_classes=self.plan.classes is not None,
            out_dtype=np.dtype(self.plan.dtype).name,
            detect=self.detect is not None,
            include_map=self.plan.include_map,
            top_k=bool(self.plan.top_k),
            argmax=self.plan.argmax,
        )
        host = dict(self._host)
        host[graphs.STARTS] = np.array(cells[:2], np.int64)
        host[graphs.ENDS] = np.array(cells[2:], np.int64)
        session = runtime.postprocess_session(spec)
        parts = runtime.run_to_host(session, {graphs.RAW: raw}, host, self.outputs)
        if heads:
            out_dtype = np.dtype(self.plan.dtype).name
            head = runtime.head_session(graphs.HeadSpec(raw_dtype=raw_dtype, out_dtype=out_dtype))
            corners = {graphs.STARTS: host[graphs.STARTS], graphs.ENDS: host[graphs.ENDS]}
            wanted = (graphs.HEAD_MAP, graphs.NONFINITE)
            for name, value in heads.items():
                found = runtime.run_to_host(head, {graphs.RAW: value}, corners, wanted)
                parts[head_key(name)] = found[graphs.HEAD_MAP]
                parts[graphs.NONFINITE] = parts[graphs.NONFINITE] + found[graphs.NONFINITE]
        return parts


class MapAssembly:
    """The arrays of one scale's map, filled pass by pass."""

    def __init__(self, plan: OutputPlan, *, cells: Pair, num_classes: int) -> None:
        n_h, n_w = cells
        selected = num_classes if plan.classes is None else len(plan.classes)
        self.plan = plan
        self.cells = (int(n_h), int(n_w))
        self.arrays: dict[str, np.ndarray] = {}
        if plan.include_map:
            self.arrays[graphs.MAP] = np.empty((selected, n_h, n_w), plan.dtype)
        if plan.top_k:
            self.arrays[graphs.TOP_VALUES] = np.empty((plan.top_k, n_h, n_w), plan.dtype)
            self.arrays[graphs.TOP_INDICES] = np.empty((plan.top_k, n_h, n_w), np.int32)
        if plan.argmax:
            self.arrays[graphs.ARGMAX] = np.empty((n_h, n_w), np.int32)
        for head in plan.heads:
            self.arrays[head_key(head.name)] = np.empty((head.channels, n_h, n_w), plan.dtype)
        self.probability_sum = np.zeros(num_classes, np.float64)
        self.nonfinite = 0
        self.filled = 0
        self._above: list[tuple[np.ndarray, ...]] = []  # (channel, row, col, score) per pass

    def place(self, parts: dict[str, np.ndarray], rows: range, cols: range) -> None:
        """Write one pass's outputs at map rows ``rows`` and columns ``cols``."""
        where = (slice(rows.start, rows.stop, rows.step), slice(cols.start, cols.stop, cols.step))
        for name, target in self.arrays.items():
            part = parts[name]
            if name == graphs.TOP_VALUES or name == graphs.TOP_INDICES:
                part = part[: self.plan.top_k]
            view = target[(..., *where)]
            if view.shape != part.shape:
                raise ModelLoadError(
                    f"a pass gave {part.shape} values for {view.shape} map positions: the "
                    "metadata geometry is wrong; reconvert the model"
                )
            view[...] = part
        self.probability_sum += parts[graphs.PROB_SUM]
        self.nonfinite += int(parts[graphs.NONFINITE])
        self.filled += len(rows) * len(cols)
        if graphs.ABOVE_CELLS in parts:  # the pass's own cell indices -> the map's
            channel, row, col = parts[graphs.ABOVE_CELLS]
            self._above.append(
                (
                    channel,
                    rows.start + row * rows.step,
                    cols.start + col * cols.step,
                    parts[graphs.ABOVE_SCORES].astype(np.float32, copy=False),
                )
            )

    def above(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(detection-class index, row, column, probability) of every cell at or above the
        detection threshold, over all passes."""
        if not self._above:
            empty = np.zeros(0, np.int64)
            return empty, empty, empty, np.zeros(0, np.float32)
        return tuple(np.concatenate(part) for part in zip(*self._above, strict=True))

    def scale_map(self, geometry: MapGeometry) -> tuple[ScaleMap, np.ndarray]:
        """The ScaleMap and this scale's mean cell probabilities (float64)."""
        count = self.cells[0] * self.cells[1]
        if self.filled != count:
            raise ModelLoadError(
                f"the passes filled {self.filled} of {count} cells: the metadata geometry "
                "is wrong; reconvert the model"
            )
        result = ScaleMap(geometry=geometry, classes=self.plan.classes, cells=self.cells)
        result.scores = self.arrays.get(graphs.MAP)
        result.top_k_scores = self.arrays.get(graphs.TOP_VALUES)
        result.top_k_indices = self.arrays.get(graphs.TOP_INDICES)
        result.argmax = self.arrays.get(graphs.ARGMAX)
        result.head_maps = {head.name: self.arrays[head_key(head.name)] for head in self.plan.heads}
        return result, self.probability_sum / count
