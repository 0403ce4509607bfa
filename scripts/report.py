#!/usr/bin/env python
"""Write one HTML page for a sweep: its command, runs table, sweep and run figures.

    python scripts/report.py SWEEP [--out DIR] [--jobs N]   # default DIR: SWEEP/report

The page (DIR/index.html) references its figures by relative paths and opens in any
browser with no server. A symbolic link where the report writes (SWEEP/report itself,
DIR/figures, DIR/index.html, DIR/runs.csv) is refused, and an output folder that cannot
be written is named, each in one line; Ctrl-C (or SIGTERM) stops the report and the
processes drawing its figures, with one line and exit status 130 (143).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path


class Terminated(BaseException):
    """SIGTERM, raised where the report is so that it ends its workers as on Ctrl-C."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a sweep folder (or a single run folder)")
    parser.add_argument("--out", type=Path, help="output folder (default: SWEEP/report)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="processes drawing the run figures (default: one per core)")
    args = parser.parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        return report(parser, args)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{parser.prog}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def report(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from vgrad.analysis.report import cannot_write, write_report

    if not args.sweep.is_dir():
        parser.error(f"{args.sweep}: no such folder")
    try:
        index = write_report(args.sweep, args.out, args.jobs)
    except ValueError as exc:  # no readable run; a symbolic link refused
        parser.error(str(exc))
    except OSError as exc:
        print(cannot_write(parser.prog, exc, args.out or args.sweep / "report"),
              file=sys.stderr)
        return 1
    print(index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
