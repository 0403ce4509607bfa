#!/usr/bin/env python
"""Draw one run's figures (gradients, weights, learning speed, histograms, saturation).

    python scripts/plot_run.py outputs/runs/DATE/TIME [--out DIR]

Writes PNG and PDF files to DIR (default: RUN/figures/). Figures whose statistics the
run did not record are skipped with a note. A symbolic link where a figure is written
(or at RUN/figures itself) is refused, and a folder that cannot be written is named,
each in one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder (holding summary.json)")
    parser.add_argument("--out", type=Path, help="output folder (default: RUN/figures)")
    args = parser.parse_args(argv)
    try:
        return plot(parser, args)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def plot(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from vgrad import store
    from vgrad.analysis import figures, load_run
    from vgrad.analysis.report import cannot_write, output_folder

    if not (args.run / "summary.json").is_file():
        parser.error(f"{args.run}: not a run folder (no summary.json)")
    try:
        run = load_run(args.run)
    except ValueError as exc:
        parser.error(str(exc))
    if run.status in ("failed", "running"):
        parser.error(f"{args.run}: status {run.status!r}, nothing to plot")
    if run.status == "interrupted":
        print(f"{args.run}: interrupted after {run.summary.get('epochs_done')} epoch(s); "
              "plotting what it trained")
    out = args.out or args.run / "figures"
    try:  # links and an unwritable folder refused before anything is drawn
        output_folder(out, own=args.out is None,
                      names=tuple(f"{kind}.{ext}" for kind in figures.RUN_FIGURES
                                  for ext in ("png", "pdf")))
        for kind, make in figures.RUN_FIGURES.items():
            fig = make(run)
            if fig is None:
                print(f"{kind}: not recorded in this run, skipped")
                continue
            for path in figures.save(fig, out / kind):
                print(path)
    except store.LinkRefused as exc:
        parser.error(str(exc))
    except OSError as exc:
        print(cannot_write(parser.prog, exc, out), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
