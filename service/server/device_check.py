"""The device a server is told to use must work before it becomes ready.

``--device cuda`` on a node whose driver is too old (or missing) would otherwise load every
model with an error behind a live process; with ``--device auto`` it would score on the CPU
while holding a GPU. A server told ``cuda`` checks CUDA once, before loading any model, and
stays not ready (readiness NOT_SERVING, scoring calls UNAVAILABLE with the reason) when it
does not work, logging why and which driver is needed.
"""

from __future__ import annotations

from densemap.service.engine.options import EngineConfig


def device_problem(engine: EngineConfig) -> str | None:
    """None when ``engine.device`` can be used (always for cpu and auto), else why not."""
    if engine.device != "cuda":
        return None
    from densemap.service.engine.session import cuda_problem

    problem = cuda_problem(engine)
    if problem is None:
        return None
    return (
        f"--device cuda, but CUDA is not usable: {problem}. Fix the node's driver, or serve on "
        "the CPU with --device auto (falls back) or --device cpu"
    )
