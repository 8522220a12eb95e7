"""Image data that ends before its declared size is refused, for every format, before work."""

from __future__ import annotations

import importlib
import io
import struct

import grpc
import numpy as np
import pytest
from PIL import Image, ImageFile

from densemap.service._proto.densemap.v1 import densemap_pb2 as pb
from densemap.service._proto.densemap.v1 import densemap_pb2_grpc as pb_grpc
from densemap.service.engine.image_input import decode
from densemap.service.errors import InvalidImage
from densemap.service.truncation import TRUNCATED
from tests.support.server_harness import GREY, channel

BIG = 2**28  # a pixel limit that lets every header below through
IMAGE = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
FORMATS = [
    ("PNG", {}),
    ("JPEG", {}),
    ("JPEG", {"progressive": True}),
    ("WEBP", {}),
    ("WEBP", {"lossless": True}),
    ("BMP", {}),
    ("TIFF", {}),
    ("TIFF", {"compression": "tiff_lzw"}),
    ("TIFF", {"compression": "jpeg"}),
]


def encode(fmt: str, image: np.ndarray = IMAGE, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def huge_jpeg(side: int = 16384) -> bytes:
    """A valid 8x8 JPEG (a few hundred bytes) whose frame header declares side x side."""
    data = encode("JPEG", np.full((8, 8), 128, np.uint8), quality=50)
    at = data.index(b"\xff\xc0") + 5
    return data[:at] + struct.pack(">HH", side, side) + data[at + 4 :]


@pytest.mark.parametrize(("fmt", "options"), FORMATS, ids=lambda v: str(v))
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_short_data_is_refused_with_one_message(fmt, options, keep):
    data = encode(fmt, **options)
    assert decode(data, color="RGB", max_pixels=BIG).shape == IMAGE.shape
    with pytest.raises(InvalidImage, match=TRUNCATED):
        decode(data[: int(len(data) * keep)], color="RGB", max_pixels=BIG)


def test_a_tiny_jpeg_declaring_16384_squared_is_refused_before_decoding():
    data = huge_jpeg()
    assert len(data) < 700
    with pytest.raises(InvalidImage, match=TRUNCATED + r" \(JPEG: \d+ bytes of scan data"):
        decode(data, color="RGB", max_pixels=BIG)


def test_flat_images_compress_within_the_jpeg_bound():
    flat = np.full((1024, 1024, 3), 200, np.uint8)
    for options in ({}, {"progressive": True}, {"quality": 1}, {"subsampling": 2}):
        assert decode(encode("JPEG", flat, **options), color="L", max_pixels=BIG).shape[:2] == (
            1024,
            1024,
        )


def test_nothing_enables_pillow_truncated_loading():
    for module in (
        "densemap.service.server.app",
        "densemap.service.batch.run",
        "densemap.service.score_cli",
        "densemap.service.cli",
    ):
        importlib.import_module(module)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_score_answers_the_tiny_huge_jpeg_with_invalid_argument(server):
    _, target = server
    request = pb.ScoreRequest(model=GREY)
    request.image.encoded = huge_jpeg()
    with channel(target) as chan, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.DensemapStub(chan).Score(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(TRUNCATED)
