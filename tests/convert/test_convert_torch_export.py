"""ONNX export of dense modules (dynamic batch/H/W) and of original classifiers (both
exporters). onnxruntime has no fp64 Conv, so these run in fp32: the ONNX model and the torch
module compute the same float32 sums in different orders, and on these tiny nets (outputs of
order 1, at most a few hundred terms per sum) they agree to ~1e-6; 1e-5 leaves a margin."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from densemap.convert import export
from densemap.convert.export import export_classifier_onnx, export_onnx, needs_external_data
from densemap.convert.from_torch.fc import fully_convolutional
from densemap.service.errors import ConversionError
from tests.support.oracle import crop_by_crop, torch_classifier

FP32_TOLERANCE = 1e-5


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def classifier(head_softmax: bool = False) -> nn.Module:
    """Unpadded, strided, non-square window 18x22: trunk 3x4 of 6 channels, S = 4."""
    torch.manual_seed(0)
    layers = [
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 3 * 4, 8), nn.ReLU(), nn.Linear(8, 5),
    ]  # fmt: skip
    return nn.Sequential(*layers, *([nn.Softmax(dim=-1)] if head_softmax else [])).eval()


@pytest.fixture(scope="module")
def dense_export():
    model = classifier(head_softmax=True)
    dense = fully_convolutional(model, input_size=(18, 22))
    return model, dense, export_onnx(dense, input_size=(18, 22), in_channels=3)


@pytest.mark.slow
def test_dense_export_has_named_dynamic_axes(dense_export):
    _, _, proto = dense_export
    (graph_input,), (graph_output,) = proto.graph.input, proto.graph.output
    assert graph_input.name == "input" and graph_output.name == "scores"
    dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert "Gemm" not in {n.op_type for n in proto.graph.node}
    assert not needs_external_data(proto)


@pytest.mark.slow
@pytest.mark.parametrize("height,width", [(18, 22), (31, 40), (45, 27)])
def test_dense_onnx_equals_torch_module_and_crops(dense_export, height, width):
    model, dense, proto = dense_export
    image_nchw = torch.rand(2, 3, height, width)
    (score_map,) = session(proto).run(None, {"input": image_nchw.numpy()})
    with torch.no_grad():
        expected = dense(image_nchw).numpy()
    assert score_map.shape == expected.shape
    assert np.abs(score_map - expected).max() <= FP32_TOLERANCE
    fp32 = torch_classifier(model, dtype="float32")
    crops = crop_by_crop(fp32, image_nchw.numpy(), window=(18, 22), stride=(4, 4), batched=True)
    n_h, n_w = crops.shape[2:]
    assert np.abs(score_map[:, :, :n_h, :n_w] - crops).max() <= FP32_TOLERANCE
    assert np.allclose(score_map.sum(axis=1), 1.0, atol=1e-5)  # softmax over classes


@pytest.mark.slow
def test_global_pool_head_exports_as_average_pool():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ).eval()  # fmt: skip
    dense = fully_convolutional(model, input_size=(15, 19))
    proto = export_onnx(dense, input_size=(15, 19), in_channels=3, output_name="map")
    pools = [n for n in proto.graph.node if n.op_type == "AveragePool"]
    assert len(pools) == 1 and proto.graph.output[0].name == "map"
    assert list(next(a for a in pools[0].attribute if a.name == "kernel_shape").ints) == [6, 8]
    image_nchw = torch.rand(1, 3, 27, 30)
    (score_map,) = session(proto).run(None, {"input": image_nchw.numpy()})
    fp32 = torch_classifier(model, dtype="float32")
    crops = crop_by_crop(fp32, image_nchw.numpy(), window=(15, 19), stride=(2, 2), batched=True)
    assert score_map.shape[2:] >= crops.shape[2:]
    assert np.abs(score_map[:, :, : crops.shape[2], : crops.shape[3]] - crops).max() <= FP32_TOLERANCE  # fmt: skip


@pytest.mark.parametrize(
    "dynamo,flatten_op", [(False, "Flatten"), pytest.param(True, "Reshape", marks=pytest.mark.slow)]
)
def test_classifier_export_with_both_exporters(dynamo, flatten_op):
    model = classifier().train()  # export must not depend on, or change, the caller's mode
    proto = export_classifier_onnx(model, input_size=(18, 22), in_channels=3, dynamo=dynamo)
    assert model.training
    ops = [n.op_type for n in proto.graph.node]
    assert flatten_op in ops and ("Gemm" in ops or "MatMul" in ops)
    assert proto.graph.output[0].name == "logits"
    image_nchw = torch.rand(3, 3, 18, 22)  # batch 3: the batch axis is dynamic
    (logits,) = session(proto).run(None, {"input": image_nchw.numpy()})
    with torch.no_grad():
        expected = model.eval()(image_nchw).numpy()
    assert np.abs(logits - expected).max() <= FP32_TOLERANCE


def test_exports_print_nothing(capfd):
    export_classifier_onnx(classifier(), input_size=(18, 22), in_channels=3, dynamo=False)
    captured = capfd.readouterr()
    assert captured.out == ""


def test_failed_export_is_a_conversion_error():
    with pytest.raises(ConversionError, match=r"legacy TorchScript exporter failed at input size 4x4"):  # fmt: skip
        export_classifier_onnx(classifier(), input_size=4, in_channels=3, dynamo=False)


@pytest.mark.slow
def test_needs_external_data_counts_weight_bytes(dense_export, monkeypatch):
    _, _, proto = dense_export
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    monkeypatch.setattr(export, "EXTERNAL_DATA_THRESHOLD", weight_bytes - 1)
    assert needs_external_data(proto)
    monkeypatch.setattr(export, "EXTERNAL_DATA_THRESHOLD", weight_bytes)
    assert not needs_external_data(proto)
