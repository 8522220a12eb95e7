"""int8 copies of a dense model: onnxruntime's static QDQ quantization, calibrated on images.

``densemap convert ... --int8-calibration IMAGES_DIR`` writes ``NAME.int8.onnx`` beside the
model and ``NAME.sK.int8.onnx`` beside each à-trous variant, made by
``onnxruntime.quantization.quantize_static``: QDQ format, int8 weights per output channel,
int8 activations (onnxruntime's default for QDQ: no u8 x s8 saturation on CPUs without
VNNI), MinMax calibration on the folder's images read with the model's own preprocessing
(colour order, scale, mean/std, layout). Inputs and outputs stay float32, so the engine
feeds an int8 copy exactly as the fp32 net.

Each copy is then compared with its fp32 net on every calibration image (every cell): the
worst max deviation and argmax agreement go into the metadata (``Int8Copies``) and GetModel's
precision report. Under :data:`DEFAULT_AGREEMENT_FLOOR` the copies are still written, with a
warning naming the figure: the fp32 model is unaffected and precision="int8" is opt-in.

Images: at most :data:`DEFAULT_MAX_CALIBRATION_IMAGES` (sorted by path), each at least the
model's window; a side over :data:`DEFAULT_CALIBRATION_MAX_SIDE` is centre-cropped to it
(native scale kept: cells see what they will see when scored; each calibration pass runs
a whole image, so its memory grows with the image).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from densemap.service.contract import Int8Copies, Pair, Preprocessing, Variant
from densemap.service.errors import ConversionError, DensemapError

DEFAULT_AGREEMENT_FLOOR = 0.99  # argmax agreement with fp32 on the calibration images
DEFAULT_MAX_CALIBRATION_IMAGES = 64
DEFAULT_CALIBRATION_MAX_SIDE = 1024
MAX_CALIBRATION_PIXELS = 1 << 26  # a file's header over this is refused before decoding
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


@dataclass(frozen=True)
class NetPaths:
    """One fp32 net, where its int8 copy goes, and its output stride."""

    fp32: Path
    int8: Path
    stride: Pair


def int8_file(name: str) -> str:
    """``model.onnx`` -> ``model.int8.onnx``; ``model.s16.onnx`` -> ``model.s16.int8.onnx``."""
    stem = name[: -len(".onnx")] if name.endswith(".onnx") else name
    return f"{stem}.int8.onnx"


def int8_files(copies: Int8Copies | None) -> tuple[str, ...]:
    """The file names of the int8 copies, main net's first (none without copies)."""
    if copies is None:
        return ()
    return (copies.file, *(v.file for v in copies.variants))


def check_calibration_folder(folder: Path) -> list[Path]:
    """The image files under ``folder`` (sorted), or ConversionError saying what to give."""
    if not folder.is_dir():
        raise ConversionError(
            f"--int8-calibration {folder}: no such folder; give a folder of images like the "
            "ones the model will score"
        )
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise ConversionError(
            f"--int8-calibration {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the "
            "folder; give a few images like the ones the model will score"
        )
    return files


class CalibrationImages:
    """The calibration images, kept as uint8 crops (a quarter of float32's bytes); iterating
    gives each as a model input: float32, batch of one, the model's layout."""

    def __init__(self, pixels: list[np.ndarray], preprocessing: Preprocessing) -> None:
        self._pixels = pixels
        self._preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self._pixels)

    def __iter__(self):
        from densemap.service.engine.image_input import preprocess

        for pixels in self._pixels:
            image_chw = preprocess(pixels, self._preprocessing)
            if self._preprocessing.layout == "NHWC":
                image_chw = image_chw.transpose(1, 2, 0)
            yield np.ascontiguousarray(image_chw[None], dtype=np.float32)


