"""Compute admission: a request's multiply-accumulates, known before it runs, are limited.

A few hundred bytes can ask for hours of work (``scales=[120]*16`` and ``output_stride=1``
on a 64² PNG), and the memory budget does not stop them: tiles keep each pass small. The
engine counts the MACs of every pass from the geometry (``RequestCost.macs``), and
:class:`ComputeLimit` refuses a request above the server's per-request limit with
RESOURCE_EXHAUSTED before it queues, in milliseconds.

The limit is ``--max-request-gmacs`` when given; by default, per model,
:data:`DEFAULT_COMPUTE_IMAGES` times the MACs of one image at the pixel limit
(``--max-pixels``, square) at the model's native stride and scale 1: every request the
pixel limit lets through at the native stride is served, and so are finer strides and
extra scales on smaller images, up to that much work.
"""

from __future__ import annotations

import math

from densemap.service.errors import ImageTooLarge
from densemap.service.server.status import quote_name

DEFAULT_COMPUTE_IMAGES = 2  # default limit: this many full-size images at native stride
GIGA = 1e9


class ComputeLimit:
    """The per-request MAC limit of each model (fixed, or from its pixel limit)."""

    def __init__(self, max_request_gmacs: float = 0.0) -> None:
        self.max_request_gmacs = max_request_gmacs  # 0: per model, from the pixel limit

    def limit(self, engine) -> int:
        """The MACs one request to ``engine`` may cost."""
        if self.max_request_gmacs > 0:
            return int(self.max_request_gmacs * GIGA)
        side = max(math.isqrt(engine.config.max_pixels), max(engine.metadata.geometry.window))
        return DEFAULT_COMPUTE_IMAGES * engine.estimate_macs(side, side)

    def check(self, engine, macs: int, *, model: str) -> None:
        """ImageTooLarge (RESOURCE_EXHAUSTED) when ``macs`` exceeds the model's limit."""
        limit = self.limit(engine)
        if macs <= limit:
            return
        source = (
            "--max-request-gmacs"
            if self.max_request_gmacs > 0
            else f"--max-request-gmacs, by default {DEFAULT_COMPUTE_IMAGES} images of "
            f"--max-pixels at the native stride"
        )
        raise ImageTooLarge(
            f"this request would compute about {macs / GIGA:.1f} GMAC on model "
            f"{quote_name(model)}, over the server's limit of {limit / GIGA:.1f} GMAC per "
            f"request ({source}): ask for less work (fewer or smaller scales, a coarser "
            "output_stride, a smaller image), or split it into several requests"
        )
