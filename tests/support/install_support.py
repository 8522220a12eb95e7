"""Fresh venvs that install offline: they see this environment's installed copies of exactly
the distributions a project requires (symlinked, nothing downloaded), and nothing else."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable
from pathlib import Path

from packaging.requirements import Requirement


def required_distributions(requirements: Iterable[str], extras: Iterable[str] = ()) -> set[str]:
    """Names of the distributions ``requirements`` need with ``extras``, transitively (the
    dependencies' own extras left out unless a requirement names them)."""
    todo = [(text, tuple(extras)) for text in requirements]
    found: set[str] = set()
    while todo:
        text, active = todo.pop()
        requirement = Requirement(text)
        if requirement.marker and not any(
            requirement.marker.evaluate({"extra": extra}) for extra in (*active, "")
        ):
            continue
        name = requirement.name.lower().replace("_", "-")
        if name in found and not requirement.extras:
            continue
        found.add(name)
        wanted = tuple(requirement.extras)
        todo.extend((r, wanted) for r in importlib.metadata.distribution(name).requires or [])
    return found


def link_distributions(names: set[str], target: Path) -> None:
    """Symlink every top-level entry the named installed distributions own into ``target``."""
    target.mkdir()
    for name in names:
        dist = importlib.metadata.distribution(name)
        for entry in {f.parts[0] for f in dist.files or () if f.parts[0] != ".."}:
            source = Path(dist.locate_file(entry))
            if source.exists() and not (target / entry).exists():
                (target / entry).symlink_to(source)
