"""ONNX path: classifiers with no exact dense form get a ConversionError naming the node."""

from __future__ import annotations

import io

import onnx
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from densemap.convert.from_onnx.fc_head import rewrite_fc_head
from densemap.service.errors import ConversionError
from tests.support.convert_onnx_support import BOTH_EXPORTERS, GraphBuilder, export_classifier


class SqueezeExcite(nn.Module):
    """A squeeze-and-excitation block in the trunk: a per-image global op."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.squeeze = nn.Linear(4, 4)
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        x = F.relu(self.conv(x))
        weights = torch.sigmoid(self.squeeze(x.mean(dim=(2, 3))))
        x = x * weights[:, :, None, None]
        return self.fc(x.flatten(1))


class SpatialAttention(nn.Module):
    """Self-attention over positions, then a global average: no per-window form."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        tokens = self.conv(x).flatten(2)  # N, C, HW
        attention = torch.softmax(tokens.transpose(1, 2) @ tokens, dim=-1)
        return self.fc((tokens @ attention).mean(dim=2))


class Upsampling(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 12 * 12, 2)

    def forward(self, x):
        return self.fc(F.interpolate(self.conv(x), scale_factor=2.0).flatten(1))


class GapNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("dynamo", BOTH_EXPORTERS)
def test_squeeze_excitation_in_the_trunk_names_the_global_node(dynamo):
    classifier = export_classifier(SqueezeExcite(), 8, dynamo=dynamo)
    with pytest.raises(ConversionError, match="ReduceMean node .*squeeze-and-excitation"):
        rewrite_fc_head(classifier)


def test_attention_over_positions_is_refused():
    classifier = export_classifier(SpatialAttention(), 8, dynamo=False)
    with pytest.raises(ConversionError, match="attention"):
        rewrite_fc_head(classifier)


def test_unsupported_trunk_op_is_named():
    classifier = export_classifier(Upsampling(), 8, dynamo=False)
    with pytest.raises(ConversionError, match="Resize node"):
        rewrite_fc_head(classifier)


def test_model_whose_output_is_a_map_at_the_window_is_refused():
    g = GraphBuilder(3)
    g.conv(4, 3)
    g.conv(2, 4)  # 8 -> 6 -> 3: three cells per axis at R, a segmentation-like output
    with pytest.raises(ConversionError, match="already a feature map of 3x3 cells"):
        rewrite_fc_head(g.model(8))


def test_dynamic_height_and_width_are_refused():
    buffer = io.BytesIO()
    torch.onnx.export(
        GapNet().eval(),
        (torch.randn(1, 3, 8, 8),),
        buffer,
        dynamo=False,
        input_names=["input"],
        dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}},
    )
    with pytest.raises(ConversionError, match="no fixed height and width"):
        rewrite_fc_head(onnx.load_from_string(buffer.getvalue()))


def test_bad_flatten_order_value():
    with pytest.raises(ConversionError, match="flatten_order"):
        rewrite_fc_head(export_classifier(GapNet(), 8, dynamo=False), flatten_order="whc")


def test_head_with_a_non_constant_weight_is_refused():
    g = GraphBuilder(3)
    g.conv(2, 3)
    flat = g.node("Flatten")
    g.node("MatMul", [flat, flat])
    with pytest.raises(ConversionError):
        rewrite_fc_head(g.model(4, output_dims=[1, 1]))


class ViewBySize(nn.Module):
    """Old torchvision style ``x.view(x.size(0), -1)``: the legacy exporter reads Shape(x)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        x = self.conv(x)
        return self.fc(x.view(x.size(0), -1))


def test_flatten_through_a_shape_computation_converts():
    dense = rewrite_fc_head(export_classifier(ViewBySize(), 8, dynamo=False))
    assert [n.op_type for n in dense.graph.node] == ["Conv", "Conv"]
