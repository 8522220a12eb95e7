"""The report of ``--verify``: one row per comparison, the limit's origin, honest footnotes.

Each row compares one net (the main model or an à-trous variant) on one image with one
reference, named in the row: the head on the trunk's windows (exact), crops (exact for
unpadded nets; information only on padded ones), the classifier on whole windows of R, the
native map's shared cells (variants), the converted torch module. The footnotes say where
the classifier was cut and name only the checks that really ran; a padded net whose map
past R could be compared with nothing exact is reported as not verified, never as passed.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

from densemap.convert.verify_limits import Tolerance

Pair = tuple[int, int]
WHOLE_WINDOW = "classifier, whole window"
HEAD_ON_TRUNK = "head on trunk windows"
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
    limit: float | None  # None: information (crops of a padded net), not checked
    net: str = ""  # "" for the main model, else the variant's file name
    head: str = ""  # the output compared (models with several heads)

    @property
    def ok(self) -> bool:
        return self.limit is None or self.max_diff <= self.limit

    @property
    def verdict(self) -> str:
        if self.limit is None:
            return "info (padding)"
        return "ok" if self.ok else "FAIL"


@dataclass(frozen=True)
class VerifyReport:
    rows: tuple[VerifyRow, ...]
    padded: bool
    dtype: str
    tolerance: Tolerance | None = None
    window: Pair = (0, 0)
    head_tolerances: tuple[tuple[str, Tolerance], ...] = ()  # several heads: each one's
    exact_unavailable: str = ""  # why the head on the trunk's windows could not be computed
    cut: str = ""  # where the classifier was cut (its head's input), for the footnote

    @property
    def unverified(self) -> bool:
        """A padded net whose map past R was compared with nothing exact."""
        return self.padded and not any(
            row.against.startswith(HEAD_ON_TRUNK) for row in self.rows if not row.net
        )

    @property
    def passed(self) -> bool:
        return all(row.ok for row in self.rows) and not self.unverified

    @property
    def max_checked_diff(self) -> float:
        return max((row.max_diff for row in self.rows if row.limit is not None), default=0.0)

    def table(self) -> str:
        width = max((len(row.head) for row in self.rows), default=0)
        head = f"{'head':<{width}}  " if width else ""
        lines = [
            f"verify ({self.dtype}): dense model vs the classifier it came from",
            f"  {'image':>9}  {'cells':>5}  {head}{'compared with':<35}  {'max|diff|':>9}  "
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
                f"  {size:>9}  {cells:>5}  {head}{row.against:<35}  {row.max_diff:>9.2e}  "
                f"{limit:>7}  {row.verdict}"
            )
        if self.head_tolerances:
            notes = [f"{name}: {t.describe(self.window)}" for name, t in self.head_tolerances]
        else:
            notes = [] if self.tolerance is None else [self.tolerance.describe(self.window)]
        for note in (*notes, *self.footnote()):
            lines += textwrap.wrap(note, WIDTH, initial_indent="  ", subsequent_indent="  ")
        if self.passed:
            lines.append("  PASSED")
        elif self.unverified and all(row.ok for row in self.rows):
            lines.append("  NOT VERIFIED: nothing exact to compare the padded map with")
        else:
            lines.append("  FAILED: differences past the limit")
        return "\n".join(lines)

    def footnote(self) -> list[str]:
        """What the rows mean, naming only the checks that ran (paragraphs)."""
        kinds = {row.against.split(" (")[0] for row in self.rows if row.limit is not None}
        notes = []
        if HEAD_ON_TRUNK in kinds:
            notes.append(
                f"{HEAD_ON_TRUNK}: the classifier cut where its head starts ({self.cut}); its "
                "head run on each window of its trunk's output over the whole image: exact "
                "for every net, zero padding included."
            )
        elif self.exact_unavailable:
            notes.append(f"no {HEAD_ON_TRUNK}: {self.exact_unavailable}.")
        if self.padded:
            notes.append(
                "padded net: each crop sees zero padding at its border where the dense pass "
                "sees real neighbours (VGG paper sec. 3.2), so crop rows are information only."
            )
            others = []
            if TORCH_MODULE in kinds:
                others.append("against the converted torch module")
            if NATIVE_MAP in kinds:
                others.append("for each variant against the native map on their shared cells")
            if others:
                notes.append("Also checked " + _join(others) + ".")
            if self.unverified:
                notes.append(
                    "The map past R was compared with nothing exact (the converted torch "
                    "module shares the converter's rewrite): the check was not possible. "
                    "Convert without --verify to keep the model unverified."
                )
        elif CROPS in kinds and HEAD_ON_TRUNK not in kinds:
            notes.append("Unpadded net: crops are exact and are the check.")
        return notes


def _join(parts: list[str]) -> str:
    if len(parts) < 2:
        return "".join(parts) or "nowhere"
    return ", ".join(parts[:-1]) + " and " + parts[-1]
