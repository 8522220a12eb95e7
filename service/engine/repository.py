"""The model repository: one folder per model, ``root/<name>/model.onnx``.

A folder may also hold the à-trous variant files its metadata names, ``labels.txt``
(one label per line; it overrides the metadata labels) and ``densemap.json`` (per-model
settings: default precision, warm-up shapes; see :mod:`densemap.service.engine.model_settings`). Names are looked up in the
scanned index only, never joined into paths. :meth:`ModelRepository.reload` rescans: new
or changed folders (any file's size or mtime) are loaded, removed ones dropped, and a model
that fails to load is logged and recorded in :attr:`ModelRepository.errors`; it NEVER
replaces a working version of the same name.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import densemap.service as service
from densemap.service.contract import parse_labels
from densemap.service.engine.model_settings import apply_model_settings
from densemap.service.engine.options import EngineConfig
from densemap.service.errors import DensemapError, ModelLoadError, ModelNotFound

if TYPE_CHECKING:  # imported when a model loads: MODELS_HELP and the paths need no runtime
    from densemap.service.engine.engine import Engine

log = logging.getLogger("densemap.engine")

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.txt"
MODELS_ENV = "DENSEMAP_MODELS"

Signature = tuple[tuple[str, int, int], ...]


def _is_model_folder(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and (path / MODEL_FILE).is_file()


# The one rule for the default repository, shown by every --help that takes --models.
MODELS_HELP = (
    "model repository, one folder per model (default: $DENSEMAP_MODELS, else the bundled "
    "repository, which holds 'digits'; the current folder plays no part)"
)


def bundled_models_dir() -> Path:
    """The repository shipped with densemap (the ``digits`` model).

    Installed from a wheel: ``densemap/service/bundled_models``; run from a checkout (or an editable
    install): the checkout's ``models/``, which holds the same files.
    """
    package = Path(service.__file__).resolve().parent
    installed = package / "bundled_models"
    return installed if installed.is_dir() else package.parent / "models"


def default_models_dir() -> Path:
    """``$DENSEMAP_MODELS`` if set, else :func:`bundled_models_dir` (see ``MODELS_HELP``)."""
    env = os.environ.get(MODELS_ENV, "").strip()
    return Path(env) if env else bundled_models_dir()


def read_model_labels(path: Path) -> tuple[str, ...] | None:
    """Labels of a model folder's ``labels.txt`` (one per line, trailing blank lines
    ignored), or None without one (convert's ``--labels`` file: densemap.convert.flags.read_labels)."""
    if not path.is_file():
        return None
    try:
        return parse_labels(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read labels file {path}: {exc}") from None


def _signature(folder: Path) -> Signature:
    entries = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file():
            stat = entry.stat()
            entries.append((entry.name, stat.st_size, stat.st_mtime_ns))
    return tuple(entries)


def _not_found(name: str, root: Path, available) -> ModelNotFound:
    return ModelNotFound(
        f"model {name!r} is not in the repository {root}; available: "
        f"{', '.join(sorted(available)) or 'none'} (--models DIR names another repository)"
    )


def _model_folders(root: Path) -> dict[str, Path]:
    return {p.name: p for p in root.iterdir() if _is_model_folder(p)}


def load_model(root: str | Path, name: str, *, config: EngineConfig = EngineConfig()) -> Engine:
    """Load the one model ``name`` of the repository at ``root``, reading no other folder.

    Raises ModelNotFound (unknown name, unreadable root) or ModelLoadError.
    """
    root = Path(root)
    try:
        folders = _model_folders(root)
    except OSError as exc:
        raise ModelNotFound(
            f"the model repository {root} cannot be read ({exc.strerror or exc}): "
            "pass --models DIR, a folder with one sub-folder per model"
        ) from None
    if name not in folders:
        raise _not_found(name, root, folders)
    folder = folders[name]
    config = apply_model_settings(folder, config)  # densemap.json, as the server reads it
    from densemap.service.engine.engine import Engine

    return Engine(
        folder / MODEL_FILE,
        config=config,
        name=name,
        labels=read_model_labels(folder / LABELS_FILE),
    )


@dataclass
class ReloadReport:
    """What one :meth:`ModelRepository.reload` changed (model names)."""

    loaded: list[str] = field(default_factory=list)  # new names
    updated: list[str] = field(default_factory=list)  # changed and reloaded
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # name -> error (old version kept)
    unchanged: list[str] = field(default_factory=list)


class ModelRepository:
    """Engines for every model folder under ``root``; thread-safe."""

    def __init__(self, root: str | Path, *, config: EngineConfig = EngineConfig()) -> None:
        self.root = Path(root)
        self.config = config
        self._engines: dict[str, Engine] = {}
        self._signatures: dict[str, Signature] = {}
        self._errors: dict[str, str] = {}
        self._lock = threading.Lock()  # guards the index
        self._reload_lock = threading.Lock()  # one reload at a time
        self.reload()

    @property
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._engines)

    @property
    def errors(self) -> dict[str, str]:
        """Model name -> message, for folders whose current files failed to load."""
        with self._lock:
            return dict(self._errors)

    def get(self, name: str) -> Engine:
        with self._lock:
            engine = self._engines.get(name)
            error = self._errors.get(name) if isinstance(name, str) else None
            available = sorted(self._engines)
        if engine is not None:
            return engine
        if error is not None:
            raise ModelNotFound(f"model {name!r} failed to load: {error}")
        raise _not_found(name, self.root, available)

    def _load(self, name: str, folder: Path) -> Engine:
        from densemap.service.engine.engine import Engine

        labels = read_model_labels(folder / LABELS_FILE)
        config = apply_model_settings(folder, self.config)
        return Engine(folder / MODEL_FILE, config=config, name=name, labels=labels)

    def reload(self) -> ReloadReport:
        """Rescan the root folder; see the module docstring for the rules."""
        report = ReloadReport()
        with self._reload_lock:
            try:
                folders = _model_folders(self.root)
            except OSError as exc:
                log.warning("model repository %s cannot be read: %s", self.root, exc)
                folders = {}
            with self._lock:
                engines, signatures = dict(self._engines), dict(self._signatures)
                errors = dict(self._errors)
            for name in sorted(set(engines) - set(folders)):
                del engines[name]
                signatures.pop(name, None)
                report.removed.append(name)
            for name in set(errors) - set(folders):
                del errors[name]
            for name in set(signatures) - set(folders):
                del signatures[name]
            for name, folder in sorted(folders.items()):
                try:
                    signature = _signature(folder)
                except OSError as exc:
                    errors[name] = f"cannot read {folder}: {exc}"
                    report.failed[name] = errors[name]
                    continue
                if signatures.get(name) == signature:
                    report.unchanged.append(name)
                    continue
                try:
                    engine = self._load(name, folder)
                except Exception as exc:  # noqa: BLE001 - one bad folder must not stop the scan
                    message = str(exc) if isinstance(exc, DensemapError) else repr(exc)
                    keep = " (the previous version stays served)" if name in engines else ""
                    log.error(
                        "model %r failed to load%s: %s", name, keep, message, extra={"model": name}
                    )
                    errors[name] = message
                    report.failed[name] = message
                    signatures[name] = signature  # do not retry until the files change
                    continue
                (report.updated if name in engines else report.loaded).append(name)
                engines[name] = engine
                signatures[name] = signature
                errors.pop(name, None)
            with self._lock:
                self._engines, self._signatures, self._errors = engines, signatures, errors
        return report
