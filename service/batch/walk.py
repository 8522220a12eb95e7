"""Find the images to score: files and folders, walked recursively, with glob filters.

Each image becomes an :class:`ImageJob` whose ``relpath`` places its outputs: the path of
the file relative to the common folder of all inputs, so the output tree mirrors the input
tree and two inputs never share an output name.

Rules:

- a file named on the command line is always scored (an unreadable one is reported);
- inside folders, a file is an image when its extension is a known image extension, or,
  for any other extension, when its first bytes carry a PNG/JPEG/GIF/TIFF/WebP signature;
  everything else is skipped quietly;
- special files (FIFOs, sockets, devices) are skipped: reading one could block forever;
  a dangling symbolic link is kept, so it is reported;
- hidden files and folders (name starting with ``.``), the output folder and any other
  densemap output folder (one holding ``densemap-run.json``, e.g. of an earlier run with
  another ``--out``: its heat-maps are PNGs) are skipped;
- ``--out`` must not be one of the input folders: outputs would mix with the images;
- ``--glob`` patterns match the path relative to the walked folder from the right
  (``*.png``, ``scans/*.jpg``); a file is kept when any pattern matches. They filter
  folders only: a file named on the command line is scored whatever they say.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from densemap.service.errors import InvalidOption

# One per format the engine decodes (image_input.FORMATS); a test keeps them in step.
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
    | {".ppm", ".pgm", ".pbm"}
)
OUTPUT_MARKER = "densemap-run.json"  # every densemap output folder holds it (rundir.RUN_FILE)
_SIGNATURES = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"II*\x00",
    b"MM\x00*",
)


@dataclass(frozen=True)
class ImageJob:
    """One image to score: where to read it and the relative path its outputs take."""

    source: str
    relpath: str  # POSIX path relative to the common input folder


def has_image_signature(path: str) -> bool:
    """Whether the file starts with the magic bytes of an image format we can decode."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return True
    return any(head.startswith(sig) for sig in _SIGNATURES)


def is_image_file(path: str) -> bool:
    """Known image extension, or an image signature behind any other extension."""
    if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
        return True
    return has_image_signature(path)


def _matches(rel: str, globs: tuple[str, ...]) -> bool:
    if not globs:
        return True
    pure = PurePosixPath(rel)
    return any(pure.match(pattern) for pattern in globs)


def _walk_folder(root: str, globs: tuple[str, ...], skip_dirs: set[str]) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".")
            and os.path.realpath(os.path.join(dirpath, d)) not in skip_dirs
            and not os.path.isfile(os.path.join(dirpath, d, OUTPUT_MARKER))
        )
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            if os.path.exists(path) and not os.path.isfile(path):
                continue  # a FIFO, socket or device: reading it could block forever
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if _matches(rel, globs) and is_image_file(path):
                found.append(path)
    return found


def find_images(
    paths: list[str] | tuple[str, ...],
    *,
    globs: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
) -> list[ImageJob]:
    """The images under ``paths`` in a stable order (sorted per folder, inputs in order).

    ``exclude`` lists folders never to enter (the output folder). Raises
    :class:`InvalidOption` for a path that does not exist.
    """
    if not paths:
        raise InvalidOption("give at least one image file or folder to score")
    skip_dirs = {os.path.realpath(p) for p in exclude}
    files: list[str] = []
    roots: list[str] = []
    for raw in paths:
        path = os.path.abspath(raw)
        if os.path.isdir(path):
            if os.path.realpath(path) in skip_dirs:
                raise InvalidOption(
                    f"the output folder {raw!r} is also an input folder: outputs would mix with "
                    "the images; choose another --out (a new folder, or a subfolder: it is "
                    "never scored)"
                )
            roots.append(path)
            files.extend(_walk_folder(path, tuple(globs), skip_dirs))
        elif os.path.isfile(path):
            roots.append(os.path.dirname(path))
            files.append(path)  # named explicitly: scored whatever --glob says
        else:
            raise InvalidOption(f"input {raw!r} is not a file or folder: check the path")
    base = os.path.commonpath(roots)
    jobs: list[ImageJob] = []
    seen: set[str] = set()
    for path in files:
        if path in seen:
            continue
        seen.add(path)
        rel = Path(os.path.relpath(path, base)).as_posix()
        jobs.append(ImageJob(source=path, relpath=rel))
    return jobs
