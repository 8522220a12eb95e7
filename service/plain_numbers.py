"""Plain decimal numbers from text, for options that arrive as strings (KServe parameters,
command-line lists).

Python's ``float()`` and ``int()`` accept more than a user means: ``"1_0"`` is 10, Arabic-
Indic ``"١"`` is 1, ``"nan"``/``"inf"`` pass ``float()``. These accept ASCII decimals only:
an optional sign, digits with an optional fraction, an optional exponent (floats).
"""

from __future__ import annotations

import re

_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"[+-]?[0-9]+")


def parse_decimal(text: str) -> float:
    """``text`` (surrounding spaces allowed) as a float; ValueError unless a plain decimal."""
    stripped = text.strip(" \t")
    if not _DECIMAL.fullmatch(stripped):
        raise ValueError(f"{text!r} is not a plain decimal number")
    return float(stripped)


def parse_integer(text: str) -> int:
    """``text`` (surrounding spaces allowed) as an int; ValueError unless plain ASCII digits."""
    stripped = text.strip(" \t")
    if not _INTEGER.fullmatch(stripped):
        raise ValueError(f"{text!r} is not a plain integer")
    return int(stripped)
