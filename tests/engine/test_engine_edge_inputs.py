"""Engine edge cases found in review: image modes, empty arrays, odd options, cancel callbacks."""

from __future__ import annotations

import io
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from PIL import Image, ImageOps

from densemap.service.contract import ModelMetadata
from densemap.service.engine import Engine, EngineConfig, ModelRepository, ScoreOptions
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
    return build_dense_model(tmp_path_factory.mktemp("m"), channels=3)


@pytest.fixture(scope="module")
def engine(model_path):
    return Engine(model_path, config=EngineConfig(warmup=False))


@pytest.fixture(scope="module")
def image():
    return (np.random.default_rng(7).random((30, 41, 3)) * 255).astype(np.uint8)


def save(picture, fmt, **params):
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def test_16_bit_grey_keeps_its_high_byte(engine):
    grey16 = (np.random.default_rng(1).random((30, 41)) * 65535).astype(np.uint16)
    for fmt in ("PNG", "TIFF"):
        data = save(Image.fromarray(grey16), fmt)
        pixels = decode(data, color="L", max_pixels=10**6)
        # Pillow's own convert("L") clips 16-bit values at 255: a nearly white image.
        np.testing.assert_array_equal(pixels[:, :, 0], grey16 >> 8)
        scores = engine.score(data).maps[0].scores
        expected = engine.score((grey16 >> 8).astype(np.uint8)).maps[0].scores
        np.testing.assert_array_equal(scores, expected)


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32_bit_and_float_images_are_refused(engine, mode):
    values = np.random.default_rng(2).random((30, 41))
    array = (values * 1000).astype(np.int32) if mode == "I" else values.astype(np.float32)
    with pytest.raises(InvalidImage, match="no defined 8-bit range"):
        engine.score(save(Image.fromarray(array), "TIFF"))


def test_unsupported_format_is_named(engine, image):
    with pytest.raises(InvalidImage, match=r"\(PCX\).*supported formats") as caught:
        engine.score(save(Image.fromarray(image), "PCX"))
    assert "BytesIO" not in str(caught.value)
    with pytest.raises(InvalidImage, match="cannot decode"):
        engine.score(b"<svg xmlns='http://www.w3.org/2000/svg' width='40' height='40'/>")


def test_multi_frame_files_give_their_first_frame(engine):
    frames = [Image.fromarray(np.full((30, 41, 3), v, np.uint8)) for v in (10, 200)]
    for fmt, params in (("TIFF", {}), ("WEBP", {"lossless": True}), ("GIF", {})):
        data = save(frames[0], fmt, save_all=True, append_images=frames[1:], **params)
        assert np.all(engine.decode(data) == 10), fmt


def test_gif_and_pgm_decode_to_their_pixels(engine, image):
    palette = Image.fromarray(image).quantize(colors=32)  # a GIF holds palette images exactly
    data = save(palette, "GIF")
    np.testing.assert_array_equal(engine.decode(data), np.asarray(palette.convert("RGB")))
    grey = image[:, :, 0]
    pixels = decode(save(Image.fromarray(grey), "PPM"), color="L", max_pixels=10**6)
    np.testing.assert_array_equal(pixels[:, :, 0], grey)


def test_every_listed_extension_is_a_format_the_engine_decodes():
    from densemap.service.batch.walk import IMAGE_EXTENSIONS
    from densemap.service.engine.image_input import FORMATS

    Image.init()
    listed = {Image.EXTENSION[ext] for ext in IMAGE_EXTENSIONS}
    assert listed - {"MPO"} <= set(FORMATS), listed - set(FORMATS)
    assert set(FORMATS) <= listed  # and every decoded format is found in folders


