#!/usr/bin/env python
"""Draw a sweep's figures over its axes.

    python scripts/plot_sweep.py SWEEP --x act [--y depth] [--hue act] [--metric final_test_acc]

--x: the axis of the bar chart (final accuracy per value) and, without --hue, of the
     gradient profile and loss curves; --y: with --x, a heatmap of --metric over both;
     --hue: the axis of the profile and loss curves (default --x). Axes are config keys:
     act, init, depth, width, bn, optim.lr, ... Recurrent runs also get the time profile
     (||dL/dh_t|| against t). Writes PNG and PDF to SWEEP/figures/ (or --out DIR). A
     symbolic link where a figure is written (or at SWEEP/figures itself) is refused, and
     a folder that cannot be written is named, each in one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    try:
        return plot(parser, args)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def plot(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from vgrad import store
    from vgrad.analysis import figures, load_sweep
    from vgrad.analysis.report import cannot_write, output_folder

    if not args.sweep.is_dir():
        parser.error(f"{args.sweep}: no such folder")
    sweep = load_sweep(args.sweep)
    if sweep.runs.empty:
        parser.error(f"{args.sweep}: no run the analysis can read")
    out = args.out or args.sweep / "figures"
    hue = args.hue or args.x
    names = [f"profile_{hue}", f"bars_{args.x}", f"curves_{hue}", f"time_{hue}"]
    if args.y:
        names.append(f"heatmap_{args.x}_{args.y}")
    files = tuple(f"{n}.{ext}" for n in names for ext in ("png", "pdf"))
    try:
        # Links refused before anything is drawn; the folder made once the axes are known.
        output_folder(out, own=args.out is None, names=files, create=False)
        made = {f"profile_{hue}": lambda: figures.profile(sweep, hue),
                f"bars_{args.x}": lambda: figures.bars(sweep, args.x),
                f"curves_{hue}": lambda: figures.curves(sweep, hue),
                f"time_{hue}": lambda: figures.time_profile(sweep, hue)}  # recurrent only
        if args.y:
            made[f"heatmap_{args.x}_{args.y}"] = lambda: figures.heatmap(
                sweep, args.x, args.y, args.metric)
        try:
            drawn = {name: make() for name, make in made.items()}
        except KeyError as exc:
            parser.error(str(exc.args[0]))
        output_folder(out, own=args.out is None, names=files)
        for name, fig in drawn.items():
            if fig is not None:
                for path in figures.save(fig, out / name):
                    print(path)
    except store.LinkRefused as exc:
        parser.error(str(exc))
    except OSError as exc:
        print(cannot_write(parser.prog, exc, out), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
