"""Checks of single option values, shared by the option and config dataclasses.

:class:`~densemap.service.engine.options.ScoreOptions`, :class:`~densemap.service.engine.options.DetectionOptions`,
:class:`~densemap.service.engine.options.DetectionDefaults` (a model's detection settings) and
:class:`~densemap.service.engine.options.EngineConfig` check themselves when they are built
(``__post_init__``) with these functions, so a bad value is refused once, in the same words,
whether it came from Python, the CLI, densemap.v1 or KServe; front ends only parse. Each
returns the value in its canonical type (numpy ints become ints, lists tuples) or raises
InvalidOption naming the field, what it must be, and what it got. What depends on the model
(a stride it supports, a class index below its class count) is the engine's to check.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from densemap.service.errors import InvalidOption

MAX_SCALES = 16  # image scales of one request
MAX_BOX_OFFSET = 10.0  # |dx1|, |dy1|, |dx2|, |dy2| in window sizes
PRECISIONS = ("fp32", "tf32", "fp16", "int8", "bf16")  # bf16: named only to be refused with why
PRECISION_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16"}
NO_BF16 = (
    "precision 'bf16' is not available: onnxruntime's CPU and CUDA execution providers have "
    "no bfloat16 convolution kernel; use 'fp16' (same tensor cores, its deviation from fp32 "
    "is reported by gpu_check) or 'tf32'"
)


def check_flag(name: str, value) -> bool:
    """True or False (numpy bools too); 1, "yes" and None are refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidOption(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_int(name: str, value, *, minimum: int, maximum: int | None = None) -> int:
    """An int (numpy ints too, never a bool) in minimum..maximum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidOption(f"{name} must be an int, got {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise InvalidOption(f"{name} must be {bound}, got {value}")
    return value


def check_number(name: str, value, low: float, high: float) -> float:
    """A finite real number (not a bool) in [low, high], as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidOption(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidOption(f"{name} must be in [{low:g}, {high:g}], got {value!r}")
    return value


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InvalidOption(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_items(name: str, value, what: str) -> tuple:
    """``value`` as a tuple; a str or a non-sequence is refused (``what``: its items)."""
    if isinstance(value, (str, bytes)):
        raise InvalidOption(f"{name} must be a sequence of {what}, got {value!r}")
    try:
        return tuple(value)
    except TypeError:
        raise InvalidOption(f"{name} must be a sequence of {what}, got {value!r}") from None


def check_scales(value) -> tuple[float, ...]:
    """1..MAX_SCALES finite image scales > 0."""
    items = check_items("scales", value, "numbers")
    if any(isinstance(s, bool) or not isinstance(s, numbers.Real) for s in items):
        raise InvalidOption(f"scales must be a sequence of numbers, got {value!r}")
    if not 1 <= len(items) <= MAX_SCALES:
        raise InvalidOption(f"give between 1 and {MAX_SCALES} scales, got {len(items)}")
    scales = tuple(float(s) for s in items)
    if any(not math.isfinite(s) or s <= 0 for s in scales):
        raise InvalidOption(f"scales must be finite and > 0, got {scales}")
    return scales


def check_indices(name: str, value) -> tuple[int, ...]:
    """A non-empty sequence of distinct class indices >= 0 (the model bounds them)."""
    items = check_items(name, value, "class indices")
    if not items:
        raise InvalidOption(f"{name} is empty: give at least one class index, or None")
    indices = tuple(check_int(f"{name} entries", v, minimum=0) for v in items)
    if len(set(indices)) != len(indices):
        raise InvalidOption(f"{name} holds duplicates: {list(indices)}")
    return indices


def check_names(name: str, value, what: str = "names") -> tuple[str, ...]:
    """A sequence of distinct non-empty names (``()`` allowed)."""
    items = check_items(name, value, what)
    if not all(isinstance(item, str) and item for item in items):
        raise InvalidOption(f"{name} must be a sequence of non-empty {what}, got {value!r}")
    if len(set(items)) != len(items):
        raise InvalidOption(f"{name} holds duplicates: {list(items)}")
    return items


def check_box_offsets(name: str, value) -> tuple[float, float, float, float]:
    """(dx1, dy1, dx2, dy2) in window sizes, |v| <= 10, leaving a box of positive size."""
    items = check_items(name, value, "4 numbers")
    offsets = tuple(check_number(name, v, -MAX_BOX_OFFSET, MAX_BOX_OFFSET) for v in items)
    if len(offsets) != 4 or 1 + offsets[2] - offsets[0] <= 0 or 1 + offsets[3] - offsets[1] <= 0:
        raise InvalidOption(
            f"{name} must be 4 numbers (dx1, dy1, dx2, dy2) in window sizes that leave a box "
            f"of positive size (1 + dx2 - dx1 > 0, 1 + dy2 - dy1 > 0), got {value!r}"
        )
    return offsets


def check_precision(value, name: str = "precision") -> str:
    """The canonical precision name ("float16" -> "fp16"); bf16 is refused with the reason."""
    canonical = PRECISION_ALIASES.get(value, value) if isinstance(value, str) else None
    if canonical not in PRECISIONS:
        raise InvalidOption(f"{name} must be one of {PRECISIONS[:-1]}, got {value!r}")
    if canonical == "bf16":
        raise InvalidOption(NO_BF16)
    return canonical


def check_pairs(name: str, value, *, limit: int) -> tuple[tuple[int, int], ...]:
    """At most ``limit`` (height, width) pairs of positive ints."""
    items = check_items(name, value, "(height, width) pairs")
    if len(items) > limit:
        raise InvalidOption(f"{name} holds {len(items)} shapes, at most {limit} are allowed")
    pairs = []
    for item in items:
        pair = check_items(name, item, "ints")
        if len(pair) != 2:
            raise InvalidOption(f"each of {name} must be (height, width), got {item!r}")
        pairs.append(tuple(check_int(name, v, minimum=1) for v in pair))
    return tuple(pairs)