@pytest.mark.parametrize("orientation", range(2, 9))
def test_every_exif_orientation_is_applied(engine, image, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = save(Image.fromarray(image), "PNG", exif=exif.tobytes())
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert upright.shape[:2] == ((41, 30) if orientation >= 5 else (30, 41))
    np.testing.assert_array_equal(engine.decode(data), upright)
    result = engine.score(data)
    assert result.image_size == upright.shape[:2]
    np.testing.assert_array_equal(result.maps[0].scores, engine.score(upright).maps[0].scores)


@pytest.mark.parametrize("shape", [(0, 0, 3), (30, 0, 3), (0, 41)])
def test_empty_arrays_are_invalid_not_too_small(engine, shape):
    with pytest.raises(InvalidImage, match="no pixel") as caught:
        engine.score(np.zeros(shape, np.uint8))
    assert not isinstance(caught.value, ImageTooSmall)  # "1x1 pixels" would be a lie
    with pytest.raises(InvalidImage, match="no pixel"):
        engine.score(np.zeros((3, 0, 41), np.float32))


def test_huge_scales_are_refused_without_overflow(engine, image):
    for scale in (1e6, 1e300, 1e308):
        with pytest.raises(ImageTooLarge, match="at scale"):
            engine.score(image, ScoreOptions(scales=(1.0, scale)))
    with pytest.raises(
        ImageTooSmall, match="at scale 1e-09, smaller than the model.s window R = 12x16"
    ):
        engine.score(image, ScoreOptions(scales=(1e-9,)))


def test_pixel_limit_applies_to_the_resized_size(model_path, image):
    engine = Engine(model_path, config=EngineConfig(warmup=False, max_pixels=30 * 41 * 4))
    assert engine.score(image, ScoreOptions(scales=(2.0,))).maps[0].shape == (13, 17)
    with pytest.raises(ImageTooLarge, match="at scale 2.1"):
        engine.score(image, ScoreOptions(scales=(2.1,)))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(scales=(True,)), "sequence of numbers"),
        (dict(scales="1.5"), "sequence of numbers"),
        (dict(dtype="float64"), "dtype must be one of"),
        (dict(dtype="half"), "dtype must be one of"),
        (dict(probabilities="no"), "probabilities must be True or False"),
        (dict(argmax=1), "argmax must be True or False"),
        (dict(include_map=None), "include_map must be True or False"),
        (dict(output_stride=0), "output_stride must be >= 1"),
        (dict(output_stride=-2), "output_stride must be >= 1"),
        (dict(output_stride=2.0), "output_stride must be an int"),
        (dict(image_top_k=-1), "image_top_k"),
    ],
)
def test_more_bad_options(engine, image, options, message):
    with pytest.raises(InvalidOption, match=message):
        engine.score(image, ScoreOptions(**options))


@pytest.mark.parametrize("options", [None, {"top_k": 1}])
def test_options_of_the_wrong_type(engine, image, options):
    with pytest.raises(InvalidOption, match="ScoreOptions"):
        engine.score(image, options)


def test_server_dtype_spellings_are_accepted(engine, image):
    half = engine.score(image, ScoreOptions(dtype="fp16")).maps[0].scores
    single = engine.score(image, ScoreOptions(dtype="fp32")).maps[0].scores
    assert half.dtype == np.float16 and single.dtype == np.float32
    np.testing.assert_array_equal(half, single.astype(np.float16))


def test_numpy_stride_gives_plain_int_geometry(engine, image):
    geometry = engine.score(image, ScoreOptions(output_stride=np.int64(2))).maps[0].geometry
    assert geometry.stride == (2, 2) and all(type(s) is int for s in geometry.stride)


def test_image_scores_only_still_give_the_map_shape(engine, image):
    result = engine.score(image, ScoreOptions(include_map=False, scales=(1.0, 1.5)))
    full = engine.score(image, ScoreOptions(scales=(1.0, 1.5)))
    for bare, with_map in zip(result.maps, full.maps, strict=True):
        assert bare.scores is None and bare.argmax is None and bare.top_k_indices is None
        assert bare.shape == with_map.shape
    np.testing.assert_array_equal(result.image_scores, full.image_scores)


def test_cancel_callback_that_raises_or_is_not_callable(engine, image):
    def broken():
        raise RuntimeError("deadline lookup failed")

    with pytest.raises(Cancelled, match="deadline lookup failed") as caught:
        engine.score(image, cancel=broken)
    assert isinstance(caught.value.__cause__, RuntimeError)
    with pytest.raises(Cancelled, match="before decoding"):
        engine.score(image, cancel=lambda: True)
    with pytest.raises(InvalidOption, match="callable"):
        engine.score(image, cancel=5)

    def deadline():
        raise Cancelled("deadline exceeded")

    with pytest.raises(Cancelled, match="^deadline exceeded$"):
        engine.score(image, cancel=deadline)  # the callback's own Cancelled passes unchanged


