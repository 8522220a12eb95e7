"""A dense model whose class scores are a known function of the window (no torch).

``square_model(folder)`` writes ``model.onnx``: RGB input, window 8x8, stride 4, classes
``background``, ``red``, ``green``. One 8x8 conv of stride 4 gives, per window, the logits

    z_background = 0,   z_red = GAIN * (mean red - LEVEL),   z_green = GAIN * (mean green - LEVEL)

with channel values in [0, 1] (pixel / 255). An 8x8 red square that exactly fills a window
scores p(red) = softmax = 0.98...; a window half on it scores about 0. :func:`reference_map`
computes the same probabilities in float64 from pixels, for tests that compare boxes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from densemap.service.contract import Geometry, ModelMetadata, Preprocessing
from tests.support.oracle import crop_by_crop

WINDOW = 8
STRIDE = 4
GAIN = 40.0
LEVEL = 0.9
LABELS = ("background", "red", "green")


def square_model(folder: str | Path) -> Path:
    """Write the model into ``folder`` and return the path of its ``model.onnx``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = np.zeros((3, 3, WINDOW, WINDOW), np.float32)
    weights[1, 0] = GAIN / WINDOW**2
    weights[2, 1] = GAIN / WINDOW**2
    bias = np.array([0.0, -GAIN * LEVEL, -GAIN * LEVEL], np.float32)
    graph = helper.make_graph(
        [
            helper.make_node(
                "Conv",
                ["input", "w", "b"],
                ["scores"],
                kernel_shape=[WINDOW, WINDOW],
                strides=[STRIDE, STRIDE],
            )
        ],  # fmt: skip
        "squares",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3, "n_h", "n_w"])],
        [
            helper.make_tensor("w", TensorProto.FLOAT, weights.shape, weights.ravel()),
            helper.make_tensor("b", TensorProto.FLOAT, bias.shape, bias),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    metadata = ModelMetadata(
        geometry=Geometry(
            window=(WINDOW, WINDOW),
            stride=(STRIDE, STRIDE),
            receptive_field=(WINDOW, WINDOW),
            receptive_field_offset=(0, 0),
            effective_window=(WINDOW, WINDOW),
            padded=False,
        ),
        preprocessing=Preprocessing(color="RGB", scale=1 / 255, mean=(0.0,) * 3, std=(1.0,) * 3),
        labels=LABELS,
        output_kind="logits",
        source="tests/support/square_model.py",
    )
    for key, value in metadata.to_props().items():
        model.metadata_props.add(key=key, value=value)
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path


def reference_map(pixels: np.ndarray, stride: int = STRIDE) -> np.ndarray:
    """[3, n_h, n_w] float64 probabilities of uint8 HxWx3 ``pixels`` at ``stride``
    (a divisor of 4), straight from the definition above, by the crop-by-crop oracle."""
    values = pixels.astype(np.float64) / 255.0

    def classify(windows_nhwc: np.ndarray) -> np.ndarray:
        logits = np.zeros((windows_nhwc.shape[0], 3))
        logits[:, 1:] = GAIN * (windows_nhwc[..., :2].mean(axis=(1, 2)) - LEVEL)
        return logits

    logits = crop_by_crop(
        classify, values[None], window=(WINDOW,) * 2, stride=(stride,) * 2, channels_last=True
    )[0]
    exp = np.exp(logits - logits.max(axis=0))
    return exp / exp.sum(axis=0)


def squares_image(height: int, width: int, squares) -> np.ndarray:
    """A black uint8 HxWx3 image with (channel, top, left, size) squares at full value."""
    image = np.zeros((height, width, 3), np.uint8)
    for channel, top, left, size in squares:
        image[top : top + size, left : left + size, channel] = 255
    return image
