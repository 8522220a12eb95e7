"""``densemap render OUT_DIR``: redraw the heat-maps of a score run from its saved ``.npz``.

No model and no scoring: each ``<rel>.npz`` with a score map (``--save maps``) or an argmax
map (``--save argmax``: the top class only, its score as the opacity) is drawn over its
original image (the path in ``summary.jsonl``), with the run's detections from
``detections.jsonl`` when it has them, into ``<rel>.heatmap.png`` (temp file + rename).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from densemap.service.batch.detections_out import JSONL_FILE, read_lines
from densemap.service.batch.heatmap import render_heatmap
from densemap.service.batch.outputs import NPZ_SUFFIX, load_result, write_atomic
from densemap.service.batch.rundir import RUN_FILE, OutputDir
from densemap.service.batch.summary import read_rows
from densemap.service.batch.writer import PNG_COMPRESS_LEVEL, colour_image
from densemap.service.engine.result import Detection
from densemap.service.errors import InvalidOption


@dataclass
class RenderOutcome:
    drawn: int = 0
    failed: int = 0


def _detections(line: dict | None) -> list[Detection] | None:
    if line is None:
        return None
    return [
        Detection(**{**d, "box": tuple(d["box"]), "cell": tuple(d["cell"])})
        for d in line["detections"]
    ]


def _class_index(name: str | None, labels: tuple[str, ...], num_classes: int) -> int | None:
    from densemap.service.batch.run import resolve_class

    return resolve_class(name, labels, num_classes)


def _argmax_scores(npz: Path) -> np.ndarray | None:
    """The best class's score per cell of the first map of a ``--save argmax`` file."""
    with np.load(npz, allow_pickle=False) as arrays:
        return arrays["argmax_scores_0"] if "argmax_scores_0" in arrays else None


def render_run(out_dir: str, *, heatmap_class: str | None = None) -> RenderOutcome:
    """Redraw every heat-map of ``out_dir``; per-image failures are printed and counted."""
    root = Path(out_dir)
    if not (root / RUN_FILE).is_file():
        raise InvalidOption(
            f"{out_dir} is not a 'densemap score' output folder (no {RUN_FILE}): give the "
            "--out folder of a score run"
        )
    settings = json.loads((root / RUN_FILE).read_text())
    if heatmap_class is None:
        heatmap_class = settings.get("heatmap_class")
    outcome = RenderOutcome()
    with OutputDir(root) as out:
        rows = read_rows(out.summary_path)
        boxes = read_lines(out.root / JSONL_FILE)
        npz_files = sorted(p for p in out.root.rglob(f"*{NPZ_SUFFIX}") if ".partial" not in p.parts)
        if not npz_files:
            raise InvalidOption(
                f"{out_dir} holds no .npz to draw (a run with --save detections or none): "
                "rerun 'densemap score' with --save maps"
            )
        for npz in npz_files:
            relpath = npz.relative_to(out.root).as_posix()[: -len(NPZ_SUFFIX)]
            try:
                result, meta = load_result(npz)
                first = result.maps[0]
                if first.scores is None and first.argmax is None:
                    raise InvalidOption(
                        "it holds no score map or argmax (saved with --save top-k): rerun "
                        "'densemap score' with --save maps or --save argmax"
                    )
                row = rows.get(relpath)
                if row is None:
                    raise InvalidOption(f"summary.jsonl has no row for {relpath}")
                num_classes = len(result.image_scores)
                class_index = _class_index(heatmap_class, result.labels, num_classes)
                if first.scores is None and class_index is not None:
                    raise InvalidOption(
                        "it holds the argmax only (--save argmax), which draws the top class: "
                        "leave out --heatmap-class, or rerun 'densemap score' with --save maps"
                    )
                picture = render_heatmap(
                    colour_image(row["path"]),
                    first,
                    labels=result.labels,
                    class_index=class_index,
                    probabilities=meta["options"].get("probabilities", True),
                    detections=_detections(boxes.get(relpath)),
                    argmax_scores=_argmax_scores(npz) if first.scores is None else None,
                )
                write_atomic(
                    out.root / (relpath + ".heatmap.png"),
                    lambda f, p=picture: p.save(f, format="PNG", compress_level=PNG_COMPRESS_LEVEL),
                    partial_dir=out.partial,
                )
                outcome.drawn += 1
            except InvalidOption as exc:
                if "--heatmap-class" in str(exc):
                    raise
                outcome.failed += 1
                print(f"densemap render: {npz}: {exc}", file=sys.stderr)
            except (OSError, ValueError, KeyError) as exc:
                outcome.failed += 1
                print(f"densemap render: {npz}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return outcome
