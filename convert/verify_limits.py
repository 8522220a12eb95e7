"""How far a dense map may be from its reference: the classifier's own rounding, measured.

A dense map and crop-by-crop evaluation sum the same products in another order, so in
float32 they differ by about the classifier's own float32 rounding error, which depends on
the net (a ConvMixer's large activations that BatchNorm cancels round far more than a
LeNet), not on the score's size alone. So ``--verify`` measures it: the original
classifier runs in float32 and in float64 on the same random windows of size R, and

    limit = max(ROUNDING_FACTOR x max|fp32 - fp64|,  FLOOR_EPS x eps32 x max|score|)

per compared row (max|score| over that row's reference scores). The floor is relative to
the scores, so a wrong conversion fails at any logit scale (logits around 1e-9 included),
and it only matters when the measured rounding is tiny. In float64 there is nothing finer
to measure against: the limit is FLOAT64_RELATIVE x max|score|. When the classifier cannot
run in float64 (an op onnx's reference evaluator lacks), float32 falls back to
FALLBACK_RELATIVE x max|score| and the table says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

ROUNDING_FACTOR = 8.0
FLOOR_EPS = 16.0
FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7
FLOAT64_RELATIVE = 1e-9
FALLBACK_RELATIVE = 1e-4
ROUNDING_WINDOWS = 8  # random windows of size R on which the rounding is measured


@dataclass(frozen=True)
class Tolerance:
    """The limit of every compared row of one verification."""

    dtype: str  # "float32" or "float64"
    rounding: float | None = None  # max |fp32 - fp64| of the classifier at R
    windows: int = 0  # how many windows it was measured on
    unmeasured: str = ""  # why the rounding could not be measured (float32 only)

    def limit(self, scores: np.ndarray) -> float:
        """The largest |difference| allowed against the reference ``scores``."""
        scale = float(np.abs(scores).max()) if scores.size else 0.0
        if self.dtype == "float64":
            return FLOAT64_RELATIVE * scale
        if self.rounding is None:
            return FALLBACK_RELATIVE * scale
        return max(ROUNDING_FACTOR * self.rounding, FLOOR_EPS * FLOAT32_EPS * scale)

    def describe(self, window: tuple[int, int]) -> str:
        """One line for the report: what the limit is and where its numbers come from."""
        if self.dtype == "float64":
            return f"limit: {FLOAT64_RELATIVE:.0e} x max|score| (float64)"
        if self.rounding is None:
            return (
                f"limit: {FALLBACK_RELATIVE:.0e} x max|score|: the classifier's own float32 "
                f"rounding was not measured ({self.unmeasured})"
            )
        return (
            f"limit: max({ROUNDING_FACTOR:g} x {self.rounding:.2e}, {FLOOR_EPS:g} eps32 x "
            f"max|score|); {self.rounding:.2e} = the classifier's own float32 rounding, "
            f"max|fp32 - fp64| on {self.windows} windows of {window[0]}x{window[1]}"
        )


def measure(
    reference32: np.ndarray, run64: Callable[[np.ndarray], np.ndarray], windows: np.ndarray
) -> Tolerance:
    """The float32 tolerance from the classifier's fp32 scores ``reference32`` on
    ``windows`` and ``run64``, the classifier in float64 (run one window at a time: fp64
    convolutions unfold their input, which costs memory on big nets)."""
    windows = windows.astype(np.float64)
    scores64 = np.concatenate([run64(windows[i : i + 1]) for i in range(len(windows))])
    return from_scores(reference32, scores64)


def from_scores(reference32: np.ndarray, scores64: np.ndarray) -> Tolerance:
    """The float32 tolerance from the same windows' fp32 and fp64 scores."""
    rounding = float(np.abs(reference32.astype(np.float64) - scores64).max())
    return Tolerance(dtype="float32", rounding=rounding, windows=len(scores64))
