"""The original classifier as :mod:`convert.verify`'s reference: run on window crops.

:class:`Classifier` runs a torch module or an ONNX file on a batch of crops (in float32 or
float64) and returns its outputs by head name: one tensor, a tuple (in the dense graph's
output order, which is the forward's), a dict (by key) or ONNX outputs (by name).
:func:`crop_scores` cuts every window of an image and returns ``[channels, n_h, n_w]``
per head.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import onnx

from convert.from_onnx.graph import image_input
from convert.runtime import Float64Runner, OrtRunner
from service.contract import ModelMetadata
from service.errors import ConversionError

Pair = tuple[int, int]
CROP_BATCH = 32


def by_head(value, names: list[str], what: str) -> dict[str, np.ndarray]:
    """A model's result (one tensor, a tuple/list in the dense graph's output order, or a
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
    return {name: np.asarray(v) for name, v in zip(names, value, strict=True)}


class Classifier:
    """Runs the original classifier on a batch of crops (torch module or ONNX file); its
    outputs come back by head name."""

    def __init__(self, classifier, dtype: np.dtype, names: list[str]) -> None:
        self.torch_module = None
        if isinstance(classifier, (str, os.PathLike)):
            run = _onnx_classifier(Path(classifier), dtype)
            self.run = lambda batch: by_head(run(batch), names, "the classifier")
        else:
            import torch

            module = copy.deepcopy(classifier).eval()
            module = module.double() if dtype == np.float64 else module.float()
            self.torch_module = module

            def as_numpy(value):
                if isinstance(value, dict):
                    return {key: v.numpy() for key, v in value.items()}
                if isinstance(value, (tuple, list)):
                    return [v.numpy() for v in value]
                return value.numpy()

            def run(batch: np.ndarray) -> dict[str, np.ndarray]:
                with torch.no_grad():
                    value = as_numpy(module(torch.from_numpy(batch)))
                return by_head(value, names, "the classifier")

            self.run = run
            self.as_numpy = as_numpy


def _onnx_classifier(path: Path, dtype: np.dtype):
    """A function running the ONNX classifier on a batch: its outputs, in graph order."""
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise ConversionError(f"cannot read the classifier {path}: {exc}") from None
    batch_dim = image_input(model.graph).type.tensor_type.shape.dim[0]
    fixed_batch = batch_dim.dim_value if batch_dim.HasField("dim_value") else None
    single = Float64Runner(model) if dtype == np.float64 else OrtRunner(model.SerializeToString())

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        if fixed_batch is None:
            return single.outputs(batch)
        chunks = []
        for start in range(0, len(batch), fixed_batch):
            chunk = batch[start : start + fixed_batch]
            padded = np.concatenate([chunk] + [chunk[-1:]] * (fixed_batch - len(chunk)))
            chunks.append({k: v[: len(chunk)] for k, v in single.outputs(padded).items()})
        return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}

    return run


def crop_scores(classify, image, meta: ModelMetadata, cells: Pair) -> dict[str, np.ndarray]:
    """{head: [channels, n_h, n_w]}: the classifier on every window crop."""
    (r_h, r_w), (s_h, s_w) = meta.geometry.window, meta.geometry.stride
    nchw = meta.preprocessing.layout == "NCHW"
    crops = []
    for i in range(cells[0]):
        for j in range(cells[1]):
            rows, cols = slice(i * s_h, i * s_h + r_h), slice(j * s_w, j * s_w + r_w)
            crops.append(image[:, :, rows, cols] if nchw else image[:, rows, cols, :])
    batch = np.concatenate(crops)
    parts = [classify(batch[k : k + CROP_BATCH]) for k in range(0, len(batch), CROP_BATCH)]
    return {
        name: np.concatenate([part[name] for part in parts])
        .reshape(cells[0], cells[1], -1)
        .transpose(2, 0, 1)
        for name in parts[0]
    }
