"""``densemap`` --help texts: one wording per shared flag, defaults shown, README agrees."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.cli import main

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps: compare words


def test_score_and_serve_state_the_same_default_repository_rule(capsys):
    score, serve = help_text(capsys, "score"), help_text(capsys, "serve")
    rule = "default: $DENSEMAP_MODELS, else the bundled repository, which holds 'digits'"
    assert rule in score and rule in serve
    assert "./models" not in score + serve
    readme = " ".join(README.split())
    assert re.search(r"is `--models DIR`, else `\$DENSEMAP_MODELS`, else the bundled one", readme)
    assert "never the current folder" in readme
