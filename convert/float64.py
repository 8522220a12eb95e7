"""Float64 runs of ONNX models with onnx's reference evaluator (onnxruntime has no double
Conv/AveragePool kernels): the exactness checks and ``--verify``'s rounding measurement.

Large float32 weights read only as a Conv kernel or a Gemm/MatMul operand stay float32 and
are fed as inputs: the convolution promotes them to float64 exactly, and Gemm/MatMul here
cast them in blocks of columns, so a VGG's 500 MB of weights are held once, never as a
float64 copy (1 GB) beside the proto they came from. :func:`detach_weights` splits a model
into such weights and a light graph, shared with onnxruntime (:func:`densemap.convert.runtime.cpu_session`).
"""

from __future__ import annotations

import numpy as np

from densemap.convert.from_onnx.graph import graph_skeleton

FLOAT32_WEIGHTS = 1 << 16  # elements: float64 runs keep weights this large in float32
CAST_BLOCK = 256  # columns of a float32 weight cast to float64 at a time


def to_float64(model, keep: frozenset[str] = frozenset()):
    """A float64 copy of an ONNX model, to be run with ``onnx.reference``; the float32
    initializers named in ``keep`` are left out of it and become float32 graph inputs
    (:class:`Float64Runner` feeds them: large weights are never held twice nor in float64).

    onnxruntime has no double Conv/AveragePool kernels, so fp64 exactness checks evaluate
    the graph with onnx's reference evaluator instead (slow, fine for small test nets).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    copy = graph_skeleton(model)
    graph = copy.graph
    listed = {value.name for value in graph.input}
    for init in model.graph.initializer:
        if init.name in keep:
            if init.name not in listed:
                graph.input.append(
                    helper.make_tensor_value_info(init.name, TensorProto.FLOAT, init.dims)
                )
        elif init.data_type == TensorProto.FLOAT:
            array = numpy_helper.to_array(init).astype(np.float64)
            graph.initializer.append(numpy_helper.from_array(array, init.name))
        else:
            graph.initializer.append(init)
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
        if value.name not in keep and value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    return copy


def _weights_kept_float32(model) -> frozenset[str]:
    """Large float32 initializers read only as a Conv's kernel or a Gemm/MatMul operand:
    ops that compute in float64 from float32 values exactly (with :func:`_mixed_matmuls`)."""
    from onnx import TensorProto

    readers: dict[str, set] = {}
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            use = node.op_type if node.op_type != "Conv" or position == 1 else "Conv input"
            readers.setdefault(name, set()).add(use)
    outputs = {value.name for value in model.graph.output}
    return frozenset(
        init.name
        for init in model.graph.initializer
        if init.data_type == TensorProto.FLOAT
        and int(np.prod(init.dims)) >= FLOAT32_WEIGHTS
        and init.name not in outputs
        and readers.get(init.name, {""}) <= {"Conv", "Gemm", "MatMul"}
    )


def _matmul64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b in float64, a float32 operand cast in blocks (never whole: memory)."""
    if a.dtype == np.float64 and b.dtype == np.float64:
        return np.matmul(a, b)
    if b.dtype != np.float64:
        a = a.astype(np.float64)
        blocks = [
            np.matmul(a, b[..., start : start + CAST_BLOCK].astype(np.float64))
            for start in range(0, b.shape[-1], CAST_BLOCK)
        ]
        return np.concatenate(blocks, axis=-1)
    return np.swapaxes(_matmul64(np.swapaxes(b, -1, -2), np.swapaxes(a, -1, -2)), -1, -2)


def _mixed_matmuls():
    """Gemm and MatMul for float64 activations with float32 weights, computed in float64."""
    from onnx.reference.op_run import OpRun

    class Gemm(OpRun):
        op_domain = ""

        # broadcast: opset < 7 only; C then broadcasts as numpy does
        def _run(self, a, b, c=None, alpha=None, beta=None, transA=None, transB=None,  # noqa: N803
                 broadcast=None):  # fmt: skip
            a = a.T if transA else a
            b = b.T if transB else b
            product = _matmul64(a, b) * (1.0 if alpha is None else alpha)
            if c is not None:
                product = product + (1.0 if beta is None else beta) * c.astype(np.float64)
            return (product,)

    class MatMul(OpRun):
        op_domain = ""

        def _run(self, a, b):
            return (_matmul64(a, b),)

    return [Gemm, MatMul]


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
    """Runs an ONNX model in float64 with ``onnx.reference`` (see :func:`to_float64`); its
    large Conv/Gemm/MatMul weights stay float32, read in float64 block by block. ``weights``:
    those already detached from ``model`` (:func:`detach_weights`)."""

    def __init__(self, model, weights: dict[str, np.ndarray] | None = None) -> None:
        from onnx.reference import ReferenceEvaluator

        if weights is None:
            model, weights = detach_weights(model)
        self.weights = weights
        self.evaluator = ReferenceEvaluator(
            to_float64(model, frozenset(weights)),
            new_ops=[_inference_batch_norm(), _max_pool(), *_mixed_matmuls()],
        )
        self.input_name = _first_input(model, weights)
        self.output_names = [output.name for output in model.graph.output]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return next(iter(self.outputs(image).values()))

    def outputs(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Every output, by name, in the graph's order."""
        feeds = {self.input_name: image.astype(np.float64), **self.weights}
        values = self.evaluator.run(self.output_names, feeds)
        return dict(zip(self.output_names, values, strict=True))


def detach_weights(model) -> tuple[object, dict[str, np.ndarray]]:
    """(a light copy of ``model`` that reads its large Conv/Gemm/MatMul weights as float32
    graph inputs after its image, {their names: float32 arrays}): the arrays are fed to each
    run, shared by onnxruntime and float64 runners. Let ``model`` go afterwards."""
    from onnx import TensorProto, helper, numpy_helper

    keep = _weights_kept_float32(model)
    light = graph_skeleton(
        model, inputs=[value for value in model.graph.input if value.name not in keep]
    )
    graph = light.graph
    weights = {}
    for init in model.graph.initializer:
        if init.name in keep:
            weights[init.name] = numpy_helper.to_array(init)
            graph.input.append(
                helper.make_tensor_value_info(init.name, TensorProto.FLOAT, init.dims)
            )
        else:
            graph.initializer.append(init)
    return light, weights


def _first_input(model, weights) -> str:
    """The image (or feature map) input: the first graph input that is not a weight."""
    constants = {init.name for init in model.graph.initializer} | set(weights)
    return next(value.name for value in model.graph.input if value.name not in constants)
