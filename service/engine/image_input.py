"""Image input: decoding (with a header-only pixel limit), array checks, preprocessing, resizing.

Every path into the network goes through :func:`preprocess`, so crop-based references
(the converter's verify, tests) and the dense engine feed the net identical numbers.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from densemap.service.contract import Preprocessing
from densemap.service.engine.options import PIXEL_LIMIT_SETTING
from densemap.service.errors import DensemapError, ImageTooLarge, InvalidImage
from densemap.service.truncation import check_encoded, check_tiff_strips, truncated

# JPEG includes multi-picture (MPO) files; PPM reads .pbm/.pgm/.ppm. The file walker's
# extensions (service/batch/walk.py) list only these formats.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF", "PPM")
RESAMPLE = Image.Resampling.BILINEAR
ORIENTATION_TAG = 0x0112  # EXIF orientation
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # the orientations that swap height and width
RESAMPLE_NAME = "bilinear (Pillow Image.resize, BILINEAR; antialiased when downscaling)"


def check_pixel_limit(height: int, width: int, max_pixels: int) -> None:
    """The image holds a pixel and at most ``max_pixels`` of them (its decoded size)."""
    if height == 0 or width == 0:
        raise InvalidImage(
            f"the image is {height}x{width} pixels, it holds no pixel: send a non-empty image"
        )
    if height * width > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {height * width} pixels, over the limit of "
            f"{max_pixels} pixels: downscale it, or raise {PIXEL_LIMIT_SETTING}"
        )


def _allow_pillow_pixels(max_pixels: int) -> None:
    """Let the engine's limit decide: Pillow refuses images over 2 x ``Image.MAX_IMAGE_PIXELS``
    (179 M pixels by default) inside ``Image.open``, below the engine's default limit. The
    guard is raised to half the limit, process-wide and never lowered."""
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and 2 * current < max_pixels:
        Image.MAX_IMAGE_PIXELS = -(-max_pixels // 2)


def _to_8_bits(image: Image.Image) -> Image.Image:
    """16-bit greyscale -> 8 bits by its high byte (as Pillow reads 16-bit RGB); 32-bit
    integer and float modes, whose range is unknown, are refused (Pillow would clip them)."""
    if image.mode.startswith("I;16"):
        high_bytes = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(high_bytes, "L")
    if image.mode in ("I", "F"):
        kind = "signed or 32-bit integer" if image.mode == "I" else "floating-point"
        raise InvalidImage(
            f"{kind} images (Pillow mode {image.mode}) have no defined 8-bit range: convert "
            "the image to 8 or 16 bits per sample, or send a preprocessed float CxHxW array"
        )
    return image


def _convert(image: Image.Image, mode: str) -> Image.Image:
    """``image.convert(mode)``, through RGB where Pillow has no direct path (LAB -> L)."""
    try:
        return image.convert(mode)
    except ValueError:
        return image.convert("RGB").convert(mode)


def _name_format(data: bytes) -> str:
    """' (PCX)' when Pillow knows the format although the engine does not read it, else ''."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(bytes(data))) as image:
                return f" ({image.format})"
    except Exception:  # noqa: BLE001 - only used to word the error message
        return ""


def decode(data: bytes, *, color: str, max_pixels: int) -> np.ndarray:
    """Encoded bytes -> uint8 HxWxC (HxWx1 for ``L``) in ``color`` order, EXIF orientation applied.

    The pixel count is checked from the header before any pixel is decoded, and so is data
    that ends before the size its header declares (``densemap.service.truncation``; Pillow's
    ``LOAD_TRUNCATED_IMAGES`` is never set, so short data is refused, never padded).
    Multi-frame files (TIFF pages, animated WebP and GIF) give their first frame; alpha is dropped.
    """
    try:
        with warnings.catch_warnings():
            image = _open_checked(data, max_pixels)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # in place: no full-size copy
            image = _to_8_bits(image)
            mode = "L" if color == "L" else "RGB"
            if image.mode != mode:
                image = _convert(image, mode)
            pixels = np.asarray(image)
            del image  # the array holds its own copy of the pixels
            if color == "L":
                pixels = pixels[:, :, None]
            elif color == "BGR":
                pixels = pixels[:, :, ::-1]
    except Exception as exc:
        raise _decode_error(exc, data, max_pixels) from None
    return np.ascontiguousarray(pixels)


