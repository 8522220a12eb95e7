"""ONNX operators in torch, with onnxruntime's semantics, for the torch runtime.

The op set of densemap's dense models: convolutions, pools and normalisations
(:mod:`densemap.convert.torch_runtime.windows`), activations, elementwise arithmetic, and
the shape arithmetic of crop subgraphs (Shape, Gather, Slice, Concat, Reshape...).
Each op is ``op(node, *inputs) -> tensor or tuple``; ``node`` gives its attributes, the
model's opset and the float element type the graph runs in (``.half()`` copies compute in
float16). Shape tensors stay int64 on the CPU; image tensors live on the model's device.

torch is imported by :func:`load`, which the torch runtime calls when it opens a model: the
package itself imports without torch, so the engine can name the missing install.
"""

from __future__ import annotations

import math

from densemap.convert.torch_runtime import windows

torch = None  # set by load()
F = None

ONNX_TYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64",
              9: "bool", 10: "float16", 11: "float64"}  # fmt: skip
FLOAT_TYPES = {1, 10, 11}


def load():
    """Import torch (ImportError when it is not installed)."""
    global torch, F
    if torch is None:
        import torch as _torch
        import torch.nn.functional as _functional

        torch, F = _torch, _functional
        windows.torch, windows.F = _torch, _functional
    return torch


def _ints(value) -> list[int]:
    return [int(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]


def _same_device(*tensors):
    device = next((t.device for t in tensors if t.device.type != "cpu" and t.dim()), None)
    if device is None:
        return tensors
    return tuple(t.to(device) if t.device != device and t.dim() else t for t in tensors)


def _unary(fn):
    return lambda node, x: fn(x)


def _binary(fn):
    return lambda node, a, b: fn(*_same_device(a, b))


def _div(node, a, b):
    a, b = _same_device(a, b)
    if a.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _variadic(fn):
    def run(node, *values):
        values = _same_device(*values)
        out = values[0]
        for value in values[1:]:
            out = fn(out, value)
        return out

    return run


def _softmax(fn):
    def run(node, x):
        if node.opset >= 13:
            return fn(x, dim=node.attr("axis", -1))
        axis = node.attr("axis", 1) % x.dim()
        flat = x.reshape(*x.shape[:axis], -1) if axis else x.reshape(1, -1)
        return fn(flat.reshape(math.prod(x.shape[:axis]), -1), dim=1).reshape(x.shape)

    return run


def _clip(node, x, low=None, high=None):
    if node.opset < 11:
        low, high = node.attr("min", None), node.attr("max", None)
    else:
        low = None if low is None else low.item()
        high = None if high is None else high.item()
    return torch.clamp(x, low, high)


def _slice(node, x, starts=None, ends=None, axes=None, steps=None):
    if node.opset < 10:
        starts, ends, axes = node.attr("starts"), node.attr("ends"), node.attr("axes", None)
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if step < 1:
            raise NotImplementedError("Slice with a negative step")
        size = x.shape[axis]
        start = min(max(start + size if start < 0 else start, 0), size)
        end = min(max(end + size if end < 0 else end, 0), size)
        index[axis % x.dim()] = slice(start, end, step)
    return x[tuple(index)]


def _gather(node, x, indices):
    axis = node.attr("axis", 0) % x.dim()
    indices = indices.to(x.device)
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    if indices.dim() == 0:
        return x.select(axis, int(indices))
    picked = torch.index_select(x, axis, indices.reshape(-1))
    return picked.reshape(*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :])


def _reshape(node, x, shape):
    shape = _ints(shape)
    if not node.attr("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _axes(node, axes):
    return _ints(axes) if axes is not None else list(node.attr("axes", []))


def _unsqueeze(node, x, axes=None):
    axes = _axes(node, axes)
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def _squeeze(node, x, axes=None):
    axes = _axes(node, axes)
    if not axes:
        return x.squeeze()
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(axis)
    return x


def _concat(node, *values):
    return torch.cat(_same_device(*values), dim=node.attr("axis"))


def _shape(node, x):
    dims = list(x.shape)[node.attr("start", 0) : node.attr("end", None)]
    return torch.tensor(dims, dtype=torch.int64)


def _cast(node, x):
    to = node.attr("to")
    if to in FLOAT_TYPES:
        return x.to(node.float_dtype)
    if to not in ONNX_TYPES:
        raise NotImplementedError(f"Cast to ONNX type {to}")
    return x.to(getattr(torch, ONNX_TYPES[to]))


def _pad(node, x, pads=None, value=None, axes=None):
    mode = node.attr("mode", "constant")
    if node.opset < 11:
        pads, value = node.attr("pads"), node.attr("value", 0.0)
    else:
        value = 0.0 if value is None or value.numel() == 0 else value.item()
    pads = _ints(pads)
    axes = _ints(axes) if axes is not None else list(range(x.dim()))
    count = len(axes)
    widths = [0] * (2 * x.dim())
    for i, axis in enumerate(axes):  # torch: (last begin, last end, previous begin, ...)
        axis %= x.dim()
        widths[2 * (x.dim() - 1 - axis)] = pads[i]
        widths[2 * (x.dim() - 1 - axis) + 1] = pads[i + count]
    while len(widths) > 2 and widths[-2:] == [0, 0]:
        widths = widths[:-2]
    modes = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}
    if mode not in modes:
        raise NotImplementedError(f"Pad mode {mode!r}")
    if mode == "constant":
        return F.pad(x, widths, value=value)
    return F.pad(x, widths, mode=modes[mode])


