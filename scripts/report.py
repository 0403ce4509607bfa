#!/usr/bin/env python
"""Write one HTML page for a sweep: its command, runs table, sweep and run figures.

    python scripts/report.py SWEEP [--out DIR] [--jobs N]   # default DIR: SWEEP/report

The page (DIR/index.html) references its figures by relative paths and opens in any
browser with no server.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vgrad.analysis import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a sweep folder (or a single run folder)")
    parser.add_argument("--out", type=Path, help="output folder (default: SWEEP/report)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="processes drawing the run figures (default: one per core)")
    args = parser.parse_args(argv)
    if not args.sweep.is_dir():
        parser.error(f"{args.sweep}: no such folder")
    try:
        index = write_report(args.sweep, args.out, args.jobs)
    except ValueError as exc:
        parser.error(str(exc))
    print(index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
