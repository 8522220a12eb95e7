"""Per-image outputs: one ``.npz`` holding the maps, geometry, labels and options.

Layout of ``<out>/<relpath>.npz`` (load with ``numpy.load``, no pickle needed):

- ``scores_<k>``: the map of scale ``k`` (in ``--scales`` order), ``[C, n_h, n_w]``;
- ``top_k_indices_<k>``, ``top_k_scores_<k>``: per-cell top-k (with ``--top-k``);
- ``argmax_<k>``, ``argmax_scores_<k>``, ``classes_<k>``: per ``--save`` (:mod:`.storage`);
- ``head_<name>_<k>``: the map of extra head ``<name>`` at scale ``k``, ``[channels, n_h,
  n_w]`` (models with several heads; in every ``--save`` mode that writes an ``.npz``);
- ``image_scores``: ``[C]`` image-level scores; ``labels``: ``[C]`` class names;
- ``meta``: a JSON string: source relpath, image size, model, options, and per map its
  shape and geometry (stride, window, origin, receptive field, scale, resize), and
  ``storage`` (save mode, map dtype, compression; absent in files from before ``--save``,
  which hold float32 maps uncompressed); ``heads`` (name, kind, labels, channels of each
  extra head stored; absent when there is none).

The file is a zip (deflated by default, as ``numpy.savez_compressed``) written with fixed
timestamps, so equal results give
byte-identical files (local and Ray runs compare bit for bit). Every file is written to a
temp file in the run's partial folder, then renamed into place: a killed run never leaves
a partial output under its final name. Files are created with mode 0o644 (less the umask).

The run's own files (``summary.jsonl``, ``detections.jsonl``) are :class:`LineFile`: lines
appended while the run goes, the whole file rewritten at the end. A write that fails there
(disk full), or a disk full on any output, sets the run's :class:`Halt`: no image starts
after it, and the run ends with :class:`OutputNotWritten` naming the file (exit 1).
"""

from __future__ import annotations

import errno
import json
import os
import threading
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import BinaryIO

import numpy as np

from densemap.service.batch.storage import LEGACY, Storage, head_arrays, map_arrays
from densemap.service.engine.heads import HeadInfo
from densemap.service.engine.options import ScoreOptions
from densemap.service.engine.result import MapGeometry, ScaleMap, ScoreResult
from densemap.service.errors import DensemapError

NPZ_SUFFIX = ".npz"
HEATMAP_SUFFIX = ".heatmap.png"
FILE_MODE = 0o644  # every file a run creates (the umask applies)
DISK_FULL = frozenset((errno.ENOSPC, errno.EDQUOT))
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_PER_MAP_ARRAYS = ("scores", "top_k_indices", "top_k_scores", "argmax")
LEGACY_STORAGE = Storage(**LEGACY)


class OutputNotWritten(DensemapError):
    """A file of the run cannot be written (disk full, I/O error): the run stops (exit 1)."""

    exit_code = 1


def not_written(path: Path | str, exc: OSError) -> OutputNotWritten:
    """The error that stops a run on ``exc``, naming ``path`` (and "disk full" when so)."""
    reason = exc.strerror or str(exc)
    if exc.errno in DISK_FULL:
        head = f"disk full: cannot write {path} ({reason}): free space"
    else:
        head = f"cannot write {path}: {reason}: fix that"
    return OutputNotWritten(f"{head}, then rerun to resume (finished images are kept)")


