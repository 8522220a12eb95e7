"""What the NVIDIA driver of this machine supports, and what onnxruntime-gpu needs of it.

Used to say *why* CUDA is not usable and what to install: onnxruntime-gpu is built for one
CUDA major version (``onnxruntime.capi.build_and_package_info.cuda_version``), and CUDA
``N.x`` runs only on a driver at least as new as the first one of that major version
(NVIDIA's CUDA toolkit release notes, "minor version compatibility": R525 for CUDA 12,
R580 for CUDA 13). The driver's own CUDA version comes from ``cuDriverGetVersion`` in
``libcuda.so.1``, which the driver installs (no CUDA toolkit needed).
"""

from __future__ import annotations

import ctypes
import functools

# The oldest driver branch that runs each CUDA major version.
MIN_DRIVER_BRANCH = {11: "R450", 12: "R525", 13: "R580"}


@functools.cache
def built_cuda_version() -> tuple[int, int] | None:
    """(major, minor) CUDA version onnxruntime-gpu was built for; None for CPU builds."""
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        return None
    text = getattr(info, "cuda_version", "") or ""
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return None


def driver_cuda_version() -> tuple[int, int] | None:
    """(major, minor) CUDA version the installed driver supports; None: no driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    try:
        status = libcuda.cuDriverGetVersion(ctypes.byref(version))
    except AttributeError:
        return None
    if status != 0 or version.value <= 0:
        return None
    return version.value // 1000, (version.value % 1000) // 10


def required_driver() -> str:
    """What this onnxruntime build needs, in an operator's words."""
    built = built_cuda_version()
    if built is None:
        return "an onnxruntime build with CUDA (pip install onnxruntime-gpu) and an NVIDIA driver"
    branch = MIN_DRIVER_BRANCH.get(built[0])
    driver = f"NVIDIA driver {branch} or newer" if branch else "a matching NVIDIA driver"
    return f"CUDA {built[0]} (onnxruntime-gpu is built for CUDA {built[0]}.{built[1]}): {driver}"


def describe_driver() -> str:
    """This machine's driver and what is needed, e.g. for a log line or an error."""
    found = driver_cuda_version()
    needed = f"needed: {required_driver()}, and cuDNN 9"
    if found is None:
        return needed
    return f"this node's NVIDIA driver supports CUDA up to {found[0]}.{found[1]}; {needed}"
