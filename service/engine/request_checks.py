"""What a request must satisfy with this model before any work: output stride, image size,
pixel limits.

Pure functions of the request and the model's nets and metadata; :class:`Engine` calls them
from ``check_options``, ``estimate_request`` and ``score``. The options checked their own
values when they were built (:mod:`densemap.service.engine.field_checks`); these check them against
the model. Each failure is the densemap error that names the fix (InvalidOption,
InvalidImage, ImageTooSmall, ImageTooLarge).
"""

from __future__ import annotations

import time

import numpy as np

from densemap.service.contract import Pair, Preprocessing
from densemap.service.engine import image_input
from densemap.service.errors import ImageTooLarge, ImageTooSmall, InvalidImage, InvalidOption


def common_divisors(stride: Pair) -> tuple[int, ...]:
    """Output strides S/k with an integer step on both axes, largest first."""
    divisors = [d for d in range(1, min(stride) + 1) if stride[0] % d == 0 and stride[1] % d == 0]
    return tuple(sorted(divisors, reverse=True))


def check_stride(output_stride, supported: tuple[int, ...], *, name: str, atrous=None) -> None:
    """``output_stride`` (None: native) is one of the model's ``supported`` strides;
    ``atrous``: those an à-trous variant serves in one pass (None: not known here)."""
    if output_stride is not None and output_stride not in supported:
        one_pass = (
            "" if atrous is None else f"; in one pass: {', '.join(map(str, atrous)) or 'none'}"
        )
        raise InvalidOption(
            f"output_stride {output_stride!r} is not supported by model {name!r}: use one of "
            f"{', '.join(map(str, supported))} (its stride divided by a whole number"
            f"{one_pass}), or leave it unset for the native stride"
        )


def plan_stride(nets, output_stride, *, name: str, atrous: tuple[int, ...]):
    """(net, (k_h, k_w)): the net to run and the shift-and-stitch factor per axis."""
    check_stride(output_stride, common_divisors(nets[0].grid.stride), name=name, atrous=atrous)
    if output_stride is None:
        return nets[0], (1, 1)
    candidates = [
        n for n in nets if n.grid.stride[0] % output_stride == 0
        and n.grid.stride[1] % output_stride == 0
    ]  # fmt: skip
    output_stride = int(output_stride)
    net = min(candidates, key=lambda n: n.grid.stride[0] * n.grid.stride[1])
    return net, (net.grid.stride[0] // output_stride, net.grid.stride[1] // output_stride)


def cells_at(net, factor: Pair, size: Pair) -> Pair:
    """Cells per axis of the map at stride S/k on a ``size`` image."""
    delta = (net.grid.stride[0] // factor[0], net.grid.stride[1] // factor[1])
    return (
        (size[0] - net.grid.window[0]) // delta[0] + 1,
        (size[1] - net.grid.window[1]) // delta[1] + 1,
    )


def check_scaled_size(size: Pair, scale: float, *, window: Pair, max_pixels: int) -> None:
    """The image at ``scale`` holds a window and stays within the pixel limit."""
    at = "" if scale == 1.0 else f" at scale {scale}"
    if size[0] < window[0] or size[1] < window[1]:
        raise ImageTooSmall(
            f"the image is {size[0]}x{size[1]} pixels{at}, smaller than the model's window "
            f"R = {window[0]}x{window[1]}: no window position fits; send a bigger image"
        )
    if size[0] * size[1] > max_pixels:
        raise ImageTooLarge(
            f"the image is {size[0]}x{size[1]} pixels{at}, over the limit of "
            f"{max_pixels} pixels: use a smaller scale or image"
        )


def read_image(image, *, preprocessing: Preprocessing, max_pixels: int, timings: dict):
    """(uint8 HxWxC or None, float32 CxHxW or None) of an image as ``score`` takes it."""
    tic = time.perf_counter()
    if isinstance(image, (bytes, bytearray, memoryview)):
        pixels = image_input.decode(image, color=preprocessing.color, max_pixels=max_pixels)
        timings["decode"] = time.perf_counter() - tic
        return pixels, None
    if not isinstance(image, np.ndarray):
        raise InvalidImage(
            f"image must be encoded bytes or a numpy array, got {type(image).__name__}"
        )
    if image.dtype == np.uint8:
        channels = preprocessing.channels
        return image_input.check_uint8(image, channels=channels, max_pixels=max_pixels), None
    if np.issubdtype(image.dtype, np.floating):
        float_chw = image_input.check_float(
            image, channels=preprocessing.channels, max_pixels=max_pixels
        )
        timings["preprocess"] = timings.get("preprocess", 0.0) + time.perf_counter() - tic
        return None, float_chw
    raise InvalidImage(
        f"arrays must be uint8 HxWxC or float32 CxHxW (preprocessed), got {image.dtype}"
    )


def image_size(image, *, preprocessing: Preprocessing, max_pixels: int) -> tuple[int, int, bool]:
    """(height, width, is float) of an image as ``score`` takes it; bytes: the header."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return (*image_input.read_size(image, max_pixels=max_pixels), False)
    channels = preprocessing.channels
    if isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating):
        image_input.check_float_shape(image.shape, channels)  # layout before size
        image_input.check_pixel_limit(*image.shape[1:], max_pixels)
        return int(image.shape[1]), int(image.shape[2]), True
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        image_input.check_uint8_shape(image.shape, channels)
        image_input.check_pixel_limit(*image.shape[:2], max_pixels)
        return int(image.shape[0]), int(image.shape[1]), False
    # raises the error that names what is wrong
    read_image(image, preprocessing=preprocessing, max_pixels=max_pixels, timings={})
    raise InvalidImage(f"the image must be HxWx{channels} uint8 or CxHxW float")