class Halt:
    """The first error that stops a run; set from any thread, no image starts after it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.error: OutputNotWritten | None = None

    def set(self, error: OutputNotWritten) -> None:
        with self._lock:
            if self.error is None:
                self.error = error

    def __call__(self) -> bool:
        return self.error is not None


def write_atomic(target: Path, write: Callable[[BinaryIO], None], *, partial_dir: Path) -> None:
    """Write ``target`` through a temp file in ``partial_dir`` and an atomic rename.

    An ``OSError`` names ``target`` (not the temp file) as its ``filename``.
    """
    tmp = partial_dir / f"{uuid.uuid4().hex}-{target.name}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        with os.fdopen(os.open(tmp, flags, FILE_MODE), "wb") as f:
            write(f)
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(target)) from exc
        raise


def append_bytes(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd`` (a short write is continued; an error raises)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class LineFile:
    """A run file appended line by line (a killed run leaves whole lines), rewritten whole
    at the end. A failed append (disk full) stops the appends and sets ``halt``; the lines
    are still kept by the caller for :meth:`rewrite`."""

    def __init__(self, path: Path, *, partial_dir: Path, halt: Halt) -> None:
        self.path = path
        self.partial_dir = partial_dir
        self.halt = halt
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        try:
            self._fd: int | None = os.open(path, flags, FILE_MODE)
        except OSError as exc:
            raise not_written(path, exc) from None

    def append(self, data: bytes) -> None:
        """Append ``data`` (whole lines); the caller serialises calls."""
        if self._fd is None:
            return
        try:
            append_bytes(self._fd, data)
        except OSError as exc:
            self.close()
            self.halt.set(not_written(self.path, exc))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def rewrite(self, text: str) -> None:
        """Replace the file by ``text`` (temp file + rename); raises OutputNotWritten."""
        self.close()
        write_text(self.path, text, partial_dir=self.partial_dir)


def write_text(path: Path, text: str, *, partial_dir: Path) -> None:
    """``path`` holds ``text`` (temp file + rename), or :class:`OutputNotWritten` says why."""
    try:
        write_atomic(path, lambda f: f.write(text.encode()), partial_dir=partial_dir)
    except OSError as exc:
        raise not_written(path, exc) from None


def options_to_json(options: ScoreOptions) -> dict:
    doc = asdict(options)
    for name in ("detections", "heads"):  # runs from before these existed read the same
        if doc.get(name) is None:
            doc.pop(name, None)
    return doc


def encode_result(
    result: ScoreResult,
    *,
    relpath: str,
    model_name: str,
    options: ScoreOptions,
    storage: Storage = LEGACY_STORAGE,
) -> dict[str, np.ndarray]:
    """The named arrays of one image's ``.npz`` (see module docstring)."""
    arrays: dict[str, np.ndarray] = {}
    maps_meta = []
    for k, scale_map in enumerate(result.maps):
        arrays.update(map_arrays(k, scale_map, storage))
        arrays.update(head_arrays(k, scale_map, storage))
        if scale_map.classes is not None:
            arrays[f"classes_{k}"] = np.asarray(scale_map.classes, dtype=np.int32)
        maps_meta.append({"shape": list(scale_map.shape), "geometry": asdict(scale_map.geometry)})
    arrays["image_scores"] = np.ascontiguousarray(result.image_scores)
    arrays["labels"] = np.array(list(result.labels), dtype=np.str_)
    meta = {
        "source": relpath,
        "image_size": list(result.image_size),
        "model": model_name,
        "options": options_to_json(options),
        "maps": maps_meta,
        # float32 like image_scores: the engine ranks in float64, the server sends float32
        "image_top_k": [[int(i), float(np.float32(s))] for i, s in result.image_top_k],
    }
    if storage != LEGACY_STORAGE:  # files as before --save read back byte for byte
        meta["storage"] = storage.to_json()
    if result.heads and storage.writes_npz:
        meta["heads"] = [head_to_json(head) for head in result.heads]
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    return arrays


def write_npz(f: BinaryIO, arrays: dict[str, np.ndarray], *, compress: bool = False) -> None:
    """An ``.npz`` readable by ``numpy.load`` whose bytes depend only on the arrays."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(f, mode="w", compression=method, allowZip64=True) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_EPOCH)
            info.compress_type = method
            info.external_attr = 0o644 << 16
            with zf.open(info, mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def head_to_json(head: HeadInfo) -> dict:
    return {"name": head.name, "kind": head.kind, "labels": list(head.labels),
            "channels": head.channels}  # fmt: skip


def read_meta(path: Path) -> dict:
    """The ``meta`` document of an output file plus its ``labels`` (reads only those two)."""
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"]))
        meta["labels"] = [str(v) for v in npz["labels"]]
    return meta


def _geometry(doc: dict) -> MapGeometry:
    return MapGeometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in doc.items()})


def load_result(path: Path | str) -> tuple[ScoreResult, dict]:
    """Read an output ``.npz`` back into a :class:`ScoreResult` plus its ``meta`` document."""
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"]))
        heads = tuple(
            HeadInfo(h["name"], h["kind"], tuple(h["labels"]), h["channels"])
            for h in meta.get("heads", ())
        )
        maps = []
        for k, map_doc in enumerate(meta["maps"]):
            fields = {name: npz[f"{name}_{k}"] for name in _PER_MAP_ARRAYS if f"{name}_{k}" in npz}
            classes = npz[f"classes_{k}"] if f"classes_{k}" in npz else None
            maps.append(
                ScaleMap(
                    geometry=_geometry(map_doc["geometry"]),
                    classes=None if classes is None else tuple(int(c) for c in classes),
                    head_maps={h.name: npz[f"head_{h.name}_{k}"] for h in heads},
                    **fields,
                )
            )
        result = ScoreResult(
            maps=maps,
            image_scores=npz["image_scores"],
            image_top_k=[(int(i), float(s)) for i, s in meta["image_top_k"]],
            labels=tuple(str(v) for v in npz["labels"]),
            image_size=tuple(meta["image_size"]),
            heads=heads,
        )
    return result, meta
