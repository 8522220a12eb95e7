"""``summary.jsonl``: one JSON row per image of the latest run.

Row fields: ``path`` (as read), ``relpath`` (output key), ``status`` (``ok``, ``skipped``
or ``failed``), ``size`` [h, w], ``map_shape`` ([n_h, n_w] per scale), ``top`` (image-level
classes: index, label, score), ``cells_above`` (per scale, the classes with cells whose
probability is at least ``cell_threshold``: index, label, cells), ``seconds`` (engine time),
``outputs`` (files written, relative to the output folder), ``heads`` (models with several
heads: name, kind and channels of each extra head returned), ``detection_count`` with
``--detections`` and, for failures, ``error``.

Rows are appended while the run goes (one ``write`` call per row, so a killed run leaves
whole lines), then the file is rewritten sorted by ``relpath`` through a temp file
(:class:`densemap.service.batch.outputs.LineFile`; mode 0o644 less the umask).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from densemap.service.batch.heatmap import probabilities_of
from densemap.service.batch.outputs import Halt, LineFile, read_meta
from densemap.service.batch.walk import ImageJob
from densemap.service.engine.result import ScoreResult


def ok_row(
    job: ImageJob,
    result: ScoreResult,
    *,
    seconds: float,
    outputs: list[str],
    labels: tuple[str, ...],
) -> dict:
    row = {
        "path": job.source,
        "relpath": job.relpath,
        "status": "ok",
        "size": list(result.image_size),
        "map_shape": [list(m.shape) for m in result.maps],
        "top": top_classes(result.image_top_k, labels),
        "seconds": round(seconds, 6),
        "outputs": outputs,
    }
    if result.heads:  # rows of one-output models stay as they were
        row["heads"] = [
            {"name": h.name, "kind": h.kind, "channels": h.channels} for h in result.heads
        ]
    return row


def cells_above(result: ScoreResult, threshold: float, *, probabilities: bool) -> list[list[dict]]:
    """Per scale: ``{"index", "label", "cells"}`` of each class with cells >= ``threshold``
    (probabilities; logit maps through a softmax), in class order."""
    per_scale = []
    for scale_map in result.maps:
        found = []
        if scale_map.scores is not None:
            probs = probabilities_of(scale_map.scores, probabilities=probabilities)
            counts = (probs >= threshold).sum(axis=(1, 2))
            classes = scale_map.classes or range(len(counts))
            for index, count in zip(classes, counts.tolist(), strict=True):
                if count:
                    label = result.labels[index] if index < len(result.labels) else str(index)
                    found.append({"index": int(index), "label": label, "cells": int(count)})
        per_scale.append(found)
    return per_scale


def failed_row(job: ImageJob, reason: str) -> dict:
    return {"path": job.source, "relpath": job.relpath, "status": "failed", "error": reason}


def top_classes(image_top_k, labels: tuple[str, ...]) -> list[dict]:
    return [
        {
            "index": int(i),
            "label": labels[int(i)] if int(i) < len(labels) else str(int(i)),
            "score": float(np.float32(s)),  # as precise as image_scores, in every mode
        }
        for i, s in image_top_k
    ]


def read_rows(path: Path) -> dict[str, dict]:
    """Rows of an earlier summary by relpath (whole lines only; a damaged line is dropped)."""
    rows: dict[str, dict] = {}
    try:
        text = path.read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "relpath" in row:
            rows[row["relpath"]] = row
    return rows


def skipped_row(job: ImageJob, npz: Path, outputs: list[str], previous: dict | None) -> dict:
    """The row of an image whose outputs a former run wrote (from its row, else its .npz)."""
    if previous is not None and previous.get("status") in ("ok", "skipped"):
        row = dict(previous)
    else:
        try:
            meta = read_meta(npz)
        except (OSError, ValueError, KeyError) as exc:
            return {**failed_row(job, f"existing output unreadable: {exc}"), "status": "skipped"}
        row = {
            "size": meta["image_size"],
            "map_shape": [m["shape"] for m in meta["maps"]],
            "top": top_classes(meta["image_top_k"], tuple(meta["labels"])),
            "seconds": None,
        }
        if meta.get("heads"):
            row["heads"] = [
                {"name": h["name"], "kind": h["kind"], "channels": h["channels"]}
                for h in meta["heads"]
            ]
    row.update(path=job.source, relpath=job.relpath, status="skipped", outputs=outputs)
    return row


class SummaryWriter:
    """Collects rows from any thread; :meth:`finish` writes the sorted file.

    A row that cannot be appended (disk full) sets ``halt`` (the run stops) and is kept for
    :meth:`finish`, which raises :class:`OutputNotWritten` when the file cannot be written.
    """

    def __init__(self, path: Path, *, partial_dir: Path, halt: Halt | None = None) -> None:
        self.path = path
        self.rows: list[dict] = []
        self._lock = threading.Lock()
        self._file = LineFile(path, partial_dir=partial_dir, halt=halt or Halt())

    def add(self, row: dict) -> None:
        line = (json.dumps(row, sort_keys=True) + "\n").encode()
        with self._lock:
            self.rows.append(row)
            self._file.append(line)

    def finish(self) -> None:
        with self._lock:
            self._file.close()
            rows = sorted(self.rows, key=lambda r: r["relpath"])
        self._file.rewrite("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
