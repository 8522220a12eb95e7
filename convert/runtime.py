"""onnxruntime on CPU for the converter's checks and verification (no GPU needed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from densemap.convert.float64 import Float64Runner
from densemap.service.errors import ConversionError

__all__ = ["Float64Runner", "OrtRunner", "cpu_session"]

if TYPE_CHECKING:  # onnxruntime is imported when a session is made: `import densemap.convert as convert` stays light
    import onnxruntime as ort

ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
}


def cpu_session(model: str | bytes, *, low_memory: bool = False) -> ort.InferenceSession:
    """An onnxruntime CPU session; errors become :class:`ConversionError`.

    ``low_memory`` (verify: one big net after another) keeps onnxruntime's load near the
    model's size: basic graph optimizations only (the extended ones make transformed copies
    of every conv weight: several times the file's size; docs/convert.md "--verify") and no
    pre-packed copies of the weights."""
    from densemap.service.engine.onnxruntime_package import ort  # checks the install first

    options = ort.SessionOptions()
    options.log_severity_level = 3  # no per-session warnings about missing CUDA
    if low_memory:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ConversionError(f"onnxruntime cannot load the model: {exc}") from None


def numpy_dtype(session: ort.InferenceSession) -> np.dtype:
    kind = session.get_inputs()[0].type
    if kind not in ORT_DTYPES:
        raise ConversionError(f"the model input has type {kind}; expected a float tensor")
    return np.dtype(ORT_DTYPES[kind])


def image_shape(*, layout: str, channels: int, size: tuple[int, int], batch: int = 1):
    """The input tensor shape of ``batch`` images of ``size`` (h, w) in ``layout``."""
    if layout == "NCHW":
        return (batch, channels, *size)
    return (batch, *size, channels)


def run_outputs(
    session: ort.InferenceSession, image: np.ndarray, weights=None
) -> dict[str, np.ndarray]:
    """Every output of one run, by name, in the graph's order; ``weights`` are fed to the
    inputs after the image (:func:`densemap.convert.float64.detach_weights`)."""
    names = [output.name for output in session.get_outputs()]
    try:
        values = session.run(names, {session.get_inputs()[0].name: image, **(weights or {})})
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ConversionError(f"onnxruntime cannot run the model: {exc}") from None
    return dict(zip(names, values, strict=True))


class OrtRunner:
    """Runs an ONNX model with onnxruntime on CPU in its own dtype (``low_memory``: see
    :func:`cpu_session`; ``weights``: fed to every run, see :func:`run_outputs`)."""

    def __init__(self, model: str | bytes, *, low_memory: bool = False, weights=None):
        self.session = cpu_session(model, low_memory=low_memory)
        self.weights = weights or {}
        self.dtype = numpy_dtype(self.session)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return next(iter(self.outputs(image).values()))

    def outputs(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Every output, by name, in the graph's order."""
        return run_outputs(self.session, image.astype(self.dtype), self.weights)
