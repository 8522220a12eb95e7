"""``densemap`` --help texts: one wording per shared flag, defaults shown, README agrees."""

from __future__ import annotations

import argparse
import re

import pytest

from densemap.service.cli import main
from tests.support.paths import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


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


# Options that have no default value: required, off unless given, or read from the input.
NO_DEFAULT = {
    "convert": {"--arch", "--weights", "--output", "--labels", "--preprocessing"},
    "score": {"--out", "--glob", "--server", "--heatmap-class"},
    "serve": set(),
    "health": {"--server-name"},
}


@pytest.mark.parametrize("command", sorted(NO_DEFAULT))
def test_every_option_with_a_default_shows_it(command):
    from densemap.service.cli import build_parser

    parser = build_parser()._subparsers._group_actions[0].choices[command]
    formatter = parser._get_formatter()
    missing = []
    for action in parser._actions:
        flag = action.option_strings[-1] if action.option_strings else None
        if flag in (None, "--help", "--debug") or action.nargs == 0:  # positionals, switches
            continue
        if action.help == argparse.SUPPRESS:  # deprecated spellings, not in --help
            continue
        if flag not in NO_DEFAULT[command] and "default" not in formatter._expand_help(action):
            missing.append(flag)
    assert not missing, f"densemap {command} --help shows no default for {missing}"


def test_version_top_level_help_and_debug_on_either_side(capsys):
    from densemap.service import __version__
    from densemap.service.cli import DESCRIPTION, build_parser

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"densemap {__version__}\n"
    top = help_text(capsys)
    assert " ".join(DESCRIPTION.split()) in top and "module" not in top
    parse = build_parser().parse_args
    assert parse(["--debug", "score", "x", "--out", "o"]).debug is True
    assert parse(["score", "x", "--out", "o", "--debug"]).debug is True
    assert parse(["serve", "--debug"]).debug is True
    assert parse(["score", "x", "--out", "o"]).debug is False


def test_the_memory_budget_has_one_spelling_and_unit(capsys, monkeypatch):
    from densemap.service.cli import build_parser
    from densemap.service.serve_cli import build_config

    score, serve = help_text(capsys, "score"), help_text(capsys, "serve")
    for text in (score, serve):
        assert "--memory-budget SIZE" in text and "bytes, or 512M, 2G" in text
        assert "memory-budget-mb" not in text
    args = build_parser().parse_args(["serve", "--memory-budget", "512M"])
    assert build_config(args).engine.memory_budget == 512 << 20
    # one description of what the budget covers, the engine's (pass_budget.py)
    covers = "memory one request may use (its maps and copies, plus one pass's activations"
    assert covers in score and covers in serve
    assert "activation memory per pass" not in score + serve


@pytest.mark.parametrize(
    "argv, typo",
    [
        (["score", "page.png", "--out", "maps", "--top-kk", "3"], "--top-kk 3"),
        (["serve", "--prot", "1"], "--prot 1"),
        (["render", "out", "--heatmap-colour", "7"], "--heatmap-colour 7"),
        (["health", "--bogus"], "--bogus"),
        (["convert", "m.onnx", "-o", "d.onnx", "--strides=8", "--verfy"], "--verfy"),
    ],
)
def test_a_mistyped_flag_shows_its_subcommands_usage(capsys, argv, typo):
    """The error comes from the subcommand's parser: its usage, not the list of commands."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    command = argv[0]
    assert err.startswith(f"usage: densemap {command} "), err
    assert err.rstrip().endswith(f"densemap {command}: error: unrecognized arguments: {typo}")
