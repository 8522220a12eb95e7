"""Writes one image's outputs (``.npz`` per ``--save``, optional heat-map PNG) and returns
its summary row.

Shared by the local pipeline (writer threads) and the Ray actors, so both modes produce
the same files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from densemap.service.batch.detections_out import detections_to_json
from densemap.service.batch.heatmap import render_heatmap
from densemap.service.batch.outputs import encode_result, write_atomic, write_npz
from densemap.service.batch.rundir import heatmap_path, npz_path
from densemap.service.batch.storage import Storage
from densemap.service.batch.summary import cells_above, ok_row
from densemap.service.batch.walk import ImageJob
from densemap.service.engine.image_input import decode
from densemap.service.engine.options import (
    DEFAULT_DETECTION_THRESHOLD,
    DEFAULT_MAX_PIXELS,
    ScoreOptions,
)
from densemap.service.engine.result import ScoreResult

PNG_COMPRESS_LEVEL = 3  # zlib level: level 6 (Pillow's default) is ~2x slower, ~5% smaller


@dataclass(frozen=True)
class OutputConfig:
    """Where and what to write for every image of a run."""

    out_dir: str
    partial_dir: str
    model_name: str
    options: ScoreOptions
    heatmap: bool = False
    heatmap_class: int | None = None  # class index; None draws the top class
    color: str = "RGB"  # channel order of the decoded images ("RGB", "BGR" or "L")
    storage: Storage = Storage()
    cell_threshold: float = DEFAULT_DETECTION_THRESHOLD  # summary's cells_above


def colour_image(source: str) -> np.ndarray:
    """The original file as RGB (heat-maps are drawn on it, whatever the model's colours)."""
    with open(source, "rb") as f:
        data = f.read()
    return decode(data, color="RGB", max_pixels=DEFAULT_MAX_PIXELS)


class ResultWriter:
    """Turns (job, image, result) into files under ``out_dir`` and a summary row."""

    def __init__(self, config: OutputConfig) -> None:
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.partial_dir = Path(config.partial_dir)

    def write(
        self, job: ImageJob, image: np.ndarray | bytes, result: ScoreResult, *, seconds: float
    ) -> dict:
        cfg = self.config
        outputs = []
        if cfg.storage.writes_npz:
            arrays = encode_result(
                result,
                relpath=job.relpath,
                model_name=cfg.model_name,
                options=cfg.options,
                storage=cfg.storage,
            )
            npz = npz_path(self.out_dir, job)
            compress = cfg.storage.compress
            write_atomic(
                npz, lambda f: write_npz(f, arrays, compress=compress), partial_dir=self.partial_dir
            )
            outputs.append(npz.relative_to(self.out_dir).as_posix())
        if cfg.heatmap:
            if isinstance(image, bytes):  # remote scoring: the server decoded it
                image = decode(image, color="RGB", max_pixels=DEFAULT_MAX_PIXELS)
            elif cfg.color != "RGB" or image.ndim != 3:
                image = colour_image(job.source)  # the model saw grey or BGR: draw on colour
            picture = render_heatmap(
                image,
                result.maps[0],
                labels=result.labels,
                class_index=cfg.heatmap_class,
                probabilities=cfg.options.probabilities,
                detections=result.detections,
            )
            png = heatmap_path(self.out_dir, job)
            write_atomic(
                png,
                lambda f: picture.save(f, format="PNG", compress_level=PNG_COMPRESS_LEVEL),
                partial_dir=self.partial_dir,
            )
            outputs.append(png.relative_to(self.out_dir).as_posix())
        row = ok_row(job, result, seconds=seconds, outputs=outputs, labels=result.labels)
        row["cell_threshold"] = cfg.cell_threshold
        row["cells_above"] = cells_above(
            result, cfg.cell_threshold, probabilities=cfg.options.probabilities
        )
        if result.detections is not None:  # the run's detections.jsonl takes the list
            row["detection_count"] = len(result.detections)
            row["detections"] = detections_to_json(result.detections)
        return row
