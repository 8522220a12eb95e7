"""``densemap render OUT_DIR``: redraw heat-map PNGs from a score run's ``.npz`` (no model)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the --out folder of 'densemap score'")
    parser.add_argument(
        "--heatmap-class",
        metavar="NAME",
        help="draw this class (label or index); default: the run's, else the top class",
    )


def run(args: argparse.Namespace) -> int:
    from densemap.service.batch.render import render_run

    outcome = render_run(args.out_dir, heatmap_class=args.heatmap_class)
    print(f"densemap render: drew {outcome.drawn}, failed {outcome.failed} heat-map(s)")
    return 1 if outcome.failed else 0