def read_size(data: bytes, *, max_pixels: int) -> tuple[int, int]:
    """(height, width) of encoded bytes after EXIF orientation, from the header only.

    Checks what :func:`decode` checks before decoding (format, pixel limit, truncation), in
    milliseconds: the request's cost follows from this size before any pixel is decoded.
    """
    try:
        with warnings.catch_warnings():
            with _open_checked(data, max_pixels) as image:
                height, width = image.height, image.width
                orientation = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception as exc:
        raise _decode_error(exc, data, max_pixels) from None
    return (width, height) if orientation in TRANSPOSED_ORIENTATIONS else (height, width)


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """The opened (not yet decoded) image, its header checked: pixel limit, truncation.
    Call it inside ``warnings.catch_warnings()``: it silences the decompression bomb warning."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidImage(f"decode needs encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidImage(f"image bytes are empty: send an encoded image ({', '.join(FORMATS)})")
    Image.init()  # register every plugin, so ``formats`` below can name them all
    _allow_pillow_pixels(max_pixels)
    check_encoded(data)
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    image = Image.open(io.BytesIO(bytes(data)), formats=FORMATS)
    check_pixel_limit(image.height, image.width, max_pixels)
    if image.format == "TIFF":
        check_tiff_strips(image, len(data))
    return image


def _decode_error(exc: Exception, data: bytes, max_pixels: int) -> Exception:
    """The densemap error for an exception raised while opening or decoding ``data``."""
    if isinstance(exc, DensemapError):
        return exc
    if isinstance(exc, Image.DecompressionBombError):
        return ImageTooLarge(
            f"image refused before decoding, its header declares too many pixels for Pillow's "
            f"decompression bomb guard ({exc}); the engine's limit is {max_pixels} pixels"
        )
    if isinstance(exc, MemoryError):
        return ImageTooLarge("not enough memory to decode this image: send a smaller one")
    if isinstance(exc, UnidentifiedImageError):
        return InvalidImage(
            f"cannot decode the image: unsupported or unknown format{_name_format(data)}; "
            f"supported formats: {', '.join(FORMATS)} (convert it to PNG or JPEG)"
        )
    # Pillow raises many types (OSError, SyntaxError, struct.error...)
    if isinstance(exc, OSError) and "truncated" in str(exc):
        return truncated(str(exc))
    return InvalidImage(
        f"cannot decode the image ({type(exc).__name__}: {exc}); "
        f"supported formats: {', '.join(FORMATS)}"
    )


def _channels_text(channels: int) -> str:
    return f"{channels} channel{'s' if channels != 1 else ''}"


def check_uint8_shape(shape: tuple[int, ...], channels: int) -> None:
    """InvalidImage naming the layout or the channel count when ``shape`` is not a uint8
    HxW or HxWxC image with ``channels`` channels (1 channel may stand for 3: grey)."""
    wants = f"a uint8 image must be HxW or HxWxC (channels last) with C={channels}"
    if len(shape) == 2:
        return
    if len(shape) != 3:
        raise InvalidImage(f"{wants}, got an array of {len(shape)} dimensions, shape {shape}")
    if shape[2] == channels or (shape[2] == 1 and channels == 3):
        return
    if shape[0] <= 4 < shape[2]:
        raise InvalidImage(
            f"{wants}, got shape {shape}, which looks channels first (CxHxW with C="
            f"{shape[0]}): transpose it (image.transpose(1, 2, 0)), or send the encoded "
            "image bytes"
        )
    raise InvalidImage(
        f"the model wants {_channels_text(channels)} per pixel in its color order, got "
        f"{shape[2]} (an array of shape {shape}): convert it, or send the encoded image bytes"
    )


def check_float_shape(shape: tuple[int, ...], channels: int) -> None:
    """InvalidImage naming the layout or the channel count when ``shape`` is not a
    preprocessed float CxHxW image with ``channels`` channels."""
    wants = f"a float image must be preprocessed CxHxW (channels first) with C={channels}"
    if len(shape) != 3:
        raise InvalidImage(f"{wants}, got an array of {len(shape)} dimensions, shape {shape}")
    if shape[0] == channels:
        return
    if shape[2] <= 4 < shape[0]:
        raise InvalidImage(
            f"{wants}, got shape {shape}, which looks channels last (HxWxC with C="
            f"{shape[2]}): transpose it (image.transpose(2, 0, 1)), or send uint8 HxWxC "
            "pixels for the engine to preprocess"
        )
    raise InvalidImage(
        f"{wants}: the model wants {_channels_text(channels)}, got {shape[0]} "
        f"(an array of shape {shape})"
    )


def check_uint8(image: np.ndarray, *, channels: int, max_pixels: int) -> np.ndarray:
    """A uint8 HxW or HxWxC array -> HxWxC with the model's channel count."""
    check_uint8_shape(image.shape, channels)
    if image.ndim == 2:
        image = image[:, :, None]
    check_pixel_limit(image.shape[0], image.shape[1], max_pixels)
    if image.shape[2] == 1 and channels == 3:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image)


