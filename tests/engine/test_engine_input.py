"""Engine inputs and errors: formats, EXIF, bombs, bad options, NaN, broken models, cancel."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import onnx
import pytest
from PIL import Image, features

from densemap.service.contract import METADATA_KEY
from densemap.service.engine import Engine, EngineConfig, ScoreOptions
from densemap.service.engine.image_input import decode
from densemap.service.errors import (
    Cancelled,
    ImageTooLarge,
    ImageTooSmall,
    InvalidImage,
    InvalidOption,
    ModelLoadError,
)
from tests.support.dense_models import build_dense_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_dense_model(tmp_path_factory.mktemp("m"), channels=3, with_atrous=(2,))


@pytest.fixture(scope="module")
def engine(model_path):
    return Engine(model_path)


@pytest.fixture(scope="module")
def image():
    return (np.random.default_rng(5).random((30, 41, 3)) * 255).astype(np.uint8)


def encode(pixels, fmt, **params):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_header_only(width, height):
    """A PNG whose IHDR declares width x height; its pixel data is a few bytes."""

    def chunk(kind, data):
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP", "PPM"])
def test_lossless_formats_decode_exactly(engine, image, fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    params = {"lossless": True} if fmt == "WEBP" else {}
    np.testing.assert_array_equal(engine.decode(encode(image, fmt, **params)), image)


def test_jpeg_and_exif_orientation(engine, image):
    data = encode(image, "JPEG", quality=95)
    decoded = engine.decode(data)
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated = engine.decode(encode(image, "PNG", exif=exif.tobytes()))
    np.testing.assert_array_equal(rotated, np.rot90(image, k=-1))


def test_color_orders():
    rgb = (np.arange(2 * 3 * 3) * 9 % 256).astype(np.uint8).reshape(2, 3, 3)
    data = encode(rgb, "PNG")
    np.testing.assert_array_equal(decode(data, color="BGR", max_pixels=100), rgb[:, :, ::-1])
    grey = decode(data, color="L", max_pixels=100)
    np.testing.assert_array_equal(grey[:, :, 0], np.asarray(Image.fromarray(rgb).convert("L")))


def test_corrupt_and_empty_bytes(engine, image):
    for data in (b"", b"not an image at all", encode(image, "PNG")[:60]):
        with pytest.raises(InvalidImage):
            engine.score(data)
    with pytest.raises(InvalidImage, match="supported formats"):
        engine.score(encode(image, "PCX"))


def test_header_only_bomb_is_refused_before_decoding(model_path):
    bomb = png_header_only(12000, 12000)  # 144 M pixels declared in 57 bytes
    engine = Engine(model_path, config=EngineConfig(warmup=False, max_pixels=10**8))
    started = time.perf_counter()
    with pytest.raises(ImageTooLarge, match="over the limit of 100000000 pixels"):
        engine.score(bomb)
    assert time.perf_counter() - started < 1.0  # decoding 144 M pixels would take seconds
    lenient = Engine(model_path, config=EngineConfig(warmup=False, max_pixels=10**12))
    started = time.perf_counter()
    with pytest.raises(ImageTooLarge, match="limit (of|is) 1000000000000 pixels"):
        lenient.score(png_header_only(1_500_000, 1_000_000))  # 1.5e12 pixels
    assert time.perf_counter() - started < 1.0


def test_too_small_names_the_window(engine):
    with pytest.raises(ImageTooSmall, match="R = 12x16"):
        engine.score(np.zeros((11, 40, 3), np.uint8))
    with pytest.raises(ImageTooSmall, match="at scale 0.5"):
        engine.score(np.zeros((20, 40, 3), np.uint8), ScoreOptions(scales=(1.0, 0.5)))


def test_too_large_arrays_and_scales(model_path):
    engine = Engine(model_path, config=EngineConfig(warmup=False, max_pixels=2000))
    with pytest.raises(ImageTooLarge, match="2000 pixels"):
        engine.score(np.zeros((50, 50, 3), np.uint8))
    with pytest.raises(ImageTooLarge, match="at scale 2"):
        engine.score(np.zeros((30, 40, 3), np.uint8), ScoreOptions(scales=(2.0,)))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(output_stride=3), "use one of 4, 2, 1"),
        (dict(output_stride=8), "not supported"),
        (dict(dtype="int8"), "dtype"),
        (dict(top_k=6), "at most 5"),
        (dict(top_k=-1), "top_k"),
        (dict(classes=(7,)), r"\[7\]"),
        (dict(classes=()), "empty"),
        (dict(classes=(1, 1)), "duplicates"),
        (dict(scales=()), "between 1 and"),
        (dict(scales=(0.0,)), "> 0"),
        (dict(scales=(float("nan"),)), "finite"),
    ],
)
def test_bad_options(engine, image, options, message):
    """Refused by ScoreOptions when built (its own values) or by the engine (the model)."""
    with pytest.raises(InvalidOption, match=message):
        engine.score(image, ScoreOptions(**options))


def test_logits_from_a_probabilities_model(tmp_path, image):
    path = build_dense_model(tmp_path, channels=3, output_kind="probabilities")
    engine = Engine(path, config=EngineConfig(warmup=False))
    with pytest.raises(InvalidOption, match="probabilities=True"):
        engine.score(image, ScoreOptions(probabilities=False))


def test_bad_arrays(engine):
    bad_float = np.zeros((3, 20, 20), np.float32)
    for value in (np.nan, np.inf, -np.inf):
        bad_float[1, 5, 5] = value
        with pytest.raises(InvalidImage, match="NaN or Inf"):
            engine.score(bad_float)
    with pytest.raises(InvalidImage, match="NaN or Inf"):
        engine.score(np.full((3, 20, 20), 1e300))  # float64 overflowing float32
    for array in (
        np.zeros((20, 20, 4), np.uint8),
        np.zeros((1, 20, 20, 3), np.uint8),
        np.zeros((20, 20, 3), np.int32),
        np.zeros((20, 20, 3), np.float32),
    ):
        with pytest.raises(InvalidImage):
            engine.score(array)
    with pytest.raises(InvalidImage, match="bytes or a numpy array"):
        engine.score("image.png")
    grey = engine.score(np.full((20, 20), 7, np.uint8)).maps[0].scores
    rgb = engine.score(np.full((20, 20, 3), 7, np.uint8)).maps[0].scores
    np.testing.assert_array_equal(grey, rgb)


@pytest.mark.parametrize(
    "shape, dtype, message",
    [
        # a (64, 64, 1) float array was once "64x1 pixels, smaller than the window"
        ((64, 64, 1), np.float32, r"CxHxW \(channels first\) with C=3, got shape \(64, 64, 1\), "
         r"which looks channels last \(HxWxC with C=1\): transpose it"),
        ((64, 64, 3), np.float64, r"looks channels last \(HxWxC with C=3\): transpose it "
         r"\(image.transpose\(2, 0, 1\)\)"),
        ((1, 64, 64), np.float32, r"the model wants 3 channels, got 1 \(an array of shape"),
        ((3, 64, 64), np.uint8, r"HxW or HxWxC \(channels last\) with C=3, got shape \(3, 64, 64\), "
         r"which looks channels first \(CxHxW with C=3\): transpose it \(image.transpose\(1, 2, 0\)\)"),
        ((64, 64, 4), np.uint8, r"the model wants 3 channels per pixel in its color order, got 4"),
        ((2, 64, 64, 3), np.uint8, r"got an array of 4 dimensions, shape \(2, 64, 64, 3\)"),
        ((64, 64), np.float32, r"got an array of 2 dimensions, shape \(64, 64\)"),
    ],
)  # fmt: skip
def test_shape_errors_name_the_layout_or_the_channels(engine, shape, dtype, message):
    """What is wrong (channels first or last, the channel count, the rank), before any size
    is read from the wrong axes; the same from estimate_image (the server's admission) and score."""
    array = np.zeros(shape, dtype)
    for call in (engine.score, engine.estimate_image):
        with pytest.raises(InvalidImage, match=message) as caught:
            call(array)
        assert "pixels" not in str(caught.value).replace("uint8 HxWxC pixels", "")


def test_cancel_between_passes(engine, image):
    calls = []

    def cancel_after_two():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        engine.score(image, ScoreOptions(output_stride=1), cancel=cancel_after_two)
    assert len(calls) == 3  # checked before decoding, scale 1.0 and the first pass
    assert engine.score(image, cancel=lambda: False).maps[0].shape == (5, 7)


def _rewrite_metadata(source, target, text):
    model = onnx.load(str(source))
    del model.metadata_props[:]
    if text is not None:
        model.metadata_props.add(key=METADATA_KEY, value=text)
    onnx.save(model, str(target))


def test_model_load_errors(tmp_path, model_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Engine(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelLoadError, match="not a readable ONNX model"):
        Engine(corrupt)
    _rewrite_metadata(model_path, tmp_path / "plain.onnx", None)
    with pytest.raises(ModelLoadError, match="no 'densemap' metadata"):
        Engine(tmp_path / "plain.onnx")
    _rewrite_metadata(model_path, tmp_path / "badjson.onnx", "{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        Engine(tmp_path / "badjson.onnx")
    with pytest.raises(ModelLoadError, match="labels"):
        Engine(model_path, labels=("a", "b"))
    with pytest.raises(InvalidOption, match="EngineConfig.device"):
        Engine(model_path, config=EngineConfig(device="tpu"))


def test_missing_variant_and_wrong_geometry(tmp_path):
    path = build_dense_model(tmp_path / "v", with_atrous=(2,))
    (path.parent / "model_s2.onnx").unlink()
    with pytest.raises(ModelLoadError, match="model_s2.onnx does not exist"):
        Engine(path)
    path = build_dense_model(tmp_path / "g")
    model = onnx.load(str(path))
    text = model.metadata_props[0].value.replace('"stride": [4, 4]', '"stride": [2, 2]')
    assert text != model.metadata_props[0].value
    _rewrite_metadata(path, path, text)
    with pytest.raises(ModelLoadError, match="metadata geometry is wrong"):
        Engine(path)  # the warm-up pass catches a model that gives fewer cells than promised
