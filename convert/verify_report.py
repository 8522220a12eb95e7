"""The report of ``--verify``: one row per comparison, the limit's origin, honest footnotes.

Each row compares one net (the main model or an à-trous variant) on one image with one
reference. The footnote of a padded net names only the checks that really ran: the torch
path compares the whole map with the converted torch module, the ONNX path has no such
module and checks exactness at the window size only.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

from convert.verify_limits import Tolerance

Pair = tuple[int, int]
WHOLE_WINDOW = "classifier, whole window"
CROPS = "crops"
TORCH_MODULE = "converted torch module"
NATIVE_MAP = "native map, every k-th cell"
WIDTH = 90


@dataclass(frozen=True)
class VerifyRow:
    size: Pair
    cells: Pair
    against: str
    max_diff: float
    limit: float | None  # None: a difference that is expected (padding), not checked
    net: str = ""  # "" for the main model, else the variant's file name
    head: str = ""  # the output compared (models with several heads)

    @property
    def ok(self) -> bool:
        return self.limit is None or self.max_diff <= self.limit

    @property
    def verdict(self) -> str:
        if self.limit is None:
            return "expected (padding)"
        return "ok" if self.ok else "FAIL"


@dataclass(frozen=True)
class VerifyReport:
    rows: tuple[VerifyRow, ...]
    padded: bool
    dtype: str
    tolerance: Tolerance | None = None
    window: Pair = (0, 0)
    head_tolerances: tuple[tuple[str, Tolerance], ...] = ()  # several heads: each one's

    @property
    def passed(self) -> bool:
        return all(row.ok for row in self.rows)

    @property
    def max_checked_diff(self) -> float:
        return max((row.max_diff for row in self.rows if row.limit is not None), default=0.0)

    def table(self) -> str:
        width = max((len(row.head) for row in self.rows), default=0)
        head = f"{'head':<{width}}  " if width else ""
        lines = [
            f"verify ({self.dtype}): dense model vs window-by-window classifier",
            f"  {'image':>9}  {'cells':>5}  {head}{'compared with':<28}  {'max|diff|':>9}  "
            f"{'limit':>7}  result",
        ]
        net = None
        for row in self.rows:
            if row.net != net and row.net:
                lines.append(f"  {row.net} (a-trous variant):")
            net = row.net
            size, cells = f"{row.size[0]}x{row.size[1]}", f"{row.cells[0]}x{row.cells[1]}"
            limit = "-" if row.limit is None else f"{row.limit:.1e}"
            head = f"{row.head:<{width}}  " if width else ""
            lines.append(
                f"  {size:>9}  {cells:>5}  {head}{row.against:<28}  {row.max_diff:>9.2e}  "
                f"{limit:>7}  {row.verdict}"
            )
        if self.head_tolerances:
            notes = [f"{name}: {t.describe(self.window)}" for name, t in self.head_tolerances]
        else:
            notes = [] if self.tolerance is None else [self.tolerance.describe(self.window)]
        for note in (*notes, *self.footnote()):
            lines += textwrap.wrap(note, WIDTH, initial_indent="  ", subsequent_indent="  ")
        lines.append("  PASSED" if self.passed else "  FAILED: differences past the limit")
        return "\n".join(lines)

    def footnote(self) -> list[str]:
        """What the padded-net rows mean, naming only the checks that ran (paragraphs)."""
        if not self.padded:
            return []
        kinds = {row.against.split(" (")[0] for row in self.rows if row.limit is not None}
        checked = []
        if TORCH_MODULE in kinds:
            checked.append("against the converted torch module")
        if WHOLE_WINDOW in kinds:
            checked.append("on windows of exactly R (both see the same zeros)")
        if NATIVE_MAP in kinds:
            checked.append("for each variant against the native map on their shared cells")
        notes = [
            "padded net: each crop sees zero padding at its border where the dense pass sees "
            "real neighbours (VGG paper sec. 3.2), so crop differences are expected; exactness "
            "is checked " + _join(checked) + "."
        ]
        if TORCH_MODULE not in kinds:
            notes.append(
                "The map past R is compared with nothing exact: an ONNX classifier has no "
                "converted torch module to compare it with (convert from torch to check it)."
            )
        return notes


def _join(parts: list[str]) -> str:
    if len(parts) < 2:
        return "".join(parts) or "nowhere"
    return ", ".join(parts[:-1]) + " and " + parts[-1]
