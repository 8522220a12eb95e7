"""The output folder of a batch run: lock, temp files, run settings and resume.

``<out>/`` holds the per-image outputs (mirroring the input tree), ``summary.jsonl``,
``densemap-run.json`` (model and options of the outputs, so a rerun with other settings
cannot silently mix results), ``.partial/`` (temp files; a killed run may leave some, the
next run deletes them) and ``.lock`` (one run at a time per folder).

An output folder that cannot be written (read-only folder or file system) is refused up
front, in one message; a disk full on the run's files stops the run with
:class:`densemap.service.batch.outputs.OutputNotWritten`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from densemap.service.batch.outputs import (
    DISK_FULL,
    FILE_MODE,
    HEATMAP_SUFFIX,
    NPZ_SUFFIX,
    not_written,
    options_to_json,
    write_text,
)
from densemap.service.batch.storage import LEGACY, Storage
from densemap.service.batch.walk import OUTPUT_MARKER, ImageJob
from densemap.service.engine.options import ScoreOptions
from densemap.service.errors import InvalidOption

RUN_FILE = OUTPUT_MARKER  # "densemap-run.json": the walk never enters such a folder
SUMMARY_FILE = "summary.jsonl"
PARTIAL_DIR = ".partial"
LOCK_FILE = ".lock"


@dataclass(frozen=True)
class RunSettings:
    """What decides the content of the outputs; a resumed run must ask for the same."""

    model: str
    options: ScoreOptions
    heatmap: bool = False
    heatmap_class: str | None = None  # None: top class with its confidence
    storage: Storage = Storage()

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "options": options_to_json(self.options),
            "heatmap": self.heatmap,
            "heatmap_class": self.heatmap_class,
            "storage": self.storage.to_json(),
        }


def npz_path(out_dir: Path, job: ImageJob) -> Path:
    return out_dir / (job.relpath + NPZ_SUFFIX)


def heatmap_path(out_dir: Path, job: ImageJob) -> Path:
    return out_dir / (job.relpath + HEATMAP_SUFFIX)


def _describe_changes(old: dict, new: dict) -> str:
    """What differs between two run settings, e.g. "top_k 0 -> 2, model 'a' -> 'b'"."""
    old_options, new_options = old.get("options") or {}, new.get("options") or {}
    changes = [
        f"{key} {old_options.get(key)!r} -> {new_options.get(key)!r}"
        for key in sorted(set(old_options) | set(new_options))
        if old_options.get(key) != new_options.get(key)
    ]
    if (old.get("storage") or LEGACY) != new.get("storage"):
        changes.insert(0, f"storage {old.get('storage') or LEGACY} -> {new.get('storage')}")
    for key in ("model", "heatmap_class"):
        if old.get(key) != new.get(key) and (key == "model" or old.get("heatmap")):
            changes.insert(0, f"{key} {old.get(key)!r} -> {new.get(key)!r}")
    return ", ".join(changes)


def _unwritable(root: Path, exc: OSError | None = None) -> InvalidOption:
    reason = "read-only folder or file system" if exc is None else exc.strerror or str(exc)
    return InvalidOption(
        f"output folder {root} is not writable ({reason}): make it writable or choose another --out"
    )


class OutputDir:
    """Owns ``<out>/`` for the length of a run (use as a context manager)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        self.partial = self.root / PARTIAL_DIR
        self.summary_path = self.root / SUMMARY_FILE
        self._lock_fd: int | None = None

    def check(self) -> None:
        """Refuse, before any work, an output folder that is a file or cannot be written."""
        if self.root.exists() and not self.root.is_dir():
            raise InvalidOption(
                f"--out {self.root} is an existing file, not a folder: choose a folder "
                "(it is created if missing)"
            )
        if self.root.is_dir() and not os.access(self.root, os.W_OK | os.X_OK):
            raise _unwritable(self.root)

    def __enter__(self) -> OutputDir:
        self.check()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidOption(f"cannot create output folder {self.root}: {exc}") from None
        self._lock()
        shutil.rmtree(self.partial, ignore_errors=True)
        try:
            self.partial.mkdir()
        except OSError as exc:
            self.__exit__()
            if exc.errno in DISK_FULL:
                raise not_written(self.partial, exc) from None
            raise _unwritable(self.root, exc) from None
        return self

    def __exit__(self, *exc_info) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _lock(self) -> None:
        try:
            self._lock_fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as exc:  # EACCES/EROFS where os.access could not tell (root, NFS...)
            if exc.errno in DISK_FULL:
                raise not_written(self.root / LOCK_FILE, exc) from None
            raise _unwritable(self.root, exc) from None
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock
            return
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise InvalidOption(
                f"another 'densemap score' is writing to {self.root}: wait for it to finish "
                "or choose another --out"
            ) from None

    def check_settings(self, settings: RunSettings, *, overwrite: bool) -> None:
        """Refuse to mix outputs of different settings, then record this run's settings."""
        run_file = self.root / RUN_FILE
        new = json.loads(json.dumps(settings.to_json()))  # tuples -> lists, as read back
        old = None
        if run_file.exists():
            try:
                old = json.loads(run_file.read_text())
            except (OSError, ValueError):
                old = None
        if old is not None and not overwrite:
            differs = old.get("model") != new["model"] or old.get("options") != new["options"]
            differs = differs or (old.get("storage") or LEGACY) != new["storage"]
            both_heat = old.get("heatmap") and new["heatmap"]
            if both_heat and old.get("heatmap_class") != new["heatmap_class"]:
                differs = True
            if differs:
                raise InvalidOption(
                    f"{self.root} holds outputs made with other settings "
                    f"({_describe_changes(old, new)}): pass --overwrite to redo them, "
                    "or choose another --out"
                )
            if old.get("heatmap") and not new["heatmap"]:
                new["heatmap"], new["heatmap_class"] = True, old.get("heatmap_class")
        text = json.dumps(new, indent=2, sort_keys=True) + "\n"
        write_text(run_file, text, partial_dir=self.partial)

    def is_complete(
        self,
        job: ImageJob,
        *,
        heatmap: bool,
        npz: bool = True,
        recorded: set[str] | None = None,
    ) -> bool:
        """Whether every output of ``job`` exists (each was renamed into place whole).

        ``npz``: the run writes an ``.npz`` per image. ``recorded``: the relpaths an earlier
        run's lines record as finished: its ``detections.jsonl`` lines with
        ``--detections`` (written after the ``.npz`` and heat-map were renamed into place,
        so an image killed between the two is redone), and with no ``.npz``
        (``--save detections|none``) its ``ok``/``skipped`` summary rows too.
        """
        if npz and not npz_path(self.root, job).is_file():
            return False
        if recorded is not None and job.relpath not in recorded:
            return False
        return not heatmap or heatmap_path(self.root, job).is_file()

    def split_done(
        self,
        jobs: list[ImageJob],
        *,
        heatmap: bool,
        overwrite: bool,
        npz: bool = True,
        recorded: set[str] | None = None,
    ) -> tuple[list[ImageJob], list[ImageJob]]:
        """(to score, already complete); with ``overwrite`` everything is to score."""
        if overwrite:
            return list(jobs), []
        todo, done = [], []
        for job in jobs:
            complete = self.is_complete(job, heatmap=heatmap, npz=npz, recorded=recorded)
            (done if complete else todo).append(job)
        return todo, done
