"""What ``--verify`` compares a dense model with: the classifier on windows of R and crops,
and the exact reference, its own head on every window of its own trunk's output
(:mod:`densemap.convert.trunk_windows`).

An ONNX classifier is split once into trunk and head; the classifier on a window is then
head(trunk(window)), the same ops, so the whole classifier is never held beside its two
parts (memory: a VGG's 500 MB once). A torch classifier runs as itself on windows and crops,
and is exported to ONNX at R in memory (legacy exporter, else dynamo) to be cut the same
way. Where the classifier cannot be cut, ``exact_unavailable`` says why and only crops (and
the torch path's converted module) remain.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from densemap.convert.classifier_runner import (
    CROP_BATCH,
    Classifier,
    by_head,
    load_runnable_classifier,
    run_in_batches,
)
from densemap.convert.float64 import Float64Runner, detach_weights
from densemap.convert.runtime import OrtRunner
from densemap.convert.trunk_windows import Cut, TrunkNotDense, find_cut, split
from densemap.service.errors import ConversionError

Pair = tuple[int, int]


class _Parts:
    """Trunk and head of an ONNX classifier, run in one dtype."""

    def __init__(self, detached, cut: Cut, dtype) -> None:
        """``detached``: [(light trunk, its weights), (light head, its weights)], the weights
        shared by every runner made from them (:func:`densemap.convert.float64.detach_weights`)."""
        batch = detached[0][0].graph.input[0].type.tensor_type.shape.dim[0]
        self.fixed_batch = batch.dim_value if batch.HasField("dim_value") else None
        self.cut = cut
        if np.dtype(dtype) == np.float64:
            self.trunk, self.head = (Float64Runner(part, weights) for part, weights in detached)
        else:
            self.trunk, self.head = (
                OrtRunner(part.SerializeToString(), low_memory=True, weights=weights)
                for part, weights in detached
            )

    def run(self, windows: np.ndarray) -> list[np.ndarray]:
        """The classifier's outputs on a batch of windows of R, in graph order."""
        return self._heads(self._features(windows))

    def _features(self, images: np.ndarray) -> np.ndarray:
        (features,) = run_in_batches(self.trunk.outputs, images, self.fixed_batch)
        return features

    def _heads(self, features: np.ndarray) -> list[np.ndarray]:
        parts = [
            run_in_batches(
                self.head.outputs, features[start : start + CROP_BATCH], self.fixed_batch
            )
            for start in range(0, len(features), CROP_BATCH)
        ]
        return [np.concatenate(values) for values in zip(*parts, strict=True)]

    def trunk_windows(self, image: np.ndarray, *, stride: Pair, cells: Pair) -> list[np.ndarray]:
        """Each output (graph order) of the head on the trunk's windows, [n_h * n_w, ...]."""
        cut, size = self.cut, _size(image, self.cut.layout)
        k = []
        for s, jump in zip(stride, cut.jump, strict=True):
            if s % jump:
                raise TrunkNotDense(
                    f"the stride {s} is not a multiple of the trunk's stride {jump} at the "
                    f"head's input {cut.feature!r}"
                )
            k.append(s // jump)
        try:
            features = self._features(image)[:1]
        except Exception as exc:  # noqa: BLE001 - onnxruntime or onnx.reference, any type
            reason = " ".join(str(exc).split())[:200]
            raise TrunkNotDense(
                f"the classifier's trunk does not run on a {size[0]}x{size[1]} image "
                f"({reason}): it holds a constant that depends on its input size R"
            ) from None
        have = [features.shape[axis] for axis in cut.axes]
        need = [(n - 1) * f + h for n, f, h in zip(cells, k, cut.size, strict=True)]
        if any(h < n for h, n in zip(have, need, strict=True)):
            raise TrunkNotDense(
                f"the classifier's trunk gives {have[0]}x{have[1]} positions of "
                f"{cut.feature!r} on a {size[0]}x{size[1]} image, fewer than the "
                f"{need[0]}x{need[1]} its {cells[0]}x{cells[1]} windows need"
            )
        windows = []
        for i in range(cells[0]):
            for j in range(cells[1]):
                index = [slice(None)] * features.ndim
                index[cut.axes[0]] = slice(i * k[0], i * k[0] + cut.size[0])
                index[cut.axes[1]] = slice(j * k[1], j * k[1] + cut.size[1])
                windows.append(features[tuple(index)])
        return self._heads(np.concatenate(windows))


class Reference:
    """The classifier for one verification: ``classify`` (windows, crops; a
    :class:`~densemap.convert.classifier_runner.Classifier`-like object) and
    :meth:`trunk_windows`, the exact reference, unless ``exact_unavailable`` says why not."""

    def __init__(self, classifier, dtype, names: list[str], *, window: Pair, channels: int):
        self.names = list(names)
        self.dtype = np.dtype(dtype)
        self.exact_unavailable = ""
        self._parts = None
        self._split = None
        self.cut: Cut | None = None
        if isinstance(classifier, (str, os.PathLike)):
            model = load_runnable_classifier(Path(classifier))
            try:
                self._split, self.cut = _cut(model)
            except ConversionError as exc:
                self.exact_unavailable = str(exc)
                del model
                self.classify = Classifier(classifier, self.dtype, self.names)
                return
            del model  # now the head, its weights detached: freed
            self.classify = _PartsClassifier(self)
        else:
            self.classify = Classifier(classifier, self.dtype, self.names)
            try:
                self._split, self.cut = _cut(
                    _export(classifier, window, channels, self.dtype, names)
                )
            except ConversionError as exc:
                self.exact_unavailable = str(exc)

    @property
    def cut_label(self) -> str:
        """Where the classifier was cut, for the report ("" when it was not)."""
        if self.cut is None:
            return ""
        return f"{self.cut.feature!r}, {self.cut.size[0]}x{self.cut.size[1]} at R"

    def parts(self, dtype=None) -> _Parts:
        """The trunk and head in ``dtype`` (the verification's own: made once)."""
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        if self._split is None:
            raise ConversionError(self.exact_unavailable or "the classifier was let go")
        if dtype != self.dtype:
            return _Parts(self._split, self.cut, dtype)
        if self._parts is None:
            self._parts = _Parts(self._split, self.cut, dtype)
        return self._parts

    def trunk_windows(self, image, *, stride: Pair, cells: Pair) -> dict[str, np.ndarray]:
        """{head: [channels, n_h, n_w]}: the head on every window of the trunk's output."""
        outputs = self.parts().trunk_windows(image, stride=stride, cells=cells)
        scores = by_head(outputs, self.names, "the classifier's head")
        return {
            name: value.reshape(cells[0], cells[1], -1).transpose(2, 0, 1)
            for name, value in scores.items()
        }

    def close(self) -> None:
        """Frees the parts and their sessions (before the dense nets run: memory)."""
        self._parts = None
        self._split = None


class _PartsClassifier:
    """An ONNX classifier run as head(trunk(window)): the interface of
    :class:`~densemap.convert.classifier_runner.Classifier`."""

    torch_module = None

    def __init__(self, reference: Reference) -> None:
        self.reference = reference
        self.names = reference.names

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.reference.parts().run(batch)
        return by_head(outputs, self.names, "the classifier")

    def float64_run(self):
        parts = self.reference.parts(np.float64)
        return lambda batch: by_head(parts.run(batch), self.names, "the classifier")


def _cut(model: onnx.ModelProto) -> tuple[list, Cut]:
    """([(light trunk, weights), (light head, weights)], the cut); ``model`` is consumed."""
    cut = find_cut(model)
    parts = split(model, cut)
    del model
    return [detach_weights(part) for part in parts], cut


def _export(module, window: Pair, channels: int, dtype: np.dtype, names) -> onnx.ModelProto:
    """The torch classifier as an ONNX file at R (in memory), for cutting."""
    import torch

    from densemap.convert.export import export_classifier_onnx

    wanted = torch.float64 if dtype == np.float64 else torch.float32
    errors = []
    for dynamo in (False, True):
        try:
            return export_classifier_onnx(
                module, input_size=window, in_channels=channels, dynamo=dynamo, dtype=wanted,
                output_names=names,
            )  # fmt: skip
        except ConversionError as exc:
            errors.append(str(exc))
    raise ConversionError(f"the classifier could not be cut: {errors[-1]}")


def _size(image: np.ndarray, layout: str) -> Pair:
    return tuple(image.shape[2:4] if layout == "NCHW" else image.shape[1:3])
