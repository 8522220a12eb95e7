"""onnxruntime on CPU for the converter's checks and verification (no GPU needed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from service.errors import ConversionError

if TYPE_CHECKING:  # onnxruntime is imported when a session is made: `import convert` stays light
    import onnxruntime as ort

ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
}


def cpu_session(model: str | bytes) -> ort.InferenceSession:
    """An onnxruntime CPU session; errors become :class:`ConversionError`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # no per-session warnings about missing CUDA
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


def run_scores(session: ort.InferenceSession, image: np.ndarray) -> np.ndarray:
    """The first output of one run, as an array."""
    return next(iter(run_outputs(session, image).values()))


def run_outputs(session: ort.InferenceSession, image: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of one run, by name, in the graph's order."""
    names = [output.name for output in session.get_outputs()]
    try:
        values = session.run(names, {session.get_inputs()[0].name: image})
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ConversionError(f"onnxruntime cannot run the model: {exc}") from None
    return dict(zip(names, values, strict=True))


def to_float64(model):
    """A float64 copy of an ONNX model, to be run with ``onnx.reference``.

    onnxruntime has no double Conv/AveragePool kernels, so fp64 exactness checks evaluate
    the graph with onnx's reference evaluator instead (slow, fine for small test nets).
    """
    import onnx
    from onnx import TensorProto, numpy_helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    for index, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            array = numpy_helper.to_array(init).astype(np.float64)
            graph.initializer[index].CopyFrom(numpy_helper.from_array(array, init.name))
    for node in graph.node:
        for attr in node.attribute:
            if attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.DOUBLE
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(
                    numpy_helper.from_array(
                        numpy_helper.to_array(attr.t).astype(np.float64), attr.t.name
                    )
                )
    for value in (*graph.input, *graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    del graph.value_info[:]
    return copy


def _inference_batch_norm():
    """BatchNormalization in inference mode for every opset. onnx.reference runs
    BatchNormalization-7/9 (no ``training_mode`` attribute) with batch statistics, so a
    tf2onnx or old PyTorch export with BatchNorm at opset < 14 would not match onnxruntime."""
    from onnx.reference.op_run import OpRun

    class BatchNormalization(OpRun):
        op_domain = ""

        def _run(self, x, scale, bias, mean, var, epsilon=None, training_mode=None, **_):
            if training_mode or len(self.onnx_node.output) > 1:
                raise NotImplementedError("BatchNormalization in training mode")
            shape = (-1,) + (1,) * (x.ndim - 2)
            epsilon = 1e-5 if epsilon is None else epsilon
            normed = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + epsilon)
            return ((scale.reshape(shape) * normed + bias.reshape(shape)).astype(x.dtype),)

    return BatchNormalization


def _max_pool():
    """MaxPool over NCHW for the float64 evaluator. onnx.reference's own mis-sizes and
    misplaces windows when the begin and end pads differ per axis (Caffe2's ceil-mode
    emulation, pads (0, 0, 1, 1)): a 3x3 pool with pads (1, 0, 1, 2) on 6x9 gives 5x10.
    Padded positions are -inf; ``ceil_mode`` keeps a last window that starts inside the
    input or its begin padding, as onnxruntime does."""
    from onnx.reference.op_run import OpRun

    class MaxPool(OpRun):
        op_domain = ""

        def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None,
                 pads=None, storage_order=None, strides=None):  # fmt: skip
            if len(self.onnx_node.output) > 1 or x.ndim != 4:
                raise NotImplementedError("MaxPool with indices or not 2-D")
            if auto_pad not in (None, "NOTSET", "VALID", b"NOTSET", b"VALID"):
                raise NotImplementedError(f"MaxPool with auto_pad={auto_pad}")
            kernel = list(kernel_shape)
            strides = list(strides or [1, 1])
            dilations = list(dilations or [1, 1])
            pads = [0, 0, 0, 0] if auto_pad in ("VALID", b"VALID") else list(pads or [0] * 4)
            sizes, extra = [], []
            for a in range(2):
                span = dilations[a] * (kernel[a] - 1) + 1
                room = x.shape[2 + a] + pads[a] + pads[a + 2] - span
                count = (-(-room // strides[a]) if ceil_mode else room // strides[a]) + 1
                if ceil_mode and (count - 1) * strides[a] >= x.shape[2 + a] + pads[a]:
                    count -= 1
                sizes.append(count)
                extra.append(
                    max(
                        0,
                        (count - 1) * strides[a] + span - (x.shape[2 + a] + pads[a] + pads[a + 2]),
                    )
                )
            widths = ((0, 0), (0, 0), (pads[0], pads[2] + extra[0]), (pads[1], pads[3] + extra[1]))
            padded = np.pad(x, widths, constant_values=-np.inf)
            out = np.full((*x.shape[:2], *sizes), -np.inf, dtype=x.dtype)
            for ky in range(kernel[0]):
                for kx in range(kernel[1]):
                    top, left = ky * dilations[0], kx * dilations[1]
                    view = padded[:, :, top : top + strides[0] * (sizes[0] - 1) + 1 : strides[0],
                                  left : left + strides[1] * (sizes[1] - 1) + 1 : strides[1]]  # fmt: skip
                    np.maximum(out, view, out=out)
            return (out,)

    return MaxPool


class Float64Runner:
    """Runs an ONNX model in float64 with ``onnx.reference`` (see :func:`to_float64`)."""

    def __init__(self, model) -> None:
        from onnx.reference import ReferenceEvaluator

        from convert.from_onnx.graph import image_input

        self.evaluator = ReferenceEvaluator(
            to_float64(model), new_ops=[_inference_batch_norm(), _max_pool()]
        )
        self.input_name = image_input(model.graph).name
        self.output_names = [output.name for output in model.graph.output]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return next(iter(self.outputs(image).values()))

    def outputs(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Every output, by name, in the graph's order."""
        values = self.evaluator.run(self.output_names, {self.input_name: image.astype(np.float64)})
        return dict(zip(self.output_names, values, strict=True))


class OrtRunner:
    """Runs an ONNX model with onnxruntime on CPU in its own dtype."""

    def __init__(self, model: str | bytes) -> None:
        self.session = cpu_session(model)
        self.dtype = numpy_dtype(self.session)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return run_scores(self.session, image.astype(self.dtype))

    def outputs(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Every output, by name, in the graph's order."""
        return run_outputs(self.session, image.astype(self.dtype))