def _split(node, x, split=None):
    axis = node.attr("axis", 0) % x.dim()
    if split is not None:
        sizes = _ints(split)
    elif node.attr("split", None) is not None:
        sizes = list(node.attr("split"))
    else:
        parts = node.attr("num_outputs", len(node.outputs))
        sizes = -(-x.shape[axis] // parts)
    return tuple(torch.split(x, sizes, dim=axis))


def _reduce(fn):
    def run(node, x, axes=None):
        axes = _axes(node, axes)
        keep = bool(node.attr("keepdims", 1))
        if not axes:
            if node.attr("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, dim=tuple(axes), keepdim=keep)

    return run


def _gemm(node, a, b, c=None):
    a = a.transpose(0, 1) if node.attr("transA", 0) else a
    b = b.transpose(0, 1) if node.attr("transB", 0) else b
    out = node.attr("alpha", 1.0) * (a @ b)
    return out if c is None else out + node.attr("beta", 1.0) * c


def _constant(node):
    if node.attr("value", None) is not None:
        return node.attr("value")
    for name in ("value_float", "value_floats", "value_int", "value_ints"):
        value = node.attr(name, None)
        if value is not None:
            if "float" in name:
                return torch.tensor(value, dtype=node.float_dtype, device=node.device)
            return torch.tensor(value, dtype=torch.int64)
    raise NotImplementedError("Constant without a value, value_float(s) or value_int(s)")


def _constant_of_shape(node, shape):
    value = node.attr("value", None)
    if value is None:
        return torch.zeros(_ints(shape), dtype=node.float_dtype)
    return value.reshape(()).expand(_ints(shape)).clone()


def _dropout(node, x, *rest):
    return x if len(node.outputs) == 1 else (x, torch.ones_like(x, dtype=torch.bool))


def table() -> dict:
    """Op type -> function (after :func:`load`)."""
    unary = {
        "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp,
        "Log": torch.log, "Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal, "Neg": torch.neg,
        "Abs": torch.abs, "Floor": torch.floor, "Ceil": torch.ceil, "Erf": torch.erf,
        "Sign": torch.sign, "Not": torch.logical_not, "Softplus": F.softplus,
        "Softsign": F.softsign, "HardSwish": F.hardswish, "Mish": F.mish,
        "Identity": lambda x: x,
    }  # fmt: skip
    ops = {name: _unary(fn) for name, fn in unary.items()}
    binary = {
        "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Pow": torch.pow,
        "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
        "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or,
        "MatMul": torch.matmul, "PRelu": lambda x, s: torch.where(x < 0, x * s, x),
    }  # fmt: skip
    ops.update({name: _binary(fn) for name, fn in binary.items()})
    ops.update(
        Div=_div, Sum=_variadic(torch.add), Max=_variadic(torch.maximum),
        Min=_variadic(torch.minimum),
        Mean=lambda node, *v: _variadic(torch.add)(node, *v) / len(v),
        Where=lambda node, c, a, b: torch.where(*_same_device(c, a, b)),
        LeakyRelu=lambda node, x: F.leaky_relu(x, node.attr("alpha", 0.01)),
        Elu=lambda node, x: F.elu(x, node.attr("alpha", 1.0)),
        Selu=lambda node, x: torch.selu(x),
        HardSigmoid=lambda node, x: torch.clamp(
            node.attr("alpha", 0.2) * x + node.attr("beta", 0.5), 0, 1
        ),
        Gelu=lambda node, x: F.gelu(x, approximate=node.attr("approximate", "none")),
        Clip=_clip, Conv=windows.conv, MaxPool=windows.max_pool,
        AveragePool=windows.average_pool,
        GlobalAveragePool=lambda node, x: x.mean(dim=(2, 3), keepdim=True),
        GlobalMaxPool=lambda node, x: x.amax(dim=(2, 3), keepdim=True),
        Softmax=_softmax(torch.softmax), LogSoftmax=_softmax(torch.log_softmax),
        BatchNormalization=lambda node, x, s, b, m, v: F.batch_norm(
            x, m, v, s, b, False, 0.0, node.attr("epsilon", 1e-5)
        ),
        LayerNormalization=windows.layer_norm, LRN=windows.lrn, Slice=_slice, Gather=_gather,
        Reshape=_reshape, Unsqueeze=_unsqueeze, Squeeze=_squeeze, Concat=_concat,
        Shape=_shape, Cast=_cast, Pad=_pad, Split=_split, Gemm=_gemm, Constant=_constant,
        ConstantOfShape=_constant_of_shape, Dropout=_dropout,
        Flatten=lambda node, x: x.reshape(math.prod(x.shape[: node.attr("axis", 1)]), -1),
        Transpose=lambda node, x: x.permute(
            *node.attr("perm", list(range(x.dim() - 1, -1, -1)))
        ),
        Expand=lambda node, x, shape: x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(shape)))),
        Range=lambda node, a, b, d: torch.arange(a.item(), b.item(), d.item(), dtype=a.dtype),
        ReduceMean=_reduce(torch.mean), ReduceSum=_reduce(torch.sum),
        ReduceMax=_reduce(torch.amax), ReduceMin=_reduce(torch.amin),
    )  # fmt: skip
    return ops
