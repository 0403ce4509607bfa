#!/usr/bin/env python
"""Draw a sweep's figures over its axes.

    python scripts/plot_sweep.py SWEEP --x act [--y depth] [--hue act] [--metric final_test_acc]

--x: the axis of the bar chart (final accuracy per value) and, without --hue, of the
     gradient profile and loss curves; --y: with --x, a heatmap of --metric over both;
     --hue: the axis of the profile and loss curves (default --x). Axes are config keys:
     act, init, depth, width, bn, optim.lr, ... Recurrent runs also get the time profile
     (||dL/dh_t|| against t). Writes PNG and PDF to SWEEP/figures/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vgrad.analysis import figures, load_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a folder holding run folders")
    parser.add_argument("--x", required=True, help="sweep axis for bars (e.g. act)")
    parser.add_argument("--y", help="second axis: draws a heatmap of --metric over x and y")
    parser.add_argument("--hue", help="axis of the profile and curves (default: --x)")
    parser.add_argument("--metric", help="final metric of the heatmap (default: test accuracy "
                        "when there is a test set, else train accuracy)")
    parser.add_argument("--out", type=Path, help="output folder (default: SWEEP/figures)")
    args = parser.parse_args(argv)
    if not args.sweep.is_dir():
        parser.error(f"{args.sweep}: no such folder")
    sweep = load_sweep(args.sweep)
    if sweep.runs.empty:
        parser.error(f"{args.sweep}: no run the analysis can read")
    out = args.out or args.sweep / "figures"
    hue = args.hue or args.x
    try:
        made = {f"profile_{hue}": figures.profile(sweep, hue),
                f"bars_{args.x}": figures.bars(sweep, args.x),
                f"curves_{hue}": figures.curves(sweep, hue),
                f"time_{hue}": figures.time_profile(sweep, hue)}  # recurrent runs only
        if args.y:
            made[f"heatmap_{args.x}_{args.y}"] = figures.heatmap(sweep, args.x, args.y,
                                                                 args.metric)
    except KeyError as exc:
        parser.error(str(exc.args[0]))
    for name, fig in made.items():
        if fig is not None:
            for path in figures.save(fig, out / name):
                print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
