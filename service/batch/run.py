"""One batch run, start to end: find images, open the output folder, resume, score, summarise.

Local mode scores in this process (or through ``--server``) with :mod:`.pipeline`; Ray mode
hands the same per-image work to actors (:mod:`.ray_pipeline`). Both write identical
per-image files; this module writes ``summary.jsonl`` and drives the progress display.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

from densemap.service.batch.detections_out import JSONL_FILE, DetectionsWriter, read_lines
from densemap.service.batch.outputs import Halt, OutputNotWritten
from densemap.service.batch.pipeline import PipelineConfig, run_pipeline
from densemap.service.batch.progress import Progress
from densemap.service.batch.rundir import OutputDir, RunSettings, heatmap_path, npz_path
from densemap.service.batch.scorers import REMOTE_CONCURRENCY, ModelChoice, open_engine_scorer
from densemap.service.batch.server_target import ServerTarget
from densemap.service.batch.storage import Storage, check_storage
from densemap.service.batch.summary import SummaryWriter, read_rows, skipped_row
from densemap.service.batch.walk import ImageJob, find_images
from densemap.service.batch.writer import OutputConfig, ResultWriter
from densemap.service.engine.options import ScoreOptions
from densemap.service.errors import InvalidOption


@dataclass(frozen=True)
class RayConfig:
    """How to run on Ray: cluster address, actor pool, resources per actor."""

    address: str | None = None  # None: RAY_ADDRESS or a new local cluster; "auto"; GCS HOST:PORT
    actors: int | None = None  # None: one per GPU with gpus, else one per node
    gpus: bool = False
    actor_cpus: float = 0.5  # >= 1 with few CPUs deadlocks Ray Data (docs/score.md, "Ray Data")
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise InvalidOption(f"--workers (Ray actors) must be >= 1, got {self.actors}")


@dataclass(frozen=True)
class BatchRequest:
    """Everything ``densemap score`` was asked to do."""

    paths: tuple[str, ...]
    out_dir: str
    options: ScoreOptions = ScoreOptions()
    model: ModelChoice = ModelChoice()
    globs: tuple[str, ...] = ()
    server: ServerTarget | None = None  # --server, with its token and TLS
    heatmap: bool = False
    heatmap_class: str | None = None
    storage: Storage = Storage()
    overwrite: bool = False
    workers: int = 4
    ray: RayConfig | None = None
    debug: bool = False

    def __post_init__(self) -> None:
        """What no model can take: settings that contradict each other (the options,
        storage and Ray settings checked their own values)."""
        if self.workers < 1:
            raise InvalidOption(f"--workers must be >= 1, got {self.workers}")
        check_storage(
            self.storage,
            top_k=self.options.top_k,
            detections=self.options.detections is not None,
            dtype=self.options.dtype,
        )


@dataclass
class BatchOutcome:
    progress: Progress
    out_dir: str
    failed_paths: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return self.progress.failed


def resolve_class(
    name: str | None, labels: tuple[str, ...], num_classes: int | None = None
) -> int | None:
    """A ``--heatmap-class`` (label or index) as a class index."""
    if name is None:
        return None
    if name in labels:
        return labels.index(name)
    count = num_classes if num_classes is not None else len(labels)
    if name.isascii() and name.isdigit() and int(name) < count:
        return int(name)
    if labels:
        shown = ", ".join(labels[:20]) + (", ..." if len(labels) > 20 else "")
        shown = f"classes: {shown}, or an index 0..{count - 1}"
    else:
        shown = f"the model has no labels: give a class index 0..{count - 1}"
    raise InvalidOption(f"--heatmap-class {name!r} is not a class of this model; {shown}")


def _cell_threshold(options: ScoreOptions, scorer) -> float:
    """The summary's cells_above threshold: the detections' (the model's when unset)."""
    found = options.detections
    if found is not None and found.threshold is not None:
        return float(found.threshold)
    return scorer.detection_threshold


def _class_name(index: int, labels: tuple[str, ...]) -> str:
    return labels[index] if index < len(labels) else str(index)


def _open_scorer(request: BatchRequest, stack: contextlib.ExitStack):
    if request.server:
        from densemap.service.batch.scorers import open_remote_scorer

        return stack.enter_context(open_remote_scorer(request.server, request.model.model))
    scorer = open_engine_scorer(request.model)
    stack.callback(scorer.close)
    return scorer


def _recorded(out: OutputDir, request: BatchRequest) -> set[str] | None:
    """The relpaths an earlier run's lines record as finished (None: no line to check).

    With ``--detections`` an image is done only with its ``detections.jsonl`` line, which
    is written after its ``.npz`` and heat-map are renamed into place; with no ``.npz``
    (``--save detections|none``) also with an ``ok``/``skipped`` summary row.
    """
    if request.overwrite:
        return None
    done: set[str] | None = None
    if not request.storage.writes_npz:
        rows = read_rows(out.summary_path)
        done = {rel for rel, row in rows.items() if row.get("status") in ("ok", "skipped")}
    if request.options.detections is not None:
        lines = set(read_lines(out.root / JSONL_FILE))
        done = lines if done is None else done & lines
    return done


def _skipped_rows(out: OutputDir, done: list[ImageJob]) -> list[dict]:
    """Rows of the images a former run completed (from its summary, else their .npz)."""
    previous = read_rows(out.summary_path) if done else {}
    rows = []
    for job in done:
        files = [npz_path(out.root, job), heatmap_path(out.root, job)]
        outputs = [p.relative_to(out.root).as_posix() for p in files if p.is_file()]
        rows.append(skipped_row(job, files[0], outputs, previous.get(job.relpath)))
    return rows


def _finish(writers: list, halt: Halt) -> None:
    """Write the run's own files, each tried even when another cannot be written."""
    for writer in writers:
        try:
            writer.finish()
        except OutputNotWritten as exc:
            halt.set(exc)


def _stopped(halt: Halt, progress: Progress, out_dir: str) -> OutputNotWritten:
    """The error that ends a halted run; its counts go to stdout as the last line."""
    print(f"{progress.final_line(out_dir)} (stopped: rerun to resume)", flush=True)
    left = progress.total - progress.done
    return OutputNotWritten(
        f"{left} image(s) not scored: {halt.error}" if left else str(halt.error)
    )


def run_batch(request: BatchRequest, *, tty: bool | None = None) -> BatchOutcome:
    """Run the batch; per-image failures are counted, not raised.

    A file of the run that cannot be written (disk full) stops it: no image starts after
    that, the run's files are still written where they can be, and
    :class:`OutputNotWritten` names the file.
    """
    out_root = Path(request.out_dir)
    OutputDir(out_root).check()  # a read-only --out: one message before the model loads
    jobs = find_images(request.paths, globs=request.globs, exclude=(str(out_root),))
    if not jobs:
        where = ", ".join(request.paths)
        globs = (
            f" matching --glob {' '.join(request.globs)} (case-sensitive)" if request.globs else ""
        )
        print(f"densemap score: warning: no image files{globs} in {where}", file=sys.stderr)
    with contextlib.ExitStack() as stack:
        scorer = _open_scorer(request, stack)
        scorer.check_options(request.options)  # once, before any image: what the model refuses
        class_index = resolve_class(
            request.heatmap_class, scorer.labels, getattr(scorer, "num_classes", None)
        )
        out = stack.enter_context(OutputDir(out_root))
        settings = RunSettings(
            model=scorer.model_name,
            options=request.options,
            heatmap=request.heatmap,
            heatmap_class=None if class_index is None else _class_name(class_index, scorer.labels),
            storage=request.storage,
        )
        out.check_settings(settings, overwrite=request.overwrite)
        todo, done = out.split_done(
            jobs,
            heatmap=request.heatmap,
            overwrite=request.overwrite,
            npz=request.storage.writes_npz,
            recorded=_recorded(out, request),
        )
        skipped_rows = _skipped_rows(out, done)
        halt = Halt()
        summary = SummaryWriter(out.summary_path, partial_dir=out.partial, halt=halt)
        boxes = None
        if request.options.detections is not None:
            previous = read_lines(out.root / JSONL_FILE) if done else {}
            boxes = DetectionsWriter(out.root, partial_dir=out.partial, halt=halt)
            for job in done:
                if job.relpath in previous:
                    boxes.add({**previous[job.relpath], "path": job.source})
        for row in skipped_rows:
            summary.add(row)
        if done:
            print(
                f"densemap score: skipping {len(done)} image(s) whose outputs exist "
                "(--overwrite redoes them)",
                file=sys.stderr,
            )
        progress = Progress(len(todo), skipped=len(done), tty=tty)
        outcome = BatchOutcome(progress=progress, out_dir=str(out.root))

        def report(row: dict) -> None:
            found = row.pop("detections", None)
            if boxes is not None and found is not None:
                line = {"relpath": row["relpath"], "path": row["path"], "size": row["size"]}
                boxes.add({**line, "detections": found})
            summary.add(row)
            progress.update(row)
            if row["status"] == "failed":
                outcome.failed_paths.append(row["path"])

        output = OutputConfig(
            out_dir=str(out.root),
            partial_dir=str(out.partial),
            model_name=scorer.model_name,
            options=request.options,
            heatmap=request.heatmap,
            heatmap_class=class_index,
            color=getattr(scorer, "color", "RGB"),
            storage=request.storage,
            cell_threshold=_cell_threshold(request.options, scorer),
        )
        try:
            if request.ray is not None:
                from densemap.service.batch.ray_pipeline import run_ray

                run_ray(todo, request=request, output=output, report=report, halt=halt)
            else:
                run_pipeline(
                    todo,
                    scorer=scorer,
                    writer=ResultWriter(output),
                    options=request.options,
                    report=report,
                    config=PipelineConfig(
                        workers=request.workers,
                        concurrency=REMOTE_CONCURRENCY if request.server else 1,
                        debug=request.debug,
                    ),
                    halt=halt,
                )
        except KeyboardInterrupt:
            progress.close()
            print(f"{progress.final_line(str(out.root))} (interrupted: rerun to resume)")
            raise
        finally:
            progress.close()
            _finish([summary] if boxes is None else [summary, boxes], halt)
        if halt():
            raise _stopped(halt, progress, str(out.root))
    return outcome
