"""Dense passes: one network pass cropped to n cells, and shift-and-stitch for finer strides.

A :class:`DenseNet` is one onnxruntime session (the main model or an à-trous variant) with
its output grid. :func:`shift_and_stitch` makes a map of stride ``S/k`` from k x k passes of
a net of stride S on the image CROPPED by (p*d, q*d), d = S/k, stitched with
``out[:, p::k, q::k] = map_pq``; it has ``(W - R) // d + 1`` cells per axis.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from service.contract import Pair, Preprocessing
from service.engine.image_input import preprocess
from service.engine.memory import ActivationEstimator
from service.errors import Cancelled, ImageTooLarge, ModelLoadError


@dataclass(frozen=True)
class Grid:
    """Where the cells of one net's map sit: output stride, window, true receptive field."""

    stride: Pair
    window: Pair
    receptive_field: Pair
    receptive_field_offset: Pair

    def cells(self, height: int, width: int) -> Pair:
        return (
            (height - self.window[0]) // self.stride[0] + 1,
            (width - self.window[1]) // self.stride[1] + 1,
        )


class PixelSource:
    """The image passes read from, preprocessed per requested region.

    uint8 images stay uint8 until a pass (or tile) cuts its region, which keeps a huge
    image's float copy out of memory; preprocessing is elementwise, so cutting first gives
    the same numbers bit for bit. ``seconds`` accumulates the preprocessing time.
    """

    def __init__(
        self,
        *,
        preprocessing: Preprocessing,
        uint8_hwc: np.ndarray | None = None,
        float_chw: np.ndarray | None = None,
    ) -> None:
        if (uint8_hwc is None) == (float_chw is None):
            raise ValueError("give exactly one of uint8_hwc and float_chw")
        self._preprocessing = preprocessing
        self._uint8 = uint8_hwc
        self._float = float_chw
        shape = uint8_hwc.shape[:2] if uint8_hwc is not None else float_chw.shape[1:]
        self.height, self.width = int(shape[0]), int(shape[1])
        self.seconds = 0.0

    def region(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """float32 CxHxW of rows [top, top+height) and columns [left, left+width)."""
        start = time.perf_counter()
        if self._uint8 is not None:
            block = self._uint8[top : top + height, left : left + width]
            image_chw = preprocess(block, self._preprocessing)
        else:
            block = self._float[:, top : top + height, left : left + width]
            image_chw = np.ascontiguousarray(block)
        self.seconds += time.perf_counter() - start
        return image_chw


def check_cancel(cancel: Callable[[], bool] | None, what: str) -> None:
    """Raise Cancelled when ``cancel()`` is true, or when it fails (the caller is unknown)."""
    if cancel is None:
        return
    try:
        stop = cancel()
    except Cancelled:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken callback must not run on regardless
        raise Cancelled(
            f"scoring stopped {what}: the cancel callback raised {type(exc).__name__}: {exc}"
        ) from exc
    if stop:
        raise Cancelled(f"scoring was cancelled by the caller ({what})")


class DenseNet:
    """One network (main model or à-trous variant) that maps an image to its cells."""

    def __init__(
        self,
        session: ort.InferenceSession,
        *,
        grid: Grid,
        estimator: ActivationEstimator,
        input_name: str,
        output_name: str,
        layout: str,
        label: str,
    ) -> None:
        self.session = session
        self.grid = grid
        self.estimator = estimator
        self.input_name = input_name
        self.output_name = output_name
        self.layout = layout
        self.label = label

    def estimate_bytes(self, height: int, width: int) -> int:
        return self.estimator.activation_bytes(int(height), int(width))

    def run(self, image_chw: np.ndarray) -> np.ndarray:
        """One pass on a float32 CxHxW image -> float32 [classes, n_h, n_w], cropped to n."""
        n_h, n_w = self.grid.cells(image_chw.shape[1], image_chw.shape[2])
        batch = image_chw[None] if self.layout == "NCHW" else image_chw.transpose(1, 2, 0)[None]
        try:
            (scores,) = self.session.run([self.output_name], {self.input_name: batch})
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise _run_error(self.label, batch.shape, exc) from None
        if scores.ndim != 4 or scores.shape[0] != 1:
            raise ModelLoadError(
                f"{self.label}: expected an output of shape [1, classes, n_h, n_w], got "
                f"{scores.shape}: is this a converted dense model?"
            )
        if scores.shape[2] < n_h or scores.shape[3] < n_w:
            raise ModelLoadError(
                f"{self.label}: the model returned {scores.shape[2]}x{scores.shape[3]} cells on "
                f"a {image_chw.shape[1]}x{image_chw.shape[2]} image, but its metadata "
                f"(window {self.grid.window}, stride {self.grid.stride}) promises "
                f"{n_h}x{n_w}: the metadata geometry is wrong; reconvert the model"
            )
        return np.ascontiguousarray(scores[0, :, :n_h, :n_w], dtype=np.float32)


def _run_error(label: str, shape: tuple[int, ...], exc: Exception) -> Exception:
    """The densemap error for an onnxruntime failure on an input of ``shape``."""
    message = " ".join(str(exc).split())[:400] or type(exc).__name__
    if "alloc" in message.lower() or isinstance(exc, MemoryError):
        return ImageTooLarge(
            f"{label}: out of memory on a {list(shape)} input ({message}): lower "
            "EngineConfig.memory_budget so that the engine tiles, or send a smaller image"
        )
    return ModelLoadError(
        f"{label}: onnxruntime failed on a {list(shape)} input ({message}): the graph does "
        "not match its metadata (channels, layout, window, stride) or has a fixed input size; "
        "reconvert the model"
    )


def shift_and_stitch(
    run_pass: Callable[[int, int], np.ndarray],
    *,
    grid: Grid,
    factor: Pair,
    size: Pair,
    cancel: Callable[[], bool] | None,
) -> np.ndarray:
    """Stitch the k_h x k_w passes ``run_pass(top, left)`` into one map of stride S/k.

    ``run_pass(top, left)`` must return the net's map on the image cropped by (top, left).
    Passes whose cropped image is smaller than the window have no cell and are skipped.
    """
    k_h, k_w = factor
    delta = (grid.stride[0] // k_h, grid.stride[1] // k_w)
    n_h = (size[0] - grid.window[0]) // delta[0] + 1
    n_w = (size[1] - grid.window[1]) // delta[1] + 1
    stitched: np.ndarray | None = None
    for p in range(min(k_h, n_h)):
        for q in range(min(k_w, n_w)):
            check_cancel(cancel, f"before shift-and-stitch pass ({p}, {q})")
            part = run_pass(p * delta[0], q * delta[1])
            if stitched is None:
                stitched = np.empty((part.shape[0], n_h, n_w), dtype=part.dtype)
            target = stitched[:, p::k_h, q::k_w]
            if target.shape != part.shape:
                raise ModelLoadError(
                    f"shift-and-stitch pass ({p}, {q}) gave {part.shape[1:]} cells where "
                    f"{target.shape[1:]} were expected: the metadata geometry is wrong"
                )
            target[...] = part
    assert stitched is not None  # n_h, n_w >= 1 is checked by the caller
    return stitched