def check_float(image: np.ndarray, *, channels: int, max_pixels: int) -> np.ndarray:
    """A preprocessed float CxHxW array -> float32, rejecting NaN/Inf and wrong shapes."""
    check_float_shape(image.shape, channels)
    check_pixel_limit(image.shape[1], image.shape[2], max_pixels)
    with np.errstate(over="ignore", invalid="ignore"):
        image_chw = np.ascontiguousarray(image, dtype=np.float32)
    if not np.isfinite(image_chw).all():
        raise InvalidImage("the float image holds NaN or Inf values (after conversion to float32)")
    return image_chw


def preprocess(image_hwc_uint8: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """uint8 HxWxC in the model's color order -> float32 CxHxW: ``(pixel*scale - mean)/std``.

    Computed in float32, one channel plane at a time and in place (no full-size temporaries).
    """
    height, width, channels = image_hwc_uint8.shape
    scale = np.float32(preprocessing.scale)
    image_chw = np.empty((channels, height, width), dtype=np.float32)
    for channel in range(channels):
        plane = image_chw[channel]
        plane[...] = image_hwc_uint8[:, :, channel]
        plane *= scale
        plane -= np.float32(preprocessing.mean[channel])
        plane /= np.float32(preprocessing.std[channel])
    return image_chw


def resized_size(height: int, width: int, scale: float, *, max_pixels: int) -> tuple[int, int]:
    """Size of the image at ``scale``: each side rounded to the nearest pixel, at least 1.

    Refuses (ImageTooLarge) sizes surely over ``max_pixels`` before rounding, where a huge
    scale would overflow; the caller checks the exact rounded size against the limit.
    """
    # A lower bound of round(h*s) * round(w*s); inf for scales that overflow a float.
    pixels = max(1.0, height * scale - 0.5) * max(1.0, width * scale - 0.5)
    if pixels > max_pixels:
        raise ImageTooLarge(
            f"the image ({height}x{width}) at scale {scale:g} would have "
            f"{f'about {pixels:.3g}' if math.isfinite(pixels) else 'too many'} pixels, over "
            f"the limit of {max_pixels} pixels: use a smaller scale or image"
        )
    return (max(1, round(height * scale)), max(1, round(width * scale)))


def resize_uint8(image_hwc: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a uint8 HxWxC image to (h, w) with :data:`RESAMPLE`."""
    if image_hwc.shape[:2] == size:
        return image_hwc
    planes = [
        np.asarray(Image.fromarray(image_hwc[:, :, c]).resize(size[::-1], RESAMPLE))
        for c in range(image_hwc.shape[2])
    ]
    return np.ascontiguousarray(np.stack(planes, axis=2))


def resize_float(image_chw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a float32 CxHxW image to (h, w) with :data:`RESAMPLE`, one plane at a time."""
    if image_chw.shape[1:] == size:
        return image_chw
    planes = [
        np.asarray(Image.fromarray(plane).resize(size[::-1], RESAMPLE)) for plane in image_chw
    ]
    return np.ascontiguousarray(np.stack(planes), dtype=np.float32)
