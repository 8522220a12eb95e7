"""Geometry traced from ONNX graphs, against values computed by hand.

Receptive field recurrence, per axis: a layer with kernel k, stride s, dilation d and
leading pad p maps (jump j, span r, left x) to (j*s, r + d*(k-1)*j, x - p*j).
The expected numbers below were worked out by hand from the layer lists (see comments).
"""

from __future__ import annotations

import pytest

from densemap.convert.geometry import compute_geometry
from densemap.service.errors import ConversionError
from tests.support.convert_onnx_support import GraphBuilder


def vgg16_dense(window=224):
    g = GraphBuilder(1)
    for convs in (2, 2, 3, 3, 3):
        for _ in range(convs):
            g.conv(1, 3, pad=1)
        g.pool("MaxPool", 2, 2)
    g.conv(2, 7)  # fc6 as a 7x7 conv
    g.conv(2, 1)
    g.conv(3, 1)
    return g.model(window)


def test_vgg16_geometry_matches_notes():
    # blocks at jumps 1,2,4,8,16 add 2*2*j per conv and j per pool:
    # span 1+4+1 = 6, +8+2 = 16, +24+4 = 44, +48+8 = 100, +96+16 = 212, fc6: +6*32 = 404.
    # left: -(2*1 + 2*2 + 3*4 + 3*8 + 3*16) = -90.
    geometry = compute_geometry(vgg16_dense(), window=224)
    assert geometry.stride == (32, 32)
    assert geometry.receptive_field == (404, 404)
    assert geometry.receptive_field_offset == (-90, -90)
    assert geometry.effective_window == (224, 224)
    assert geometry.padded is True
    assert geometry.window == (224, 224)


def test_alexnet_geometry():
    # torchvision AlexNet: conv11/4 p2, pool3/2, conv5 p2, pool3/2, 3x conv3 p1, pool3/2, fc 6x6.
    # span: 11, +2*4 = 19, +4*8 = 51, +2*8 = 67, +3*2*16 = 163, +2*16 = 195, +5*32 = 355.
    # left: -2, -2 - 2*8 = -18, -18 - 3*16 = -66.
    g = GraphBuilder(3)
    g.conv(2, 11, stride=4, pad=2)
    g.pool("MaxPool", 3, 2)
    g.conv(2, 5, pad=2)
    g.pool("MaxPool", 3, 2)
    for _ in range(3):
        g.conv(2, 3, pad=1)
    g.pool("MaxPool", 3, 2)
    g.conv(4, 6)
    geometry = compute_geometry(g.model(224), window=224)
    assert (geometry.stride, geometry.receptive_field) == ((32, 32), (355, 355))
    assert geometry.receptive_field_offset == (-66, -66)
    assert geometry.padded


def test_lenet5_geometry_unpadded():
    # conv5, pool2/2, conv5, pool2/2, fc 5x5: span 5, 6, 6+4*2 = 14, 16, 16+4*4 = 32 = R.
    g = GraphBuilder(1)
    g.conv(2, 5)
    g.pool("AveragePool", 2, 2)
    g.conv(2, 5)
    g.pool("MaxPool", 2, 2)
    g.conv(3, 5)
    geometry = compute_geometry(g.model(32), window=32)
    assert geometry.stride == (4, 4)
    assert geometry.receptive_field == (32, 32)
    assert geometry.receptive_field_offset == (0, 0)
    assert geometry.effective_window == (32, 32)
    assert not geometry.padded


def test_strided_trunk_ignores_trailing_pixels():
    # R = 8, conv3/2 gives 3 units (the 8th pixel is never read), head 3x3: span 3 + 2*2 = 7.
    g = GraphBuilder(1)
    g.conv(2, 3, stride=2)
    g.conv(2, 3)
    geometry = compute_geometry(g.model(8), window=8)
    assert geometry.stride == (2, 2)
    assert geometry.receptive_field == (7, 7)
    assert geometry.effective_window == (7, 7)


