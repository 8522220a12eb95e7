"""The memory budget of a request: a fixed figure on CPU, a share of the free GPU memory on CUDA.

The budget covers a request's maps and working copies plus one pass's activations, which
are tiled to fit (:mod:`densemap.service.engine.pass_budget`); on CUDA the activations live on the
device and get the whole budget there.

``EngineConfig.memory_budget = None`` (the default) means "choose for the device":

- CPU: :data:`~densemap.service.engine.options.DEFAULT_MEMORY_BUDGET` (1 GiB per request: maps,
  copies and a pass's activations), which keeps a server's resident memory predictable.
- CUDA: :data:`CUDA_BUDGET_FRACTION` of the device memory free when the model loads (CUDA
  runtime ``cudaMemGetInfo``), so that e.g. VGG-16 at 2048² (about 2.3 GiB of activations
  estimated) runs as one pass on an 80 GB card. Half, not all: the estimate counts
  activations only (not cuDNN workspaces or the fp16 copy's buffers), and the server's
  workers may run passes side by side. With many workers per GPU, set the budget yourself
  (free memory / workers).

An explicit int is used as it is, on every device. Tiles remain for what does not fit.
"""

from __future__ import annotations

import ctypes
import logging

from densemap.service.engine.options import DEFAULT_MEMORY_BUDGET, EngineConfig

log = logging.getLogger("densemap.engine")

CUDA_BUDGET_FRACTION = 0.5
_CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")


def cuda_free_bytes(device_id: int = 0) -> int | None:
    """Free memory of CUDA device ``device_id`` in bytes, or None when it cannot be read."""
    for name in _CUDART_NAMES:
        try:
            cudart = ctypes.CDLL(name)
        except OSError:
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        if cudart.cudaSetDevice(ctypes.c_int(device_id)) != 0:
            return None
        if cudart.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) != 0:
            return None
        return int(free.value)
    return None


def resolve_memory_budget(config: EngineConfig, *, on_cuda: bool) -> int:
    """The bytes one request may use: its maps and copies plus one pass's activations."""
    if config.memory_budget is not None:
        return int(config.memory_budget)
    if not on_cuda:
        return DEFAULT_MEMORY_BUDGET
    free = cuda_free_bytes()
    if free is None:
        log.warning(
            "free GPU memory unknown (CUDA runtime library not found): memory budget %d MiB; "
            "set EngineConfig.memory_budget (--memory-budget) for this GPU",
            DEFAULT_MEMORY_BUDGET >> 20,
        )
        return DEFAULT_MEMORY_BUDGET
    return max(DEFAULT_MEMORY_BUDGET, int(free * CUDA_BUDGET_FRACTION))
