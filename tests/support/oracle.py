"""The crop-by-crop oracle: the reference every exact dense map in the suite is checked against.

By definition, cell (i, j) of the dense score map of a window classifier (window
R = (r_h, r_w), cell stride S = (s_h, s_w)) is the classifier's output on the R-sized crop
of the image whose top-left corner is (i * s_h, j * s_w); an image of size W has
n = (W - R) // S + 1 cells per axis (:func:`cell_counts`). :func:`crop_by_crop` computes exactly
that: it cuts every crop and runs the classifier on it. Nothing of the code under test
(geometry, head rewrite, cell crop, engine) takes part, only the classifier itself, so a
map equal to it is right by construction, whatever the converter or the engine did.

It is the reference for unpadded nets (and padded ones at cells whose crop holds no
padding): a padded trunk gives border cells that see pixels where a crop sees zero padding,
and those tests compare with the trunk-window reference of ``verify`` instead.

The classifier is any callable from a batch of crops to its outputs (an array, a tuple or
a dict of arrays, each [B, F] or [B, F, 1, 1]); the adapters below wrap the three kinds the
tests hold: a torch module (:func:`torch_classifier`), an ONNX graph run in float64 by
onnx.reference (:func:`onnx_classifier`) and an onnxruntime session, as the engine runs its
model (:func:`session_classifier`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

FP64_TOLERANCE = 1e-9  # float64 dense map vs float64 crops: the same sums, rounded apart


def cell_counts(
    size: Sequence[int], window: Sequence[int], stride: Sequence[int]
) -> tuple[int, ...]:
    """n = (W - R) // S + 1 cells per axis: the crops that fit in the image."""
    return tuple((n - r) // s + 1 for n, r, s in zip(size, window, stride, strict=True))


def crop_by_crop(
    classify: Callable[[np.ndarray], Any],
    images: np.ndarray,
    *,
    window: Sequence[int],
    stride: Sequence[int],
    cells: Sequence[int] | None = None,
    channels_last: bool = False,
    batched: bool = False,
):
    """The classifier on every window crop of ``images``, laid out as a dense map.

    ``images`` is a batch, NCHW (NHWC with ``channels_last``). Cell (i, j) holds
    ``classify`` of the crop at (i * stride[0], j * stride[1]) of size ``window``; ``cells``
    (n_h, n_w) defaults to every crop that fits. ``classify`` gets one window position at a
    time ([N, C, r_h, r_w]), or with ``batched`` every crop in one call (crop-major: the N
    images of crop (0, 0), then of (0, 1), ...), which is faster in torch.

    Returns [N, F, n_h, n_w] per output of ``classify``: one array, or a tuple or a dict of
    them, as ``classify`` returns.
    """
    row_axis = 1 if channels_last else 2
    size = images.shape[row_axis : row_axis + 2]
    n_h, n_w = cells if cells is not None else cell_counts(size, window, stride)
    positions = [(i, j) for i in range(n_h) for j in range(n_w)]

    def crop_at(i: int, j: int) -> np.ndarray:
        top, left = i * stride[0], j * stride[1]
        rows, columns = slice(top, top + window[0]), slice(left, left + window[1])
        crop = images[:, rows, columns] if channels_last else images[:, :, rows, columns]
        return np.ascontiguousarray(crop)

    if batched:
        per_call = [_named(classify(np.concatenate([crop_at(i, j) for i, j in positions])))]
    else:
        per_call = [_named(classify(crop_at(i, j))) for i, j in positions]
    kind = per_call[0][0]
    batch = images.shape[0]
    maps = {}
    for key in per_call[0][1]:
        values = np.stack([_one_cell(outputs[key], key) for _, outputs in per_call])
        maps[key] = values.reshape(n_h, n_w, batch, -1).transpose(2, 3, 0, 1)
    if kind == "dict":
        return maps
    if kind == "tuple":
        return tuple(maps[index] for index in range(len(maps)))
    return maps[0]


def _one_cell(value, key) -> np.ndarray:
    """A crop's output, [B, F] or [B, F, 1, 1], flattened; anything else is no classifier."""
    value = np.asarray(value)
    assert value.ndim >= 2 and all(n == 1 for n in value.shape[2:]), (
        f"output {key!r} of one crop has shape {value.shape}: a classifier gives one cell"
    )
    return value.reshape(-1)


def _named(outputs) -> tuple[str, dict]:
    if isinstance(outputs, dict):
        return "dict", outputs
    if isinstance(outputs, tuple | list):
        return "tuple", dict(enumerate(outputs))
    return "array", {0: outputs}


def torch_classifier(module, dtype: str = "float64") -> Callable[[np.ndarray], Any]:
    """A torch classifier as ``classify``: a copy in ``dtype``, eval mode, no grad (the
    module itself is left as it was). Crops are cast to ``dtype``."""
    import copy

    import torch

    torch_dtype = getattr(torch, dtype)
    model = copy.deepcopy(module).to(torch_dtype).eval()

    def to_numpy(value):
        if isinstance(value, dict):
            return {name: v.detach().numpy() for name, v in value.items()}
        if isinstance(value, tuple | list):
            return tuple(v.detach().numpy() for v in value)
        return value.detach().numpy()

    def classify(crops: np.ndarray):
        with torch.no_grad():
            return to_numpy(model(torch.from_numpy(crops.astype(dtype, copy=False))))

    return classify


def onnx_classifier(model, *, every_output: bool = False) -> Callable[[np.ndarray], Any]:
    """An ONNX classifier (a ModelProto) run in float64 by onnx.reference as ``classify``:
    its first output, or {output name: array} with ``every_output``."""
    from densemap.convert.runtime import Float64Runner

    run = Float64Runner(model)
    return run.outputs if every_output else run


def session_classifier(session, outputs: Sequence[str] | None = None):
    """An onnxruntime session as ``classify`` (its input's dtype as the session runs it):
    the first output, or {name: array} for the named ``outputs``."""
    name = session.get_inputs()[0].name

    def classify(crops: np.ndarray):
        if outputs is None:
            return session.run(None, {name: crops})[0]
        return dict(zip(outputs, session.run(list(outputs), {name: crops}), strict=True))

    return classify
