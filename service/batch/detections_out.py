"""``detections.jsonl`` and ``detections.coco.json``: the boxes of a ``--detections`` run.

- ``detections.jsonl``: one line per image scored (or skipped) by the latest run, sorted by
  ``relpath``: ``{"relpath", "path", "size": [h, w], "detections": [{"class_index",
  "label", "score", "box": [x0, y0, x1, y1], "scale", "scale_index", "cell": [i, j]}]}``,
  boxes in original-image pixels, best first.
- ``detections.coco.json``: the same boxes as a COCO results list: ``{"image_id",
  "category_id", "bbox": [x, y, width, height], "score", "file_name"}``, with ``image_id``
  the 1-based line number of the image in ``detections.jsonl`` and ``category_id`` the
  class index (``file_name`` is the relpath, for matching a ground-truth file).

Lines are appended to ``detections.jsonl`` while the run goes (so a killed run keeps the
boxes of the images it finished, and resume of ``--save detections`` can trust them); both
files are rewritten whole (temp file + rename) when the run ends.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict
from pathlib import Path

from densemap.service.batch.outputs import Halt, LineFile, OutputNotWritten, write_text
from densemap.service.engine.result import Detection

JSONL_FILE = "detections.jsonl"
COCO_FILE = "detections.coco.json"


def detections_to_json(detections: list[Detection]) -> list[dict]:
    docs = []
    for detection in detections:
        doc = asdict(detection)
        doc["box"], doc["cell"] = list(detection.box), list(detection.cell)
        docs.append(doc)
    return docs


def read_lines(path: Path) -> dict[str, dict]:
    """Lines of an earlier ``detections.jsonl`` by relpath (damaged lines are dropped)."""
    lines: dict[str, dict] = {}
    try:
        text = path.read_text()
    except OSError:
        return lines
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and "relpath" in doc and "detections" in doc:
            lines[doc["relpath"]] = doc
    return lines


def coco_results(lines: list[dict]) -> list[dict]:
    results = []
    for image_id, line in enumerate(lines, start=1):
        for d in line["detections"]:
            x0, y0, x1, y1 = d["box"]
            results.append(
                {
                    "image_id": image_id,
                    "category_id": d["class_index"],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": d["score"],
                    "file_name": line["relpath"],
                }
            )
    return results


class DetectionsWriter:
    """Collects each image's detections from any thread; :meth:`finish` writes both files.

    As :class:`densemap.service.batch.summary.SummaryWriter`: a line that cannot be appended sets
    ``halt``; :meth:`finish` tries both files and raises :class:`OutputNotWritten` for the
    first that cannot be written.
    """

    def __init__(self, root: Path, *, partial_dir: Path, halt: Halt | None = None) -> None:
        self.root = root
        self.partial_dir = partial_dir
        self.lines: dict[str, dict] = {}
        self._lock = threading.Lock()
        halt = halt or Halt()
        self._jsonl = LineFile(root / JSONL_FILE, partial_dir=partial_dir, halt=halt)

    def add(self, line: dict) -> None:
        text = (json.dumps(line, sort_keys=True) + "\n").encode()
        with self._lock:
            self.lines[line["relpath"]] = line
            self._jsonl.append(text)

    def finish(self) -> None:
        with self._lock:
            self._jsonl.close()
            lines = [self.lines[key] for key in sorted(self.lines)]
        text = "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines)
        coco = json.dumps(coco_results(lines), indent=1) + "\n"
        failed: OutputNotWritten | None = None
        for name, content in ((JSONL_FILE, text), (COCO_FILE, coco)):
            try:  # the COCO file is tried even when detections.jsonl cannot be written
                write_text(self.root / name, content, partial_dir=self.partial_dir)
            except OutputNotWritten as exc:
                failed = failed or exc
        if failed is not None:
            raise failed
