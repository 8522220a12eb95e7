"""From a raw map to what the caller asked for: softmax, class subset, top-k, argmax, dtype.

Rules (documented in docs/engine.md):

- ``probabilities``: softmax over the class axis (axis 0 of [C, n_h, n_w]) of a logits
  model; a model whose ``output_kind`` is ``probabilities`` is returned as it is.
- ``classes``: the returned map keeps these channels, in this order; per-cell top-k and
  argmax then rank only these classes, and report their ORIGINAL class indices.
- image scores: the mean over cells of the class probabilities (softmax even when logits
  are returned), computed in float64 and averaged over scales; image top-k ranks the
  selected classes, clipped to their number.
- ``heads``: the extra heads returned (:mod:`densemap.service.engine.heads`), each its own map of
  the model's values in the map dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from densemap.service.engine.heads import HeadInfo, select_heads
from densemap.service.engine.options import ScoreOptions
from densemap.service.errors import InvalidImage, InvalidOption, ModelLoadError

DTYPES = {"float32": np.float32, "float16": np.float16}  # ScoreOptions.dtype -> numpy


@dataclass(frozen=True)
class OutputPlan:
    """Validated output options for a model with ``num_classes`` classes."""

    probabilities: bool
    model_gives_probabilities: bool
    dtype: type
    classes: tuple[int, ...] | None
    top_k: int
    image_top_k: int
    argmax: bool
    include_map: bool
    heads: tuple[HeadInfo, ...] = ()  # the extra heads returned, in model order


def plan_outputs(
    options: ScoreOptions,
    *,
    num_classes: int,
    output_kind: str,
    heads: tuple[HeadInfo, ...] = (),
) -> OutputPlan:
    """Check the output options against the model (``heads``: all of its heads, primary
    first; none for a one-output model); raise InvalidOption naming the fix. The options
    checked their own values (ScoreOptions); this checks what depends on the model."""
    # a softmax (probabilities) or per-class sigmoids (sigmoid) already ends the model
    gives_probabilities = output_kind in ("probabilities", "sigmoid")
    if not options.probabilities and gives_probabilities:
        raise InvalidOption(
            f"this model outputs probabilities ({output_kind}: the model ends in it), so logits cannot be "
            "returned: ask for probabilities=True"
        )
    classes = options.classes  # distinct indices >= 0 (ScoreOptions checked them)
    if classes is not None and max(classes) >= num_classes:
        bad = [c for c in classes if c >= num_classes]
        raise InvalidOption(
            f"classes {bad} are not class indices of this model (0..{num_classes - 1})"
        )
    selectable = num_classes if classes is None else len(classes)
    if options.top_k > selectable:
        raise InvalidOption(
            f"top_k={options.top_k} but only {selectable} classes can be ranked: "
            f"ask for at most {selectable}"
        )
    return OutputPlan(
        probabilities=options.probabilities,
        model_gives_probabilities=gives_probabilities,
        dtype=DTYPES[options.dtype],
        classes=classes,
        top_k=options.top_k,
        image_top_k=min(options.image_top_k, selectable),
        argmax=options.argmax,
        include_map=options.include_map,
        heads=select_heads(options.heads, heads),
    )


def check_finite(nonfinite: int, *, model: str, from_floats: bool, scale: float) -> None:
    """Refuse a raw map holding NaN/Inf (``nonfinite`` values): the float input overflowed,
    or the model is broken."""
    if not nonfinite:
        return
    if from_floats:
        raise InvalidImage(
            f"the model's output holds NaN or Inf at scale {scale:g}: the float input's "
            "values are too large for float32 arithmetic; send preprocessed values in the "
            "range the model was trained on"
        )
    raise ModelLoadError(
        f"model {model!r} returned NaN or Inf on a valid uint8 image at scale {scale:g}: "
        "its weights or graph are broken; reconvert the model"
    )


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 (the class axis of a [C, n_h, n_w] map), float32."""
    shifted = scores - scores.max(axis=0, keepdims=True)
    exp = np.exp(shifted, dtype=np.float32)
    return exp / exp.sum(axis=0, keepdims=True)


def rank_image_scores(image_scores: np.ndarray, plan: OutputPlan) -> list[tuple[int, float]]:
    """Image top-k (class index, mean probability), best first, among the selected classes."""
    candidates = np.arange(image_scores.shape[0]) if plan.classes is None else plan.classes
    candidates = np.asarray(candidates)
    order = np.argsort(-image_scores[candidates], kind="stable")[: plan.image_top_k]
    return [(int(candidates[i]), float(image_scores[candidates[i]])) for i in order]
