"""Sources and docs cite only files that ship with the repository (no private notes)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.support.paths import REPO_ROOT

SCANNED = ("service", "convert", "models", "tests", "protos", "docs", "deploy")
SUFFIXES = {".py", ".md", ".proto", ".toml", ".yaml", ".txt", ""}
OUTSIDE = re.compile(r"\bNOTES\b|(?<![/\w])shared/")  # not /shared/in, a path in examples


def test_no_file_cites_notes_outside_the_repository():
    files = [REPO_ROOT / name for name in ("README.md", "pyproject.toml", "setup.py", "Makefile")]
    for folder in SCANNED:
        files += [
            p for p in (REPO_ROOT / folder).rglob("*") if p.is_file() and p.suffix in SUFFIXES
        ]
    assert len(files) > 100  # the walk found the sources
    hits = [
        f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}"
        for path in files
        if path != Path(__file__).resolve() and "_proto" not in path.parts
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not hits, "references to files users do not have:\n" + "\n".join(hits)
