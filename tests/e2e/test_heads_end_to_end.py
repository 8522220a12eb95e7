"""A classifier with a class head and a box head, from its ONNX export to every surface.

``densemap convert --head boxes=regression`` turns the exported classifier into a dense
model; the server then returns both maps through densemap.v1 (the Python client) and KServe
(stock tritonclient), and ``densemap score`` writes both into its ``.npz`` files. Each map is
checked against the ORIGINAL classifier run window by window in float64: no part of
densemap computes the reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton

from densemap.convert.export import export_classifier_onnx
from densemap.service.batch.outputs import load_result
from densemap.service.cli import main
from densemap.service.client import DensemapClient
from densemap.service.engine import preprocess
from tests.support.convert_heads_support import STRIDE, WINDOW, TwoHeads
from tests.support.oracle import crop_by_crop, torch_classifier
from tests.support.score_fixtures import encode
from tests.support.server_harness import HOST, rgb_image, start_server

MODEL = "detector"
# float32 dense maps against the float64 classifier: a few float32 roundings of values ~1.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def classifier() -> TwoHeads:
    return TwoHeads(form="tuple", shared=True, seed=5).eval()


@pytest.fixture(scope="module")
def repo(tmp_path_factory, classifier) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    exported = root / "detector.onnx"
    proto = export_classifier_onnx(
        classifier, input_size=WINDOW, in_channels=3, dynamo=False, output_names=("scores", "boxes")
    )
    onnx.save_model(proto, str(exported))
    (root / "boxes.txt").write_text("dy0\ndx0\ndy1\ndx1\n")
    out = root / "models" / MODEL / "model.onnx"
    code = main(["convert", str(exported), "-o", str(out), "--preprocessing", "unit",
                 "--head", "boxes=regression",
                 "--head-labels", f"boxes={root / 'boxes.txt'}"])  # fmt: skip
    assert code == 0
    return root / "models"


def reference(classifier: TwoHeads, image: np.ndarray, repo: Path) -> dict[str, np.ndarray]:
    """Each head of the classifier on every window at the native stride, in float64: the
    crop-by-crop oracle (the preprocessing is per pixel, so it commutes with cropping)."""
    from densemap.service.engine import Engine

    metadata = Engine(repo / MODEL / "model.onnx").metadata
    image_nchw = preprocess(image, metadata.preprocessing)[None]
    classify = torch_classifier(classifier)  # a float64 copy
    scores, boxes = crop_by_crop(classify, image_nchw, window=WINDOW, stride=STRIDE, batched=True)
    return {"scores": scores[0], "boxes": boxes[0]}


@pytest.fixture(scope="module")
def target(repo):
    server, port = start_server(repo)
    yield f"{HOST}:{port}"
    server.stop()


def test_converted_metadata_names_both_heads(repo):
    from densemap.service.engine import Engine

    heads = Engine(repo / MODEL / "model.onnx").metadata.heads
    assert [(h.name, h.kind) for h in heads] == [("scores", "logits"), ("boxes", "regression")]
    assert heads[1].labels == ("dy0", "dx0", "dy1", "dx1")


def test_densemap_v1_serves_both_maps(target, classifier, repo):
    image = rgb_image(41, 53, seed=3)
    want = reference(classifier, image, repo)
    with DensemapClient(target, timeout=30) as client:
        result = client.score(image, model=MODEL, probabilities=False)
    np.testing.assert_allclose(result.maps[0].scores, want["scores"], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(
        result.maps[0].head_maps["boxes"], want["boxes"], atol=TOLERANCE, rtol=0
    )


def test_kserve_serves_both_maps_to_tritonclient(target, classifier, repo):
    image = rgb_image(37, 44, seed=4)
    want = reference(classifier, image, repo)
    tensor = triton.InferInput("image", list(image.shape), "UINT8")
    tensor.set_data_from_numpy(image)
    with triton.InferenceServerClient(target) as client:
        result = client.infer(MODEL, [tensor], parameters={"probabilities": False})
    np.testing.assert_allclose(result.as_numpy("scores"), want["scores"], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(result.as_numpy("boxes"), want["boxes"], atol=TOLERANCE, rtol=0)


def test_score_writes_both_maps(capsys, tmp_path, classifier, repo):
    image = rgb_image(45, 39, seed=6)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "page.png").write_bytes(encode(image, "PNG"))
    out = tmp_path / "out"
    code = main(["score", str(tmp_path / "in"), "--out", str(out), "--models", str(repo),
                 "--model", MODEL, "--map-dtype", "fp32", "--logits"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    want = reference(classifier, image, repo)
    result, _ = load_result(out / "page.png.npz")
    np.testing.assert_allclose(result.maps[0].scores, want["scores"], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(
        result.maps[0].head_maps["boxes"], want["boxes"], atol=TOLERANCE, rtol=0
    )
