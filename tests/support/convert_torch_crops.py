"""Crop-by-crop reference for the torch converter tests: cell (i, j) of a dense map must be
the classifier on the window crop at (i*S, j*S), to rounding in fp64."""

from __future__ import annotations

import torch
from torch import nn

from convert.from_torch.fc import fully_convolutional

FP64_TOLERANCE = 1e-9


def crop_scores(model: nn.Module, image_nchw, window, stride) -> torch.Tensor:
    """The classifier on every window crop: (N, K, n_h, n_w), n = (W - R) // S + 1."""
    (height, width), (r_h, r_w), (s_h, s_w) = image_nchw.shape[2:], window, stride
    n_h, n_w = (height - r_h) // s_h + 1, (width - r_w) // s_w + 1
    crops = [
        image_nchw[:, :, i * s_h : i * s_h + r_h, j * s_w : j * s_w + r_w]
        for i in range(n_h)
        for j in range(n_w)
    ]
    with torch.no_grad():
        scores = model.eval()(torch.cat(crops))  # (n_h * n_w * N, K), crop-major
    batch = image_nchw.shape[0]
    return scores.reshape(n_h, n_w, batch, -1).permute(2, 3, 0, 1)


def assert_dense_equals_crops(model, *, window, stride, image_size, in_channels=3):
    torch.manual_seed(0)
    model = model.double().eval()
    dense = fully_convolutional(model, input_size=window, in_channels=in_channels)
    image_nchw = torch.rand(2, in_channels, *image_size, dtype=torch.float64)
    expected = crop_scores(model, image_nchw, window, stride)
    with torch.no_grad():
        score_map = dense(image_nchw)
    n_h, n_w = expected.shape[2:]
    assert score_map.shape[2] >= n_h and score_map.shape[3] >= n_w
    diff = (score_map[:, :, :n_h, :n_w] - expected).abs().max().item()
    assert diff <= FP64_TOLERANCE, diff
    return dense, score_map
