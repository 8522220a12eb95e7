"""From a raw map to what the caller asked for: softmax, class subset, top-k, argmax, dtype.

Rules (documented in docs/engine.md):

- ``probabilities``: softmax over the class axis (axis 0 of [C, n_h, n_w]) of a logits
  model; a model whose ``output_kind`` is ``probabilities`` is returned as it is.
- ``classes``: the returned map keeps these channels, in this order; per-cell top-k and
  argmax then rank only these classes, and report their ORIGINAL class indices.
- image scores: the mean over cells of the class probabilities (softmax even when logits
  are returned), computed in float64 and averaged over scales; image top-k ranks the
  selected classes, clipped to their number.
- ``heads``: the extra heads returned (:mod:`service.engine.heads`), each its own map of
  the model's values in the map dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.engine.heads import HeadInfo, select_heads
from service.engine.options import ScoreOptions
from service.errors import InvalidImage, InvalidOption, ModelLoadError

DTYPES = {"float32": np.float32, "float16": np.float16}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16"}  # the server's and CLI's spellings


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
    first; none for a one-output model); raise InvalidOption naming the fix."""
    # a softmax (probabilities) or per-class sigmoids (sigmoid) already ends the model
    gives_probabilities = output_kind in ("probabilities", "sigmoid")
    if not options.probabilities and gives_probabilities:
        raise InvalidOption(
            f"this model outputs probabilities ({output_kind}: the model ends in it), so logits cannot be "
            "returned: ask for probabilities=True"
        )
    dtype = (
        DTYPE_ALIASES.get(options.dtype, options.dtype) if isinstance(options.dtype, str) else None
    )
    if dtype not in DTYPES:
        raise InvalidOption(
            f"dtype must be one of {(*DTYPES, *DTYPE_ALIASES)}, got {options.dtype!r}"
        )
    for name in ("probabilities", "argmax", "include_map"):
        value = getattr(options, name)
        if not isinstance(value, (bool, np.bool_)):
            raise InvalidOption(f"{name} must be True or False, got {value!r}")
    classes = options.classes
    if classes is not None:
        classes = tuple(classes)
        if not classes:
            raise InvalidOption("classes is empty: give at least one class index, or None")
        bad = [c for c in classes if not isinstance(c, (int, np.integer)) or isinstance(c, bool)]
        bad += [c for c in classes if c not in bad and not 0 <= c < num_classes]
        if bad:
            raise InvalidOption(
                f"classes {bad} are not class indices of this model (0..{num_classes - 1})"
            )
        if len(set(classes)) != len(classes):
            raise InvalidOption(f"classes holds duplicates: {classes}")
        classes = tuple(int(c) for c in classes)
    selectable = num_classes if classes is None else len(classes)
    for name in ("top_k", "image_top_k"):
        value = getattr(options, name)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise InvalidOption(f"{name} must be an int >= 0, got {value!r}")
    if options.top_k > selectable:
        raise InvalidOption(
            f"top_k={options.top_k} but only {selectable} classes can be ranked: "
            f"ask for at most {selectable}"
        )
    return OutputPlan(
        probabilities=bool(options.probabilities),
        model_gives_probabilities=gives_probabilities,
        dtype=DTYPES[dtype],
        classes=classes,
        top_k=int(options.top_k),
        image_top_k=min(int(options.image_top_k), selectable),
        argmax=bool(options.argmax),
        include_map=bool(options.include_map),
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