def test_estimate_refuses_sizes_without_a_pass(engine):
    assert engine.estimate_bytes(12, 16) > 0
    for height, width in ((0, 0), (-3, 20), (11, 16)):
        with pytest.raises(ImageTooSmall, match="R = 12x16"):
            engine.estimate_bytes(height, width)
    with pytest.raises(InvalidOption, match="ints"):
        engine.estimate_bytes(20.5, 30)


def test_bool_limits_are_not_ints():
    with pytest.raises(InvalidOption, match="EngineConfig.max_pixels must be an int, got True"):
        EngineConfig(max_pixels=True)


def test_engine_limit_not_pillows_bomb_guard_decides(model_path, image, monkeypatch):
    # Pillow's default guard refuses encoded images over 179 M pixels, below the engine's
    # 256 M default: shrink Pillow's guard to model that gap on a small image.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    engine = Engine(model_path, config=EngineConfig(warmup=False, max_pixels=30 * 41))
    data = save(Image.fromarray(image), "PNG")  # 1230 pixels > 2 x 100
    np.testing.assert_array_equal(engine.decode(data), image)
    assert Image.MAX_IMAGE_PIXELS == 615  # raised to half the engine's limit
    small = Engine(model_path, config=EngineConfig(warmup=False, max_pixels=30 * 40))
    with pytest.raises(ImageTooLarge, match="over the limit of 1200 pixels"):
        small.score(data)


def test_float_input_overflowing_the_net_is_refused_not_nan(engine):
    fine = engine.score(np.full((3, 30, 41), 1e10, np.float32)).maps[0].scores
    assert np.isfinite(fine).all()
    with pytest.raises(InvalidImage, match="NaN or Inf at scale 1"):
        engine.score(np.full((3, 30, 41), 3e38, np.float32))  # finite, but conv overflows


def test_model_returning_nan_is_a_model_error(model_path, tmp_path, image):
    model = onnx.load(str(model_path))
    bias = model.graph.initializer[-1]  # the head's bias
    values = onnx.numpy_helper.to_array(bias).copy()
    values[0] = np.nan
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    onnx.save(model, str(tmp_path / "model.onnx"))
    broken = Engine(tmp_path / "model.onnx", config=EngineConfig(warmup=False))
    with pytest.raises(ModelLoadError, match="NaN or Inf on a valid uint8 image"):
        broken.score(image)


def test_decode_names_a_wrong_type(engine, image):
    with pytest.raises(InvalidImage, match="got ndarray"):
        engine.decode(image)


def test_lab_tiff_decodes_for_grey_models(image):
    data = save(Image.fromarray(image).convert("LAB"), "TIFF")
    rgb = decode(data, color="RGB", max_pixels=10**6)
    grey = decode(data, color="L", max_pixels=10**6)  # Pillow has no direct LAB -> L
    np.testing.assert_array_equal(grey[:, :, 0], np.asarray(Image.fromarray(rgb).convert("L")))


def test_scales_from_any_iterable(engine, image):
    for scales in ((s for s in (1.0, 1.5)), np.array([1.0, 1.5]), [1, 1.5]):
        assert [
            m.geometry.scale for m in engine.score(image, ScoreOptions(scales=scales)).maps
        ] == [
            1.0,
            1.5,
        ]


def _with_metadata(source: Path, folder: Path, **preprocessing) -> Path:
    model = onnx.load(str(source))
    metadata = ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
    changed = replace(metadata, preprocessing=replace(metadata.preprocessing, **preprocessing))
    del model.metadata_props[:]
    for key, value in changed.to_props().items():
        model.metadata_props.add(key=key, value=value)
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


def test_graph_not_matching_its_metadata_is_a_load_error(model_path, tmp_path):
    grey = _with_metadata(model_path, tmp_path / "grey", color="L", mean=(0.5,), std=(0.25,))
    with pytest.raises(ModelLoadError, match=r"onnxruntime failed on a \[1, 1, 12, 16\] input"):
        Engine(grey)
    nhwc = _with_metadata(model_path, tmp_path / "nhwc", layout="NHWC")
    with pytest.raises(ModelLoadError, match="does not match its metadata"):
        Engine(nhwc)
    shutil.copytree(model_path.parent, tmp_path / "good")
    repository = ModelRepository(tmp_path)  # the bad folders must not stop the scan
    assert repository.names == ["good"]
    assert set(repository.errors) == {"grey", "nhwc"}
