"""The original classifier, run on window crops for ``--verify``: a torch module or an ONNX
file, in float32 or float64 (onnxruntime has no double Conv: float64 ONNX runs go through
onnx's reference evaluator, :class:`densemap.convert.runtime.Float64Runner`).

Its outputs come back by head name (:func:`by_head`): one tensor, a tuple or ONNX outputs
(in the dense graph's output order, which is the forward's), or a dict (by key)."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from densemap.convert.from_onnx.canonical import make_runnable
from densemap.convert.from_onnx.graph import image_input
from densemap.convert.runtime import Float64Runner, OrtRunner
from densemap.service.contract import Geometry
from densemap.service.errors import ConversionError

Pair = tuple[int, int]
Run = Callable[[np.ndarray], dict[str, np.ndarray]]
CROP_BATCH = 8  # windows per classifier call: a big net's activations stay small


def by_head(value, names: list[str], what: str) -> dict[str, np.ndarray]:
    """A model's result (one array, a tuple/list in the dense graph's output order, or a
    dict by head name) as {head name: array}."""
    if isinstance(value, dict):
        missing = [name for name in names if name not in value]
        if missing:
            raise ConversionError(
                f"{what} returns the keys {list(value)}, but the dense model's heads are "
                f"{names}: verify the classifier the model was converted from"
            )
        value = [value[name] for name in names]
    elif not isinstance(value, (tuple, list)):
        value = [value]
    if len(value) != len(names):
        raise ConversionError(
            f"{what} returns {len(value)} outputs, but the dense model has {len(names)} heads "
            f"({', '.join(names)}): verify the classifier the model was converted from"
        )
    return {name: _as_scores(np.asarray(v)) for name, v in zip(names, value, strict=True)}


def _as_scores(value: np.ndarray) -> np.ndarray:
    """[N, C] scores; a classifier written with convolutions only (DenseNet as Caffe2 wrote
    it) returns them as [N, C, 1, 1]."""
    return value[:, :, 0, 0] if value.ndim == 4 and value.shape[2:] == (1, 1) else value


class Classifier:
    """Runs the original classifier on a batch of windows in ``dtype``, returning its
    outputs by head name; ``float64_run()`` gives a float64 twin (for the rounding
    measurement)."""

    def __init__(self, classifier, dtype: np.dtype, names: list[str]) -> None:
        self._source = classifier
        self.names = list(names)
        self.torch_module = None
        if isinstance(classifier, (str, os.PathLike)):
            self.run = self._by_head(_onnx_classifier(Path(classifier), dtype))
        else:
            self.torch_module = _torch_copy(classifier, dtype)
            self.run = self._by_head(_torch_run(self.torch_module))

    def float64_run(self) -> Run:
        if self.torch_module is None:
            return self._by_head(_onnx_classifier(Path(self._source), np.dtype(np.float64)))
        return self._by_head(_torch_run(_torch_copy(self._source, np.dtype(np.float64))))

    def module_outputs(self, module, image: np.ndarray) -> dict[str, np.ndarray]:
        """The converted torch module (same structure as the classifier) on ``image``."""
        return self._by_head(_torch_run(module), what="the converted torch module")(image)

    def _by_head(self, run, what: str = "the classifier") -> Run:
        return lambda batch: by_head(run(batch), self.names, what)


def _torch_copy(classifier, dtype: np.dtype):
    """``classifier`` in eval mode and ``dtype``: copied only when that changes it (a
    VGG-16 copy is 0.5 GB), so the caller's module is never modified."""
    import torch

    wanted = torch.float64 if dtype == np.float64 else torch.float32
    tensors = [
        t for t in (*classifier.parameters(), *classifier.buffers()) if t.is_floating_point()
    ]
    if not any(m.training for m in classifier.modules()) and all(
        t.dtype == wanted for t in tensors
    ):
        return classifier
    return copy.deepcopy(classifier).eval().to(wanted)


def _torch_run(module):
    """Runs ``module``: its result with every tensor as numpy (a dict, list or array)."""
    import torch

    def as_numpy(value):
        if isinstance(value, dict):
            return {key: v.numpy() for key, v in value.items()}
        if isinstance(value, (tuple, list)):
            return [v.numpy() for v in value]
        return value.numpy()

    def run(batch: np.ndarray):
        with torch.no_grad():
            return as_numpy(module(torch.from_numpy(batch)))

    return run


def load_runnable_classifier(path: Path) -> onnx.ModelProto:
    """The ONNX classifier at ``path`` as onnxruntime runs it (IR 3 weights as initializers,
    opset < 7 upgraded: :func:`make_runnable`, on the loaded model itself)."""
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise ConversionError(f"cannot read the classifier {path}: {exc}") from None
    return make_runnable(model)


def _onnx_classifier(path: Path, dtype: np.dtype):
    """Runs the ONNX classifier on a batch: its outputs as a list, in graph order."""
    model = load_runnable_classifier(path)
    batch_dim = image_input(model.graph).type.tensor_type.shape.dim[0]
    fixed_batch = batch_dim.dim_value if batch_dim.HasField("dim_value") else None
    if dtype == np.float64:
        single = Float64Runner(model)
    else:
        single = OrtRunner(model.SerializeToString(), low_memory=True)
    del model
    return lambda batch: run_in_batches(single.outputs, batch, fixed_batch)


def run_in_batches(
    outputs: Callable[[np.ndarray], dict[str, np.ndarray]], batch: np.ndarray, fixed: int | None
) -> list[np.ndarray]:
    """Every output of ``outputs`` (a runner's, by name) on ``batch``, in graph order; a
    model with a ``fixed`` batch size runs on chunks of it (the last one padded)."""
    if fixed is None:
        return list(outputs(batch).values())
    chunks = []
    for start in range(0, len(batch), fixed):
        chunk = batch[start : start + fixed]
        padded = np.concatenate([chunk] + [chunk[-1:]] * (fixed - len(chunk)))
        chunks.append([v[: len(chunk)] for v in outputs(padded).values()])
    return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]


def crop_batches(cells: Pair) -> int:
    """How many classifier calls :func:`crop_scores` makes for ``cells``."""
    return -(-(cells[0] * cells[1]) // CROP_BATCH)


def crop_scores(
    run: Run, image: np.ndarray, *, geometry: Geometry, layout: str, cells: Pair, step=None
) -> dict[str, np.ndarray]:
    """{head: [channels, n_h, n_w]}: the classifier on every window crop at ``geometry``'s
    stride; ``step()`` is called after each batch (progress)."""
    (r_h, r_w), (s_h, s_w) = geometry.window, geometry.stride
    crops = []
    for i in range(cells[0]):
        for j in range(cells[1]):
            rows, cols = slice(i * s_h, i * s_h + r_h), slice(j * s_w, j * s_w + r_w)
            crops.append(image[:, :, rows, cols] if layout == "NCHW" else image[:, rows, cols, :])
    batch = np.concatenate(crops)
    parts = []
    for start in range(0, len(batch), CROP_BATCH):
        parts.append(run(batch[start : start + CROP_BATCH]))
        if step is not None:
            step()
    return {
        name: np.concatenate([part[name] for part in parts])
        .reshape(cells[0], cells[1], -1)
        .transpose(2, 0, 1)
        for name in parts[0]
    }
