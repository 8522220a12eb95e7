"""The ``densemap`` command: one entry point, one module per subcommand.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and must
stay light to import (no torch, no ray at module level), so ``densemap --help`` and
``densemap serve`` work on a serving-only install.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading

from densemap.service import __version__
from densemap.service.errors import DensemapError

DESCRIPTION = (
    "Dense CNN scoring: convert a window classifier into a fully-convolutional ONNX model, "
    "serve its exact score maps over gRPC, and score image files and folders."
)
INTERRUPTED = 130  # exit status after Ctrl-C, as shells report SIGINT
EPILOG = "Run 'densemap COMMAND --help' for the options of a command (with their defaults)."
DEBUG_HELP = "show tracebacks and debug logs (before or after the command)"

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert": (
        "densemap.convert.cli",
        "convert a classifier into a dense (fully-convolutional) ONNX model",
    ),
    "serve": ("densemap.service.serve_cli", "serve a model repository over gRPC"),
    "score": (
        "densemap.service.score_cli",
        "score image files and folders into maps and heat-maps",
    ),
    "render": ("densemap.service.render_cli", "redraw heat-maps from a score run's saved maps"),
    "health": ("densemap.service.health_cli", "ask a server's health service (exec probes, TLS)"),
}


class HelpFormatter(argparse.HelpFormatter):
    """Appends each option's default to its help, unless the help states it already or the
    option has none (an off switch, an unset value)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if (
            "default" in text
            or not action.option_strings
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or default == []
        ):
            return text
        return f"{text} (default: {default})"


class SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser reports arguments it does not know itself, with its own usage
    (``densemap score: error: unrecognized arguments: --top-kk``), instead of leaving them
    to the top-level parser, whose usage lists only the subcommands."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="densemap", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"densemap {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=SubcommandParser
    )
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)  # light: extras load in run()
        sp = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=HelpFormatter
        )
        module.add_arguments(sp)
        # SUPPRESS: given here it sets args.debug; absent, the top-level value stays.
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    previous = signal.getsignal(signal.SIGINT)
    _stop_at_second_interrupt(args.command)
    try:
        return int(args._run(args) or 0)
    except DensemapError as exc:
        if args.debug:
            raise
        print(f"densemap {args.command}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)  # 2: usage; 1: a run that could not finish
    except KeyboardInterrupt:
        print(f"densemap {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    finally:
        if threading.current_thread() is threading.main_thread() and previous is not None:
            signal.signal(signal.SIGINT, previous)  # a host application's handler back


def _stop_at_second_interrupt(command: str) -> None:
    """The first Ctrl-C raises KeyboardInterrupt, as Python's own handler does, so the
    command stops cleanly (outputs written whole, the summary closed); a second one during
    that cleanup exits at once with 130. Python's handler would raise it again wherever the
    main thread is, a weakref callback or a ``finally`` block, and print a traceback.
    Left alone where SIGINT is ignored or handled by someone else (``serve`` installs its
    own, and so may a host application calling :func:`main`)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return
    interrupted = False

    def handle(signum, frame) -> None:
        nonlocal interrupted
        if not interrupted:
            interrupted = True
            raise KeyboardInterrupt
        os.write(2, f"densemap {command}: interrupted\n".encode())
        os._exit(INTERRUPTED)

    signal.signal(signal.SIGINT, handle)


def entry() -> None:
    """The ``densemap`` command: :func:`main`, then exit.

    After Ctrl-C (twice, or during shutdown) worker threads may still be inside an
    onnxruntime run; finalising the interpreter under them makes onnxruntime's C++
    destructors abort the process ("terminate called without an active exception",
    SIGABRT). Everything worth keeping is already written by then (outputs are renamed into
    place whole, the summary is closed in ``finally`` blocks), so an interrupted command
    exits at once with 130.
    """
    code = main()
    if code == INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
