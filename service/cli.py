"""The ``densemap`` command: one entry point, one module per subcommand.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and must
stay light to import (no torch, no ray at module level), so ``densemap --help`` and
``densemap serve`` work on a serving-only install.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from service.errors import DensemapError

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert": (
        "convert.cli",
        "convert a classifier into a dense (fully-convolutional) ONNX model",
    ),
    "serve": ("service.serve_cli", "serve a model repository over gRPC"),
    "score": ("service.score_cli", "score image files and folders into maps and heat-maps"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densemap", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a subcommand not built yet, or an extra missing
            if not exc.name or not module_name.startswith(exc.name):
                raise
            continue
        sp = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sp)
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args._run(args) or 0)
    except DensemapError as exc:
        if args.debug:
            raise
        print(f"densemap {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"densemap {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
