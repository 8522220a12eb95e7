"""Multi-head classifiers for the converter tests (tests/convert/test_convert_heads*.py).

A shared unpadded conv trunk (window 12, stride 2, trunk output 5 x 4 x 4) with class
logits and 4 box values, in the forms users write: a dict or a tuple forward, heads that
share a first Linear, a sigmoid head, a global-pool head beside a flatten head. The
reference for every dense map is the classifier itself, run crop by crop in float64 and
split into its outputs: independent of the converter.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tests.support.oracle import crop_by_crop, onnx_classifier, torch_classifier

WINDOW = (12, 12)
STRIDE = (2, 2)


def _trunk() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 2), nn.ReLU()
    )


class TwoHeads(nn.Module):
    """Class logits (3) and box regression (4) from one trunk, each from its own Linears.

    ``form``: "dict" returns {"scores", "boxes"}, "tuple" returns (scores, boxes);
    ``shared``: both heads read one shared Linear + BatchNorm1d + PReLU first;
    ``sigmoid``: a third head of 2 per-attribute sigmoids (dict key "attributes");
    ``softmax``: the class head ends in a softmax (probabilities).
    """

    def __init__(self, *, form="dict", shared=False, sigmoid=False, softmax=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.form, self.shared, self.softmax = form, shared, softmax
        self.features = _trunk()
        width = 16 if shared else 80
        if shared:
            self.common = nn.Sequential(
                nn.Linear(80, 16), nn.BatchNorm1d(16), nn.PReLU(16), nn.Dropout(0.5)
            )
            bn = self.common[1]
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
        self.classes = nn.Sequential(nn.Linear(width, 8), nn.ReLU(), nn.Linear(8, 3))
        self.boxes = nn.Linear(width, 4)
        self.attributes = nn.Linear(width, 2) if sigmoid else None

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        if self.shared:
            x = self.common(x)
        scores = self.classes(x)
        if self.softmax:
            scores = torch.softmax(scores, dim=1)
        out = {"scores": scores, "boxes": self.boxes(x)}
        if self.attributes is not None:
            out["attributes"] = torch.sigmoid(self.attributes(x))
        return out if self.form == "dict" else tuple(out.values())


class PooledAndFlat(nn.Module):
    """Two reads of one trunk: class logits from a global average pool, boxes from the
    flattened volume."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.features = _trunk()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classes = nn.Linear(5, 3)
        self.boxes = nn.Linear(80, 4)

    def forward(self, x):
        x = self.features(x)
        return {"scores": self.classes(self.pool(x).flatten(1)), "boxes": self.boxes(x.flatten(1))}


def output_arrays(value, names) -> dict[str, np.ndarray]:
    """A forward's result (tensor, tuple or dict) as {head name: array}, tuple in order."""
    if isinstance(value, dict):
        return {name: value[name].detach().numpy() for name in names}
    if isinstance(value, torch.Tensor):
        value = (value,)
    return {name: v.detach().numpy() for name, v in zip(names, value, strict=True)}


def crop_outputs64(model: nn.Module, image64: np.ndarray, names, *, window=WINDOW, stride=STRIDE):
    """{head: [F, n_h, n_w]}: the crop-by-crop oracle on a float64 copy of the classifier,
    its outputs (tensor, tuple or dict) named by ``names``."""
    classify = torch_classifier(model)

    def named(crops: np.ndarray) -> dict[str, np.ndarray]:
        value = classify(crops)
        if isinstance(value, dict):
            return {name: value[name] for name in names}
        value = value if isinstance(value, tuple) else (value,)
        return dict(zip(names, value, strict=True))

    maps = crop_by_crop(named, image64, window=window, stride=stride, batched=True)
    return {name: score_map[0] for name, score_map in maps.items()}


def onnx_crop_outputs64(classifier, image64, *, window=WINDOW, stride=STRIDE):
    """{output name: [F, n_h, n_w]}: the crop-by-crop oracle on an ONNX classifier (float64)."""
    classify = onnx_classifier(classifier, every_output=True)
    maps = crop_by_crop(classify, image64, window=window, stride=stride)
    return {name: score_map[0] for name, score_map in maps.items()}