def test_non_square_kernels_strides_and_dilation():
    # window 10x14: conv (3,5) -> 8x10; pool (2,1)/(2,1) -> 4x10; conv (1,3) dilation (1,2)
    # -> 4x6; head (4,6). h: 3, +1 = 4 (j 2), +0, +3*2 = 10. w: 5, +0, +2*2 = 9, +5 = 14.
    g = GraphBuilder(1)
    g.conv(2, (3, 5))
    g.pool("MaxPool", (2, 1), (2, 1))
    g.conv(2, (1, 3), dilation=(1, 2))
    g.conv(3, (4, 6))
    geometry = compute_geometry(g.model((10, 14)), window=(10, 14))
    assert geometry.stride == (2, 1)
    assert geometry.receptive_field == (10, 14)
    assert geometry.effective_window == (10, 14)
    assert geometry.window == (10, 14)


def test_residual_branches_take_the_union():
    # stem conv7/2 p3: span 7, left -3, j 2; maxpool3/2 p1: span 11, left -5, j 4.
    # main: conv3/2 p1: span 19, left -9, j 8; conv3 p1: span 35, left -17.
    # shortcut: conv1/2: span 11, left -5. Union: left -17, right max(18, 6) = 18: span 35.
    g = GraphBuilder(1)
    g.conv(2, 7, stride=2, pad=3)
    stem = g.pool("MaxPool", 3, 2, pad=1)
    g.conv(2, 3, stride=2, pad=1)
    main = g.conv(2, 3, pad=1)
    g.current, g.channels = stem, 2
    shortcut = g.conv(2, 1, stride=2)
    g.node("Add", [main, shortcut])
    g.node("Relu")
    geometry = compute_geometry(g.model(64), window=64)
    assert geometry.stride == (8, 8)
    assert geometry.receptive_field == (35, 35)
    assert geometry.receptive_field_offset == (-17, -17)


def test_nhwc_input_through_transpose():
    g = GraphBuilder(3, layout="NHWC")
    g.node("Transpose", perm=[0, 3, 1, 2])
    g.conv(2, 3)
    g.pool("MaxPool", 2, 2)
    g.conv(2, 4)
    geometry = compute_geometry(g.model(10), window=10)
    assert geometry.stride == (2, 2)
    assert geometry.receptive_field == (10, 10)  # 3, +1 = 4, +3*2 = 10


def test_same_padding_stride_one_counts_as_padding():
    g = GraphBuilder(1)
    g.conv(2, 3, auto_pad="SAME_UPPER", pad=0)
    g.conv(2, 6)
    geometry = compute_geometry(g.model(6), window=6)
    assert geometry.padded
    assert geometry.receptive_field_offset == (-1, -1)
    assert geometry.receptive_field == (8, 8)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda g: g.node("Resize", [g.current, "", g.const(_scales())]), "Resize node"),
        (lambda g: g.conv(2, 3, stride=2, auto_pad="SAME_UPPER", pad=0), "auto_pad=SAME_UPPER"),
        (lambda g: g.node("Concat", [g.current, g.current], axis=2), "spatial axis"),
        (lambda g: g.node("Flatten"), "collapses the feature map"),
        (lambda g: g.node("Softmax", axis=3), "runs over a spatial axis"),
    ],
)
def test_unsupported_spatial_ops_name_the_node(build, message):
    g = GraphBuilder(1)
    g.conv(2, 3)
    build(g)
    with pytest.raises(ConversionError, match=message):
        compute_geometry(g.model(12), window=12)


def test_branches_with_different_strides_are_refused():
    g = GraphBuilder(1)
    first = g.conv(2, 3, pad=1)
    strided = g.conv(2, 3, stride=2, pad=1)
    g.node("Add", [first, strided])
    with pytest.raises(ConversionError, match="different strides"):
        compute_geometry(g.model(12), window=12)


def test_window_smaller_than_the_receptive_field_is_refused():
    g = GraphBuilder(1)
    g.conv(2, 5)
    g.conv(2, 5)
    with pytest.raises(ConversionError, match="smaller than the receptive field"):
        compute_geometry(g.model(9), window=8)


def _scales():
    import numpy as np

    return np.array([1, 1, 2, 2], dtype=np.float32)
