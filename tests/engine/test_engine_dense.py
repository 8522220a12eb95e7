"""Engine one-pass maps: dense == crops, output options, multi-scale geometry."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

from densemap.service.engine import Engine, EngineConfig, ScoreOptions, preprocess
from densemap.service.engine.memory import nchwc_block
from densemap.service.engine.postprocess import softmax
from tests.support.dense_models import Conv, Pool, build_dense_model, make_dense_net, small_layers
from tests.support.oracle import crop_by_crop, session_classifier

WINDOW, STRIDE, CLASSES = (12, 16), 4, 5
# fp32 tolerance against the float64 torch reference: logits are sums of a few hundred
# products of magnitude <= ~5, so float32 rounding stays below ~1e-5.
FP32_ATOL = 2e-5


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_dense_model(tmp_path_factory.mktemp("rgb"), channels=3, classes=CLASSES)


@pytest.fixture(scope="module")
def engine(model_path):
    return Engine(model_path, config=EngineConfig(warmup=False))


@pytest.fixture(scope="module")
def image():
    return (np.random.default_rng(1).random((45, 57, 3)) * 255).astype(np.uint8)


def crop_reference(session, image_chw, n, stride):
    """The crop-by-crop oracle with the same ONNX model (each crop gives exactly one cell)."""
    classify = session_classifier(session)
    return crop_by_crop(classify, image_chw[None], window=WINDOW, stride=(stride,) * 2, cells=n)[0]


def test_dense_equals_crops_unpadded(engine, model_path, image):
    result = engine.score(image, ScoreOptions(probabilities=False))
    dense = result.maps[0].scores
    n = ((45 - 12) // 4 + 1, (57 - 16) // 4 + 1)
    assert dense.shape == (CLASSES, *n)
    image_chw = preprocess(image, engine.metadata.preprocessing)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    # Same ONNX model, same fp32 kernels on the same numbers: equal bit for bit here.
    np.testing.assert_array_equal(dense, crop_reference(session, image_chw, n, STRIDE))
    net = make_dense_net(layers=small_layers(padded=False), window=WINDOW, channels=3, classes=5)
    net = net.double()
    with torch.no_grad():
        for i, j in [(0, 0), (n[0] - 1, n[1] - 1), (3, 5)]:
            crop = image_chw[:, i * 4 : i * 4 + 12, j * 4 : j * 4 + 16].astype(np.float64)
            ref = net(torch.from_numpy(crop[None]))[0, :, 0, 0].numpy()
            np.testing.assert_allclose(dense[:, i, j], ref, atol=FP32_ATOL, rtol=0)


def test_finer_stride_equals_crops_at_offsets(engine, model_path, image):
    """Shift-and-stitch at S/2 and S/4: cell (i, j) is the crop at (i*d, j*d)."""
    image_chw = preprocess(image, engine.metadata.preprocessing)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    for stride in (2, 1):
        dense = engine.score(image, ScoreOptions(output_stride=stride, probabilities=False))
        scores = dense.maps[0].scores
        n = ((45 - 12) // stride + 1, (57 - 16) // stride + 1)
        assert scores.shape[1:] == n
        assert dense.maps[0].geometry.stride == (stride, stride)
        np.testing.assert_array_equal(scores, crop_reference(session, image_chw, n, stride))


def test_preprocessing_and_float_input_agree(engine, image):
    by_uint8 = engine.score(image, ScoreOptions(probabilities=False)).maps[0].scores
    image_chw = preprocess(image, engine.metadata.preprocessing)
    expected = (image.astype(np.float32).transpose(2, 0, 1) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(image_chw, expected, rtol=1e-6, atol=1e-6)
    by_float = engine.score(image_chw, ScoreOptions(probabilities=False)).maps[0].scores
    np.testing.assert_array_equal(by_uint8, by_float)
    png = Image.fromarray(image)
    import io

    buffer = io.BytesIO()
    png.save(buffer, format="PNG")
    by_bytes = engine.score(buffer.getvalue(), ScoreOptions(probabilities=False)).maps[0].scores
    np.testing.assert_array_equal(by_uint8, by_bytes)
    scaled = engine.score(image_chw, ScoreOptions(scales=(1.0, 1.5), probabilities=False))
    np.testing.assert_array_equal(scaled.maps[0].scores, by_uint8)
    assert scaled.maps[1].shape == ((68 - 12) // 4 + 1, (86 - 16) // 4 + 1)  # 45*1.5, 57*1.5


def test_output_options(engine, image):
    logits = engine.score(image, ScoreOptions(probabilities=False)).maps[0].scores
    expected_probs = np.exp(logits.astype(np.float64))
    expected_probs /= expected_probs.sum(axis=0, keepdims=True)
    options = ScoreOptions(top_k=2, classes=(4, 1, 2), argmax=True, image_top_k=2)
    result = engine.score(image, options)
    m = result.maps[0]
    np.testing.assert_allclose(m.scores, expected_probs[[4, 1, 2]], atol=1e-6)
    assert m.classes == (4, 1, 2)
    subset = expected_probs[[4, 1, 2]]
    order = np.argsort(-subset, axis=0)[:2]
    np.testing.assert_array_equal(m.top_k_indices, np.array([4, 1, 2])[order])
    np.testing.assert_allclose(m.top_k_scores, np.take_along_axis(subset, order, 0), atol=1e-6)
    np.testing.assert_array_equal(m.argmax, np.array([4, 1, 2])[subset.argmax(axis=0)])
    assert m.top_k_indices.dtype == np.int32 and m.argmax.dtype == np.int32
    image_scores = expected_probs.mean(axis=(1, 2))
    np.testing.assert_allclose(result.image_scores, image_scores, atol=1e-6)
    best = sorted([4, 1, 2], key=lambda c: -image_scores[c])[:2]
    assert [c for c, _ in result.image_top_k] == best
    assert result.labels == tuple(f"class{i}" for i in range(5))
    assert set(result.timings) >= {"decode", "preprocess", "infer", "postprocess", "total"}
    only_top = engine.score(image, ScoreOptions(include_map=False, top_k=1)).maps[0]
    assert only_top.scores is None and only_top.shape == logits.shape[1:]


def test_float16_within_tolerance(engine, image):
    fp32 = engine.score(image).maps[0].scores
    fp16 = engine.score(image, ScoreOptions(dtype="float16")).maps[0].scores
    assert fp16.dtype == np.float16
    # Probabilities lie in [0, 1]: float16 rounding is at most half an ulp at 1, 2**-12.
    np.testing.assert_allclose(fp16.astype(np.float32), fp32, atol=2**-12, rtol=0)
    logits32 = engine.score(image, ScoreOptions(probabilities=False)).maps[0].scores
    logits16 = engine.score(image, ScoreOptions(probabilities=False, dtype="float16"))
    # Logits: float16 has an 11-bit significand, relative rounding <= 2**-11.
    np.testing.assert_allclose(
        logits16.maps[0].scores.astype(np.float32), logits32, rtol=2**-11, atol=1e-7
    )


def test_softmax_over_class_axis():
    logits = np.random.default_rng(0).normal(size=(4, 3, 2)).astype(np.float32) * 10
    probs = softmax(logits)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, rtol=1e-6)
    ref = np.exp(logits[:, 1, 1] - logits[:, 1, 1].max())
    np.testing.assert_allclose(probs[:, 1, 1], ref / ref.sum(), rtol=1e-6)


def test_probabilities_model(tmp_path, image):
    path = build_dense_model(tmp_path, channels=3, output_kind="probabilities")
    engine = Engine(path, config=EngineConfig(warmup=False))
    probs = engine.score(image).maps[0].scores
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, rtol=1e-5)
    plain = Engine(build_dense_model(tmp_path / "l", channels=3), config=EngineConfig(warmup=False))
    np.testing.assert_allclose(probs, plain.score(image).maps[0].scores, atol=1e-6)


def test_ceil_mode_extra_cells_are_cropped(tmp_path):
    layers = (Conv(4, 3), Pool(2, 2, ceil_mode=True), Conv(8, 3), Pool(2, 2, ceil_mode=True))
    path = build_dense_model(tmp_path, layers=layers)
    engine = Engine(path, config=EngineConfig(warmup=False))
    image = (np.random.default_rng(2).random((27, 35)) * 255).astype(np.uint8)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    raw = session.run(
        None, {"input": preprocess(image[:, :, None], engine.metadata.preprocessing)[None]}
    )
    n = ((27 - 12) // 4 + 1, (35 - 16) // 4 + 1)
    assert raw[0].shape[2:] != n  # the net itself returns a partial extra cell
    scores = engine.score(image, ScoreOptions(probabilities=False)).maps[0].scores
    np.testing.assert_array_equal(scores, raw[0][0, :, : n[0], : n[1]])


def test_multiscale_boxes_map_back_to_original_pixels(engine, model_path, image):
    scales = (1.0, 1.5, 0.62)
    result = engine.score(image, ScoreOptions(scales=scales, probabilities=False))
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    assert [m.geometry.scale for m in result.maps] == list(scales)
    assert result.image_size == (45, 57)
    for scale, m in zip(scales, result.maps, strict=True):
        size = (round(45 * scale), round(57 * scale))
        assert m.geometry.resize == (size[0] / 45, size[1] / 57)
        resized = np.asarray(Image.fromarray(image).resize(size[::-1], Image.Resampling.BILINEAR))
        resized_chw = preprocess(resized, engine.metadata.preprocessing)
        n = ((size[0] - 12) // 4 + 1, (size[1] - 16) // 4 + 1)
        assert m.shape == n
        # every cell is the model on its crop of the resized image (the oracle, stride 4)
        np.testing.assert_array_equal(m.scores, crop_reference(session, resized_chw, n, STRIDE))
        for i, j in [(0, 0), (n[0] - 1, n[1] - 1), (n[0] // 2, 1)]:
            top, left, bottom, right = m.geometry.window_at(i, j)
            # the window, mapped back into the resized image, is the crop the cell scored
            r_top, r_left = round(top * size[0] / 45), round(left * size[1] / 57)
            assert (r_top, r_left) == (i * 4, j * 4)
            assert bottom - top == pytest.approx(12 * 45 / size[0])
            assert right - left == pytest.approx(16 * 57 / size[1])
    probs = [softmax(m.scores).mean(axis=(1, 2), dtype=np.float64) for m in result.maps]
    np.testing.assert_allclose(result.image_scores, np.mean(probs, axis=0), atol=1e-6)


def test_nhwc_layout_model(tmp_path, model_path, engine, image):
    """A model whose input is NHWC (metadata layout) gives the same map as the NCHW one."""
    model = onnx.load(str(model_path))
    graph = model.graph
    old_input = graph.input[0]
    old_input.name = "input_nchw"
    for node in graph.node:
        node.input[:] = ["input_nchw" if n == "input" else n for n in node.input]
    graph.node.insert(
        0, helper.make_node("Transpose", ["input"], ["input_nchw"], perm=[0, 3, 1, 2])
    )
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, "h", "w", 3]))
    text = model.metadata_props[0].value.replace('"layout": "NCHW"', '"layout": "NHWC"')
    assert text != model.metadata_props[0].value
    model.metadata_props[0].value = text
    onnx.save(model, str(tmp_path / "model.onnx"))
    nhwc = Engine(tmp_path / "model.onnx", config=EngineConfig(warmup=False))
    options = ScoreOptions(probabilities=False, output_stride=2)
    np.testing.assert_array_equal(
        nhwc.score(image, options).maps[0].scores, engine.score(image, options).maps[0].scores
    )
    # shape inference reads H and W from axes 1, 2; the peak (conv + relu outputs, their 4
    # channels padded to onnxruntime's NCHWc block on CPU) is the same
    channels = -(-4 // nchwc_block()) * nchwc_block()
    assert (
        nhwc.estimate_bytes(45, 57) == engine.estimate_bytes(45, 57) == 2 * channels * 43 * 55 * 4
    )