def read_calibration_images(
    folder: Path,
    preprocessing: Preprocessing,
    *,
    window: Pair,
    max_images: int = DEFAULT_MAX_CALIBRATION_IMAGES,
    max_side: int = DEFAULT_CALIBRATION_MAX_SIDE,
) -> CalibrationImages:
    """The folder's images, decoded in the model's colour order and centre-cropped to
    ``max_side``; ConversionError, naming the folder or the file and what to do, for a
    missing folder, a folder without images, an unreadable image or one smaller than the
    window."""
    from densemap.service.engine.image_input import decode

    files = check_calibration_folder(Path(folder))
    crops = []
    for path in files[:max_images]:
        try:
            pixels = decode(
                path.read_bytes(), color=preprocessing.color, max_pixels=MAX_CALIBRATION_PIXELS
            )
        except (OSError, DensemapError) as exc:
            raise ConversionError(
                f"--int8-calibration: cannot read {path}: {exc}; remove it or replace it"
            ) from None
        height, width = pixels.shape[:2]
        if height < window[0] or width < window[1]:
            raise ConversionError(
                f"--int8-calibration: {path} is {height}x{width}, smaller than the model's "
                f"window {window[0]}x{window[1]}: it has no cell; use bigger images"
            )
        top, left = (max(0, (height - max_side) // 2), max(0, (width - max_side) // 2))
        crops.append(np.ascontiguousarray(pixels[top : top + max_side, left : left + max_side]))
    return CalibrationImages(crops, preprocessing)


@contextmanager
def _quiet_quantizer():
    """quantize_static advises pre-processing at WARNING on the root logger: not for our
    users (the converter's own checks stand for it)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_net(fp32: Path, int8: Path, inputs: CalibrationImages, input_name: str) -> None:
    """Write the static QDQ int8 copy of ``fp32`` at ``int8``, calibrated on ``inputs``."""
    from densemap.service.engine.onnxruntime_package import import_onnxruntime

    import_onnxruntime()  # the install checked before onnxruntime.quantization is imported
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(inputs)

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch}

    try:
        with _quiet_quantizer():
            quantize_static(
                os.fspath(fp32),
                os.fspath(int8),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
            )
    except Exception as exc:  # noqa: BLE001 - the quantizer raises many types
        raise ConversionError(
            f"onnxruntime could not quantize {fp32.name} to int8: "
            f"{' '.join(str(exc).split())[:300]}; convert without --int8-calibration"
        ) from None


def _session(path: Path):
    from densemap.convert.runtime import cpu_session

    session = cpu_session(os.fspath(path))
    return session, session.get_inputs()[0].name


def measure(nets: Sequence[NetPaths], inputs, *, output_name: str, probabilities: bool):
    """(cells, max probability deviation, max logit deviation, worst argmax agreement) of
    the int8 copies against their fp32 nets on ``inputs`` (one image's maps at a time)."""
    from densemap.service.engine.precision import compare_maps

    cells, prob, logit, agreement = 0, 0.0, 0.0, 1.0
    for net in nets:
        (exact, exact_input), (other, other_input) = _session(net.fp32), _session(net.int8)
        same = net_cells = 0
        for batch in inputs:
            report = compare_maps(
                "int8",
                exact.run([output_name], {exact_input: batch})[0][0],
                other.run([output_name], {other_input: batch})[0][0],
                image="calibration",
                probabilities=probabilities,
            )
            prob = max(prob, report.max_probability_deviation)
            logit = max(logit, report.max_logit_deviation)
            same += round(report.argmax_agreement * report.cells)
            net_cells += report.cells
        cells += net_cells
        agreement = min(agreement, same / max(net_cells, 1))
    return cells, prob, logit, agreement


def make_int8_copies(
    nets: Sequence[NetPaths],
    calibration: Path,
    *,
    preprocessing: Preprocessing,
    window: Pair,
    input_name: str,
    output_name: str,
    probabilities: bool,
) -> Int8Copies:
    """Quantize every net (main first) and measure the copies; returns their metadata."""
    inputs = read_calibration_images(calibration, preprocessing, window=window)
    for net in nets:
        quantize_net(net.fp32, net.int8, inputs, input_name)
    cells, prob, logit, agreement = measure(
        nets, inputs, output_name=output_name, probabilities=probabilities
    )
    main, *variants = nets
    return Int8Copies(
        file=main.int8.name,
        variants=tuple(Variant(stride=net.stride, file=net.int8.name) for net in variants),
        images=len(inputs),
        cells=cells,
        max_probability_deviation=prob,
        max_logit_deviation=logit,
        argmax_agreement=agreement,
    )


def agreement_warning(copies: Int8Copies) -> str | None:
    """The warning for copies whose argmax agreement is under :data:`DEFAULT_AGREEMENT_FLOOR`
    (None: at or over)."""
    floor = DEFAULT_AGREEMENT_FLOOR
    if copies.argmax_agreement >= floor:
        return None
    return (
        f"the int8 copy agrees with fp32 on the top class of only "
        f"{copies.argmax_agreement:.2%} of the cells of the {copies.images} calibration "
        f"images (floor {floor:.0%}); precision 'int8' may change answers: calibrate on more "
        "images like the ones you score, or keep fp32"
    )
