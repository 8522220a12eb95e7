"""Giving freed host memory back to the system after big requests (glibc ``malloc_trim``).

Maps, decoded images and response copies are numpy and Python buffers from ``malloc``.
glibc keeps what a request freed in its arenas (one per thread that allocated, up to 8 per
core), so a server's resident memory after a burst of big requests stays near its peak
although almost nothing is in use (docs/engine.md "Measurements behind the code").
:func:`trim` returns the free pages of every arena to the system; the engine calls it,
after shrinking onnxruntime's CPU arena, when a request's peak exceeded
``EngineConfig.arena_keep_bytes``. It costs about a millisecond per arena on an idle heap.

``MALLOC_ARENA_MAX=2`` in the environment (a glibc setting, read at start-up) also bounds
what stays resident, by sharing arenas between threads (docs/engine.md "Host memory").
On other C libraries (musl, macOS) :func:`trim` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

log = logging.getLogger("densemap.engine")

_lock = threading.Lock()
_malloc_trim = None
_looked_up = False


def _function():
    """glibc's ``malloc_trim``, or None where the C library has none."""
    global _malloc_trim, _looked_up
    with _lock:
        if not _looked_up:
            _looked_up = True
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _malloc_trim = libc.malloc_trim
                _malloc_trim.argtypes = [ctypes.c_size_t]
                _malloc_trim.restype = ctypes.c_int
            except (OSError, AttributeError) as exc:
                log.debug("no malloc_trim in this C library (%s): host memory is not trimmed", exc)
        return _malloc_trim


def trim() -> bool:
    """Return the free memory of every malloc arena to the system; True if anything was
    released, False if nothing was or the C library cannot trim."""
    function = _function()
    if function is None:
        return False
    return bool(function(0))


M_ARENA_MAX = -8  # glibc mallopt parameter
DEFAULT_SERVER_ARENAS = 2


def limit_arenas(count: int = DEFAULT_SERVER_ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``count`` for this process (``mallopt(M_ARENA_MAX)``),
    as ``MALLOC_ARENA_MAX`` would, unless that variable is set (the operator's choice wins).

    Called by ``densemap serve`` before its threads start: with one arena per thread (glibc's
    default, up to 8 per core) a server's idle memory after a soak stayed at several times
    its memory after the first request; two shared arenas keep it near that (README
    benchmarks, `make soak`). True when the cap was set here.
    """
    import os

    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, int(count)))
