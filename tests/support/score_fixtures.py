"""Shared material for the ``densemap score`` tests: a tiny model repository and image folders."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from tests.support.dense_models import build_dense_model, mini_vgg_layers

MODEL = "tiny"
LABELS = ("cat", "dog", "fox", "owl", "elk")
WINDOW = (12, 16)  # small_layers: stride 4


def build_repository(root: Path, *, slow: bool = False) -> Path:
    """``root/tiny/model.onnx`` (RGB, 5 classes, stride 4, à-trous stride 2 variant).

    ``slow`` builds a mini-VGG (window 64, stride 8) instead, about 10 ms per 256x256
    image, for tests that must interrupt a run partway.
    """
    if slow:
        build_dense_model(
            root / MODEL, layers=mini_vgg_layers(), window=(64, 64), channels=3,
            classes=len(LABELS), labels=LABELS, seed=3,
        )  # fmt: skip
    else:
        build_dense_model(
            root / MODEL, window=WINDOW, channels=3, classes=len(LABELS), labels=LABELS,
            with_atrous=(2,), seed=1,
        )  # fmt: skip
    return root


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth-ish RGB image (blocks of noise), so JPEG keeps its structure."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(small.repeat(4, axis=0).repeat(4, axis=1)[:height, :width])


def encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def build_mixed_folder(root: Path) -> dict[str, str]:
    """PNGs, a JPEG, a subfolder, a corrupt PNG, a too-small image, a text file.

    Returns relpath -> expected status ("ok" or "failed"); the text file is absent (skipped).
    """
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.png").write_bytes(encode(random_image(40, 50, 1), "PNG"))
    (root / "photo.jpg").write_bytes(encode(random_image(37, 61, 2), "JPEG"))
    (root / "sub" / "c.png").write_bytes(encode(random_image(64, 33, 3), "PNG"))
    (root / "sub" / "deeper" / "d.png").write_bytes(encode(random_image(29, 29, 4), "PNG"))
    (root / "sub" / "no_extension").write_bytes(encode(random_image(20, 30, 5), "PNG"))
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    (root / "tiny.png").write_bytes(encode(random_image(8, 8, 6), "PNG"))  # < window 12x16
    (root / "notes.txt").write_text("not an image\n")
    return {
        "a.png": "ok",
        "photo.jpg": "ok",
        "sub/c.png": "ok",
        "sub/deeper/d.png": "ok",
        "sub/no_extension": "ok",
        "corrupt.png": "failed",
        "tiny.png": "failed",
    }


def build_plain_folder(root: Path, count: int, *, size: tuple[int, int], seed: int = 0) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        image = random_image(size[0], size[1], seed + n)
        (root / f"img{n:04d}.png").write_bytes(encode(image, "PNG"))
