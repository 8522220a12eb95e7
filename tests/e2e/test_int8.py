"""int8 precision end to end on CPU: ``densemap convert --int8-calibration`` ->
metadata -> engine ``precision="int8"`` -> densemap.v1, KServe, the score CLI, densemap.json.

Tolerance of int8 against fp32 (held-out image of the calibration images' kind): argmax
agreement >= 98% of cells and max |z - z_fp32| <= 2% of the fp32 logit range. Static int8
rounds every activation to 1/255 of its calibrated range, and the net here has four
quantized layers, so a few such steps (2% is five) of the logit range is the expected
deviation (measured here: 0.4%, 100% agreement); near-ties between classes may flip, hence
agreement and not equality. The
plumbing itself is checked exactly: the engine's int8 map equals a bare onnxruntime session
on the int8 file.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as triton
from PIL import Image
from torch import nn
from tritonclient.utils import InferenceServerException

import densemap.convert.int8 as int8_module
from densemap.convert.int8 import DEFAULT_AGREEMENT_FLOOR, agreement_warning
from densemap.convert.pipeline import read_metadata
from densemap.service.batch.outputs import load_result
from densemap.service.cli import main
from densemap.service.client import DensemapClient, RemoteError
from densemap.service.contract import Geometry, Int8Copies, ModelMetadata
from densemap.service.engine import Engine, EngineConfig, ModelRepository, ScoreOptions, preprocess
from densemap.service.errors import InvalidOption, ModelLoadError
from tests.support.convert_onnx_support import export_classifier
from tests.support.server_harness import HOST, TINY, start_server

NAME = "quant"
WINDOW = 16
LOGITS = ScoreOptions(probabilities=False, argmax=True, image_top_k=0)
INT8 = replace(LOGITS, precision="int8")


def classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 2 * 2, 32), nn.ReLU(), nn.Linear(32, 5),
    ).eval()  # fmt: skip


def picture(seed: int, size=(60, 72)) -> np.ndarray:
    """Smooth colour blobs (a coarse random grid, upscaled): structure, not uniform noise."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize(size[::-1], Image.BILINEAR))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(model path, calibration folder, convert's stdout) of a classifier converted with
    an à-trous variant at stride 2 and int8 copies, through the CLI."""
    root = tmp_path_factory.mktemp("int8")
    source = root / "classifier.onnx"
    onnx.save(export_classifier(classifier(), WINDOW, dynamo=False), str(source))
    images = root / "calibration"
    images.mkdir()
    for seed in range(6):
        Image.fromarray(picture(seed)).save(images / f"page_{seed}.png")
    model = root / "models" / NAME / "model.onnx"
    argv = ["convert", str(source), "-o", str(model), "--preprocessing", "unit", "--strides", "4,2"]
    assert main([*argv, "--int8-calibration", str(images)]) == 0
    return model, images


@pytest.fixture(scope="module")
def engine(converted):
    return Engine(converted[0], name=NAME)


def held_out() -> np.ndarray:
    return picture(100, size=(80, 96))


def test_convert_writes_int8_copies_recorded_in_the_metadata(converted):
    model, _ = converted
    meta = read_metadata(model)
    copies = meta.int8
    assert copies.file == "model.int8.onnx"
    assert [(v.stride, v.file) for v in copies.variants] == [((2, 2), "model.s2.int8.onnx")]
    for name in (copies.file, copies.variants[0].file):
        quantized = onnx.load(str(model.parent / name))
        ops = {node.op_type for node in quantized.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # static QDQ
        assert quantized.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert copies.images == 6
    # cells of the 6 calibration images (60x72) at stride 4 and at stride 2
    assert copies.cells == 6 * (12 * 15 + 23 * 29)
    assert DEFAULT_AGREEMENT_FLOOR <= copies.argmax_agreement <= 1.0
    assert 0.0 < copies.max_logit_deviation < 0.02
    assert ModelMetadata.from_json(meta.to_json()) == meta  # round trip, int8 included


def test_contract_int8_is_optional_and_checked():
    doc = json.loads(ModelMetadata(geometry=Geometry(4, 2, 4)).to_json())
    assert "int8" not in doc  # a model without copies writes what it wrote before
    assert ModelMetadata.from_json(json.dumps(doc)).int8 is None
    doc["int8"] = {"file": "model.int8.onnx", "images": 3, "argmax_agreement": 0.995}
    copies = ModelMetadata.from_json(json.dumps(doc)).int8
    assert copies == Int8Copies(file="model.int8.onnx", images=3, argmax_agreement=0.995)
    for bad, words in (
        ({"file": "../x.onnx"}, "bare file name"),
        ({"file": "m.onnx", "images": -1}, "'images' must be a count"),
        ({"file": "m.onnx", "argmax_agreement": "high"}, "'argmax_agreement' must be a number"),
        ("model.int8.onnx", "must be an object"),
    ):
        doc["int8"] = bad
        with pytest.raises(ModelLoadError, match=words):
            ModelMetadata.from_json(json.dumps(doc))


def test_engine_int8_is_close_to_fp32_and_is_the_int8_file(engine, converted):
    model, _ = converted
    assert engine.precisions == ("fp32", "tf32", "fp16", "int8")
    (report,) = engine.precision_report  # the calibration figures, without warm-up reports
    copies = read_metadata(model).int8
    assert report.precision == "int8" and report.cells == copies.cells
    assert report.argmax_agreement == copies.argmax_agreement
    assert report.image == "6 calibration images (at conversion)"
    image = held_out()
    batch = preprocess(image, engine.metadata.preprocessing)[None]
    for stride, file in ((None, copies.file), (2, copies.variants[0].file)):
        options = replace(LOGITS, output_stride=stride)
        exact = engine.score(image, options).maps[0]
        quantized = engine.score(image, replace(options, precision="int8")).maps[0]
        assert not np.array_equal(exact.scores, quantized.scores)  # int8 really ran
        bare = ort.InferenceSession(str(model.parent / file), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(
            quantized.scores, bare.run(None, {"input": batch})[0][0], rtol=0, atol=1e-6
        )
        spread = exact.scores.max() - exact.scores.min()
        assert np.abs(quantized.scores - exact.scores).max() <= 0.02 * spread
        assert (quantized.argmax == exact.argmax).mean() >= 0.98


def test_int8_is_refused_by_name_where_the_model_has_no_copies(repo):
    plain = Engine(repo / TINY / "model.onnx", name=TINY)
    assert "int8" not in plain.precisions
    with pytest.raises(InvalidOption, match="--int8-calibration IMAGES_DIR"):
        plain.score(held_out(), INT8)
    with pytest.raises(ModelLoadError, match="int8 copies"):
        Engine(repo / TINY / "model.onnx", config=EngineConfig(precision="int8"))


def test_a_missing_int8_file_is_a_load_error(converted, tmp_path):
    model, _ = converted
    copy = tmp_path / NAME
    shutil.copytree(model.parent, copy)
    (copy / "model.s2.int8.onnx").unlink()
    with pytest.raises(ModelLoadError, match="model.s2.int8.onnx, which is not beside it"):
        Engine(copy / "model.onnx")


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda d: d / "absent", "no such folder"),
        (lambda d: d, "no images"),
        (lambda d: (d / "x.png").write_bytes(b"not a png") and d, "cannot read"),
        (lambda d: Image.new("RGB", (10, 40)).save(d / "small.png") or d, "smaller than"),
    ],
    ids=["missing", "empty", "corrupt", "too-small"],
)
def test_bad_calibration_folders_give_a_clear_error_and_no_files(
    converted, tmp_path, capsys, make, words
):
    source = converted[0].parents[2] / "classifier.onnx"
    folder = tmp_path / "images"
    folder.mkdir()
    given = make(folder)
    out = tmp_path / "out" / "model.onnx"
    argv = ["convert", str(source), "-o", str(out), "--preprocessing", "unit"]
    argv += ["--int8-calibration", str(given)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--int8-calibration" in err and words in err and "Traceback" not in err
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_low_agreement_is_written_with_a_warning_naming_the_figure(
    converted, tmp_path, capsys, monkeypatch
):
    copies = Int8Copies(file="m.int8.onnx", images=4, cells=100, argmax_agreement=0.9612)
    assert "96.12%" in agreement_warning(copies) and "floor 99%" in agreement_warning(copies)
    assert agreement_warning(replace(copies, argmax_agreement=0.99)) is None
    monkeypatch.setattr(int8_module, "DEFAULT_AGREEMENT_FLOOR", 1.01)  # every model under it
    model, images = converted
    out = tmp_path / "low" / "model.onnx"
    argv = ["convert", str(model.parents[2] / "classifier.onnx"), "-o", str(out)]
    argv += ["--preprocessing", "unit"]
    assert main([*argv, "--int8-calibration", str(images)]) == 0
    captured = capsys.readouterr()
    agreement = read_metadata(out).int8.argmax_agreement
    assert (out.parent / "model.int8.onnx").is_file()
    assert "densemap convert: warning: the int8 copy agrees with fp32" in captured.err
    assert f"{agreement:.2%}" in captured.err and "int8, calibrated on 6 images" in captured.out


@pytest.fixture(scope="module")
def int8_server(converted, repo):
    root = converted[0].parents[1]
    shutil.copytree(repo / TINY, root / TINY, dirs_exist_ok=True)
    srv, port = start_server(root)
    yield f"{HOST}:{port}"
    srv.stop()


def test_densemap_v1_and_get_model_offer_int8(int8_server, engine):
    image = held_out()
    with DensemapClient(int8_server, timeout=30) as client:
        remote = client.score(image, model=NAME, precision="int8", probabilities=False)
        local = engine.score(image, replace(INT8, argmax=False))
        np.testing.assert_array_equal(remote.maps[0].scores, local.maps[0].scores)
        info = client.get_model(NAME)
        assert "int8" in info.precisions
        assert info.precision_report == engine.precision_report
        assert "int8" not in client.get_model(TINY).precisions
        with pytest.raises(RemoteError) as caught:
            client.score(image, model=TINY, precision="int8")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "--int8-calibration" in str(caught.value)


def test_kserve_precision_parameter_int8(int8_server, engine):
    image = held_out()
    tensor = triton.InferInput("image", list(image.shape), "UINT8")
    tensor.set_data_from_numpy(image)
    with triton.InferenceServerClient(int8_server) as kserve:
        result = kserve.infer(NAME, [tensor], parameters={"precision": "int8"})
        expected = engine.score(image, ScoreOptions(precision="int8"))
        np.testing.assert_array_equal(result.as_numpy("scores"), expected.maps[0].scores)
        with pytest.raises(InferenceServerException) as caught:
            kserve.infer(TINY, [tensor], parameters={"precision": "int8"})
    assert "INVALID_ARGUMENT" in str(caught.value.status())
    assert "int8 copies" in caught.value.message()


def test_score_cli_and_model_settings_choose_int8(converted, engine, repo, tmp_path):
    model, _ = converted
    image = held_out()
    Image.fromarray(image).save(tmp_path / "a.png")
    out = tmp_path / "out"
    models = str(model.parents[1])
    argv = ["score", str(tmp_path / "a.png"), "--out", str(out), "--models", models]
    assert main([*argv, "--model", NAME, "--precision", "int8", "--map-dtype", "fp32"]) == 0
    result, _ = load_result(out / "a.png.npz")
    expected = engine.score(image, ScoreOptions(precision="int8"))
    np.testing.assert_array_equal(result.maps[0].scores, expected.maps[0].scores)
    root = tmp_path / "models"
    shutil.copytree(model.parent, root / NAME)
    (root / NAME / "densemap.json").write_text(json.dumps({"precision": "int8"}))
    shutil.copytree(repo / TINY, root / TINY)
    (root / TINY / "densemap.json").write_text(json.dumps({"precision": "int8"}))
    repository = ModelRepository(root, config=EngineConfig(warmup=False))
    chosen = repository.get(NAME)
    assert chosen.default_precision == "int8"
    np.testing.assert_array_equal(chosen.score(image).maps[0].scores, expected.maps[0].scores)
    assert "--int8-calibration" in repository.errors[TINY]  # no copies: not loaded, says why


def test_serve_precision_int8_is_the_servers_default(converted, repo):
    from densemap.service.cli import build_parser
    from densemap.service.serve_cli import build_config

    model, _ = converted
    args = build_parser().parse_args(["serve", "--models", str(model.parents[1])])
    assert build_config(args).engine.precision == "fp32"
    args = build_parser().parse_args(["serve", "--precision", "int8"])
    config = replace(build_config(args).engine, warmup=False)
    assert config.precision == "int8"
    assert Engine(model, config=config).default_precision == "int8"
    with pytest.raises(ModelLoadError, match="needs the model's int8 copies"):
        Engine(repo / TINY / "model.onnx", config=config)
