"""Dense passes: one network pass cropped to n cells, and shift-and-stitch for finer strides.

A :class:`DenseNet` is one network (the main model or an à-trous variant) with its output
grid and its sessions per precision. :func:`shift_and_stitch` makes a map of stride ``S/k``
from k x k passes of a net of stride S on the image CROPPED by (p*d, q*d), d = S/k,
stitched with ``out[:, p::k, q::k] = map_pq``; it has ``(W - R) // d + 1`` cells per axis.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from densemap.service.contract import Pair, Preprocessing
from densemap.service.engine import graphs
from densemap.service.engine.assembly import Placement, PostprocessCall
from densemap.service.engine.memory import ActivationEstimator
from densemap.service.engine.onnxruntime_package import ort
from densemap.service.engine.options import MEMORY_BUDGET_SETTING
from densemap.service.engine.precision import PrecisionSessions
from densemap.service.engine.runtime import Runtime
from densemap.service.errors import Cancelled, ImageTooLarge, ModelLoadError


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
    """The image one scale's passes read from, uploaded once to the net's device.

    uint8 images stay uint8 until the preprocess graph cuts a pass's (or tile's) region and
    normalises it on the device, which keeps a huge image's float copy out of memory and
    sends a quarter of float32's bytes; preprocessing is elementwise, so cutting first gives
    the same numbers bit for bit. ``seconds`` accumulates the upload time.
    """

    def __init__(
        self,
        *,
        runtime: Runtime,
        preprocessing: Preprocessing,
        uint8_hwc: np.ndarray | None = None,
        float_chw: np.ndarray | None = None,
    ) -> None:
        if (uint8_hwc is None) == (float_chw is None):
            raise ValueError("give exactly one of uint8_hwc and float_chw")
        start = time.perf_counter()
        self.kind = "uint8" if uint8_hwc is not None else "float32"
        pixels = uint8_hwc if uint8_hwc is not None else float_chw
        shape = pixels.shape[:2] if uint8_hwc is not None else pixels.shape[1:]
        self.height, self.width = int(shape[0]), int(shape[1])
        self.preprocessing = preprocessing
        self.runtime = runtime
        self.pixels = runtime.upload(pixels)
        self.seconds = time.perf_counter() - start


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
        precisions: PrecisionSessions | None = None,
    ) -> None:
        self.session = session
        self._precisions = precisions
        self.grid = grid
        self.estimator = estimator
        self.input_name = input_name
        self.output_name = output_name
        self.layout = layout
        self.label = label

    def estimate_bytes(self, height: int, width: int) -> int:
        return self.estimator.activation_bytes(int(height), int(width))

    def estimate_macs(self, height: int, width: int) -> int:
        """Multiply-accumulates of one untiled pass on a height x width image."""
        return self.estimator.macs(int(height), int(width))

    def run_pass(
        self,
        source: PixelSource,
        region: tuple[int, int, int, int],
        cells: tuple[int, int, int, int],
        post: PostprocessCall,
        *,
        precision: str = "fp32",
    ) -> dict[str, np.ndarray]:
        """One pass over ``region`` (top, left, height, width) of ``source`` on the device.

        Keeps the cells [r0, r1) x [c0, c1) of its map (``cells`` = r0, c0, r1, c1) and
        returns the postprocess outputs ``post`` asks for, copied to the host.
        """
        top, left, height, width = region
        session, dtype = self.session_for(precision)
        runtime = source.runtime
        layout = self.layout
        pre = runtime.preprocess_session(
            source.preprocessing, source=source.kind, layout=layout, dtype=dtype
        )
        corners = (
            np.array([top, left], np.int64),
            np.array([top + height, left + width], np.int64),
        )
        try:
            image = runtime.run_to_device(
                pre,
                {graphs.PIXELS: source.pixels},
                {graphs.STARTS: corners[0], graphs.ENDS: corners[1]},
                graphs.IMAGE,
            )
            while True:
                try:
                    if post.head_names:  # the primary and the extra heads asked for
                        outputs = (self.output_name, *post.head_names)
                        bound = runtime.run_outputs_to_device(
                            session, {self.input_name: image}, outputs
                        )
                        raw = bound.pop(self.output_name)
                    else:
                        bound = None
                        raw = runtime.run_to_device(
                            session, {self.input_name: image}, {}, self.output_name
                        )
                    break
                except Exception as exc:  # noqa: BLE001 - retried in safer settings, or raised
                    if self._precisions is None or not self._precisions.demote(precision, exc):
                        raise
                    session, dtype = self.session_for(precision)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            shape = (1, height, width) if layout == "NHWC" else (1, "C", height, width)
            raise _run_error(self.label, shape, exc) from None
        self._check_output(tuple(raw.shape()), height, width)
        for name, value in (bound or {}).items():
            self._check_output(tuple(value.shape()), height, width, head=name)
        del image
        return post.run(runtime, raw, cells, raw_dtype=dtype, heads=bound)

    def session_for(self, precision: str) -> tuple[ort.InferenceSession, str]:
        """(session, input/output element type) of this net at ``precision``."""
        if precision == "fp32" or self._precisions is None:
            return self.session, "float32"
        return self._precisions.session_for(precision, self.session)

    def _check_output(
        self, shape: tuple[int, ...], height: int, width: int, *, head: str | None = None
    ) -> None:
        n_h, n_w = self.grid.cells(height, width)
        what = "" if head is None else f" head {head!r}"
        if len(shape) != 4 or shape[0] != 1:
            raise ModelLoadError(
                f"{self.label}:{what} expected an output of shape [1, classes, n_h, n_w], got "
                f"{list(shape)}: is this a converted dense model?"
            )
        if shape[2] < n_h or shape[3] < n_w:
            raise ModelLoadError(
                f"{self.label}:{what} the model returned {shape[2]}x{shape[3]} cells on "
                f"a {height}x{width} image, but its metadata "
                f"(window {self.grid.window}, stride {self.grid.stride}) promises "
                f"{n_h}x{n_w}: the metadata geometry is wrong; reconvert the model"
            )

    def run(self, image_chw: np.ndarray) -> np.ndarray:
        """One host-memory fp32 pass on a float32 CxHxW image -> [classes, n_h, n_w].

        Used at load time (class count, warm-up); requests go through :meth:`run_pass`.
        """
        batch = image_chw[None] if self.layout == "NCHW" else image_chw.transpose(1, 2, 0)[None]
        try:
            (scores,) = self.session.run([self.output_name], {self.input_name: batch})
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise _run_error(self.label, batch.shape, exc) from None
        self._check_output(scores.shape, image_chw.shape[1], image_chw.shape[2])
        n_h, n_w = self.grid.cells(image_chw.shape[1], image_chw.shape[2])
        return np.ascontiguousarray(scores[0, :, :n_h, :n_w], dtype=np.float32)

    def output_shapes(self, image_chw: np.ndarray, outputs: tuple[str, ...]) -> dict:
        """The raw output shape of each of ``outputs`` on a host fp32 pass (load checks)."""
        batch = image_chw[None] if self.layout == "NCHW" else image_chw.transpose(1, 2, 0)[None]
        try:
            values = self.session.run(list(outputs), {self.input_name: batch})
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise _run_error(self.label, batch.shape, exc) from None
        return {name: tuple(value.shape) for name, value in zip(outputs, values, strict=True)}


def _run_error(label: str, shape: tuple[int, ...], exc: Exception) -> Exception:
    """The densemap error for an onnxruntime failure on an input of ``shape``."""
    message = " ".join(str(exc).split())[:400] or type(exc).__name__
    if "alloc" in message.lower() or isinstance(exc, MemoryError):
        return ImageTooLarge(
            f"{label}: out of memory on a {list(shape)} input ({message}): lower "
            f"{MEMORY_BUDGET_SETTING} so that the engine tiles, or send a smaller image"
        )
    return ModelLoadError(
        f"{label}: onnxruntime failed on a {list(shape)} input ({message}): the graph does "
        "not match its metadata (channels, layout, window, stride) or has a fixed input size; "
        "reconvert the model"
    )


def shift_and_stitch(
    run_pass: Callable[[int, int, Placement], None],
    *,
    grid: Grid,
    factor: Pair,
    size: Pair,
    place: Placement,
    cancel: Callable[[], bool] | None,
) -> None:
    """Run the k_h x k_w passes ``run_pass(top, left, place_pq)`` of a map of stride S/k.

    ``run_pass(top, left, place_pq)`` runs the net on the image cropped by (top, left) and
    hands its cells to ``place_pq(parts, rows, cols)`` in its own cell coordinates; they
    land at ``out[:, p::k, q::k]`` of the stitched map (``(W - R) // d + 1`` cells per axis,
    d = S/k). Passes whose cropped image is smaller than the window have no cell.
    """
    k_h, k_w = factor
    delta = (grid.stride[0] // k_h, grid.stride[1] // k_w)
    n_h = (size[0] - grid.window[0]) // delta[0] + 1
    n_w = (size[1] - grid.window[1]) // delta[1] + 1
    for p in range(min(k_h, n_h)):
        for q in range(min(k_w, n_w)):
            check_cancel(cancel, f"before shift-and-stitch pass ({p}, {q})")
            expected = (len(range(p, n_h, k_h)), len(range(q, n_w, k_w)))

            def place_pq(parts, rows: range, cols: range, p=p, q=q, expected=expected) -> None:
                if rows.stop > expected[0] or cols.stop > expected[1]:
                    raise ModelLoadError(
                        f"shift-and-stitch pass ({p}, {q}) gave cells up to "
                        f"({rows.stop}, {cols.stop}) where {expected} were expected: the "
                        "metadata geometry is wrong"
                    )
                place(
                    parts,
                    range(p + k_h * rows.start, p + k_h * rows.stop, k_h),
                    range(q + k_w * cols.start, q + k_w * cols.stop, k_w),
                )

            run_pass(p * delta[0], q * delta[1], place_pq)
