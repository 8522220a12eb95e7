"""Window ops of the torch runtime, with onnxruntime's semantics: Conv, MaxPool,
AveragePool (ONNX pads, auto_pad, ceil mode, dilations of à-trous variants), LRN and
LayerNormalization. torch and torch.nn.functional are set by
:func:`densemap.convert.torch_runtime.ops.load` (torch is imported only on demand).
"""

from __future__ import annotations

import math

torch = None  # set by runtime_torch_ops.load()
F = None


def _pads_2d(node, x, kernel, strides, dilations):
    """ONNX pads [top, left, bottom, right] of a 2-D window op, auto_pad resolved."""
    auto = node.attr("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        return list(node.attr("pads", [0, 0, 0, 0]))
    if auto == "VALID":
        return [0, 0, 0, 0]
    begins, ends = [], []
    for axis in range(2):
        size = x.shape[2 + axis]
        out = -(-size // strides[axis])
        total = max(0, (out - 1) * strides[axis] + (kernel[axis] - 1) * dilations[axis] + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(large if auto == "SAME_LOWER" else small)
        ends.append(small if auto == "SAME_LOWER" else large)
    return begins + ends


def _window(node, x, kernel):
    if x.dim() != 4:
        raise NotImplementedError(f"{node.op} on a {x.dim()}-D tensor (2-D images only)")
    strides = list(node.attr("strides", [1, 1]))
    dilations = list(node.attr("dilations", [1, 1]))
    return strides, dilations, _pads_2d(node, x, kernel, strides, dilations)


def conv(node, x, weight, bias=None):
    kernel = list(weight.shape[2:])
    strides, dilations, pads = _window(node, x, kernel)
    if pads[0] == pads[2] and pads[1] == pads[3]:
        padding = (pads[0], pads[1])
    else:
        x, padding = F.pad(x, (pads[1], pads[3], pads[0], pads[2])), (0, 0)
    return F.conv2d(x, weight, bias, strides, padding, dilations, node.attr("group", 1))


def _pool_sizes(node, x, kernel, strides, dilations, pads):
    """Output size and the extra end padding of a pool, as onnxruntime sizes it: ceil mode
    keeps a last window that starts inside the input or its begin padding."""
    sizes, extra = [], []
    for a in range(2):
        span = dilations[a] * (kernel[a] - 1) + 1
        padded = x.shape[2 + a] + pads[a] + pads[a + 2]
        room = padded - span
        count = (-(-room // strides[a]) if node.attr("ceil_mode", 0) else room // strides[a]) + 1
        if node.attr("ceil_mode", 0) and (count - 1) * strides[a] >= x.shape[2 + a] + pads[a]:
            count -= 1
        sizes.append(count)
        extra.append(max(0, (count - 1) * strides[a] + span - padded))
    return sizes, extra


def max_pool(node, x):
    if len(node.outputs) > 1 or node.attr("storage_order", 0):
        raise NotImplementedError("MaxPool with an indices output")
    kernel = list(node.attr("kernel_shape"))
    strides, dilations, pads = _window(node, x, kernel)
    sizes, extra = _pool_sizes(node, x, kernel, strides, dilations, pads)
    widths = (pads[1], pads[3] + extra[1], pads[0], pads[2] + extra[0])
    padded = F.pad(x, widths, value=-math.inf) if any(widths) else x
    out = F.max_pool2d(padded, kernel, strides, 0, dilations)
    return out[:, :, : sizes[0], : sizes[1]]


def _window_sum(x, kernel, strides, dilations, sizes):
    if dilations == [1, 1]:
        return F.avg_pool2d(x, kernel, strides, 0, divisor_override=1)[:, :, : sizes[0], : sizes[1]]
    out = None
    for ky in range(kernel[0]):
        for kx in range(kernel[1]):
            top, left = ky * dilations[0], kx * dilations[1]
            view = x[:, :, top : top + strides[0] * (sizes[0] - 1) + 1 : strides[0],
                     left : left + strides[1] * (sizes[1] - 1) + 1 : strides[1]]  # fmt: skip
            out = view if out is None else out + view
    return out


def average_pool(node, x):
    kernel = list(node.attr("kernel_shape"))
    strides, dilations, pads = _window(node, x, kernel)
    sizes, extra = _pool_sizes(node, x, kernel, strides, dilations, pads)
    widths = (pads[1], pads[3] + extra[1], pads[0], pads[2] + extra[0])
    total = _window_sum(F.pad(x, widths), kernel, strides, dilations, sizes)
    # the positions each window averages: the input's, plus its declared pads when
    # count_include_pad (never ceil mode's extra positions)
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    if node.attr("count_include_pad", 0):
        ones = F.pad(ones, (pads[1], pads[3], pads[0], pads[2]), value=1.0)
        mask = F.pad(ones, (0, extra[1], 0, extra[0]))
    else:
        mask = F.pad(ones, widths)
    return total / _window_sum(mask, kernel, strides, dilations, sizes)


def lrn(node, x):
    size = node.attr("size")
    alpha, beta, bias = node.attr("alpha", 1e-4), node.attr("beta", 0.75), node.attr("bias", 1.0)
    square = F.pad(x * x, (0, 0, 0, 0, (size - 1) // 2, size // 2))
    total = sum(square[:, c : c + x.shape[1]] for c in range(size))
    return x / (bias + alpha / size * total) ** beta


def layer_norm(node, x, scale, bias=None):
    axis = node.attr("axis", -1) % x.dim()
    shape = x.shape[axis:]
    scale = scale.expand(shape)
    bias = bias.expand(shape) if bias is not None else None
    return F.layer_norm(x, shape, scale, bias, node.attr("epsilon", 1e-5))
