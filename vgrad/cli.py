"""vgrad's console commands, installed with the package (``[project.scripts]``):

    vgrad-train [KEY=VALUE ...]                   python -m vgrad.train (a run; -m: a sweep)
    vgrad-report SWEEP [--out DIR] [--jobs N]     one HTML page: SWEEP/report/index.html
    vgrad-plot-run RUN [--out DIR]                a run's figures: RUN/figures/*.png, *.pdf
    vgrad-plot-sweep SWEEP --x AXIS [--y AXIS] [--hue AXIS] [--metric M] [--out DIR]

Each is a thin command line over :mod:`vgrad.analysis` (``scripts/*.py`` in the
repository call the same functions; ``python -m vgrad.cli report ARGS`` runs
``vgrad-report ARGS`` where the install's scripts folder is not on PATH). Errors are one
line and exit with status 2 (bad input: no such folder, no readable run, a symbolic link
where a file would be written) or 1 (an output folder that cannot be written, named in
the line); Ctrl-C ends a command with one line and status 130, SIGTERM with status
143. Heavy imports wait until the arguments are parsed, so that ``--help`` is
immediate.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import NoReturn

#: The console commands (pyproject.toml), for the lines that tell a user what to run next.
TRAIN = "vgrad-train"
REPORT = "vgrad-report"
PLOT_RUN = "vgrad-plot-run"
PLOT_SWEEP = "vgrad-plot-sweep"

REPORT_HELP = f"""\
Write one HTML page for a sweep: its command, runs table, sweep and run figures.

example: {REPORT} outputs/sweeps/DATE/TIME       # -> .../report/index.html

The page (DIR/index.html, default DIR: SWEEP/report) references its figures by relative
paths and opens in any browser with no server. A symbolic link where the report writes
(SWEEP/report itself, DIR/figures, DIR/index.html, DIR/runs.csv) is refused, and an
output folder that cannot be written is named, each in one line; Ctrl-C (or SIGTERM)
stops the report and the processes drawing its figures, with one line and exit status
130 (143).
"""

PLOT_RUN_HELP = f"""\
Draw one run's figures (gradients, weights, learning speed, histograms, saturation).

example: {PLOT_RUN} outputs/runs/DATE/TIME       # -> .../figures/*.png, *.pdf

Writes PNG and PDF files to DIR (default: RUN/figures/). Figures whose statistics the
run did not record are skipped with a note. A symbolic link where a figure is written
(or at RUN/figures itself) is refused, and a folder that cannot be written is named,
each in one line.
"""

PLOT_SWEEP_HELP = f"""\
Draw a sweep's figures over its axes.

example: {PLOT_SWEEP} outputs/sweeps/DATE/TIME --x act --y depth

--x: the axis of the bar chart (final accuracy per value) and, without --hue, of the
     gradient profile and loss curves; --y: with --x, a heatmap of --metric over both;
     --hue: the axis of the profile and loss curves (default --x). Axes are config keys:
     act, init, depth, width, bn, optim.lr, ... Recurrent runs also get the time profile
     (||dL/dh_t|| against t). Writes PNG and PDF to SWEEP/figures/ (or --out DIR). A
     symbolic link where a figure is written (or at SWEEP/figures itself) is refused, and
     a folder that cannot be written is named, each in one line.
"""


class Terminated(BaseException):
    """SIGTERM, raised where the command is so that the report ends its workers as on
    Ctrl-C."""


def _dropped_here(frame: FrameType | None) -> bool:
    """Whether an exception raised in ``frame`` would be printed and dropped by Python
    rather than reach the command: inside a garbage-collector callback (JAX registers
    one) or a ``__del__``, anywhere up the stack."""
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _raise_on(signum: int, frame: FrameType | None) -> None:
    """SIGINT raises KeyboardInterrupt, SIGTERM :class:`Terminated`, where the command
    is. Where Python would drop the exception (``_dropped_here``: CI saw a Ctrl-C land
    in JAX's garbage-collector callback and the report finish with status 0), the
    signal is sent again to the main thread 50 ms later, out of that callback (a real
    signal, which also wakes a wait)."""
    if _dropped_here(frame):
        threading.Timer(0.05, signal.pthread_kill,
                        args=(threading.main_thread().ident, signum)).start()
        return
    if signum == signal.SIGTERM:
        raise Terminated
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """While active (in the main thread), SIGINT and SIGTERM raise where the command is
    (``_raise_on``); the previous handlers are back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_on) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _interruptible(command: Callable[[argparse.ArgumentParser, argparse.Namespace], int],
                   parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``command``'s exit status; Ctrl-C ends it with one line and status 130, SIGTERM
    with status 143."""
    try:
        with _signals_raise():
            return command(parser, args)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{parser.prog}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM


def _fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """Bad input found after parsing: one line (argparse's ``error`` prints the usage
    first), exit status 2."""
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _writing(parser: argparse.ArgumentParser, out: Path, draw: Callable[[], None]) -> int:
    """Run ``draw``, which writes figures into ``out``; the exit status. A symbolic link
    where a figure would be written is bad input (one line, status 2); a folder that
    cannot be written is named (one line, status 1)."""
    from vgrad import store
    from vgrad.analysis.report import cannot_write

    try:
        draw()
    except store.LinkRefused as exc:
        _fail(parser, str(exc))
    except OSError as exc:
        print(cannot_write(parser.prog, exc, out), file=sys.stderr)
        return 1
    return 0


def _parser(text: str, prog: str | None) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of ``text`` and whose epilog is
    the rest; its prog (the name its lines start with) defaults to the command's name,
    ``vgrad-report`` (or ``report.py``)."""
    first, _, rest = text.strip().partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=" ".join(first.split()),
                                   epilog=rest or None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


# ---------------------------------------------------------------- vgrad-report


def report_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``vgrad-report``: the exit status (see the module's doc)."""
    parser = _parser(REPORT_HELP, prog)
    parser.add_argument("sweep", type=Path, metavar="SWEEP",
                        help="a sweep folder (or a single run folder)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="output folder (default: SWEEP/report)")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="processes drawing the run figures (default: one per core)")
    parser.add_argument("--runs", default="representative", metavar="WHICH",
                        help="runs whose figures the page shows: 'representative' (the "
                             "default: every run of a short sweep, else runs showing every "
                             "value of every swept axis), 'all', or run names as in the "
                             "table's run column, comma-separated")
    return _interruptible(_report, parser, parser.parse_args(argv))


def _report(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from vgrad.analysis.report import cannot_write, write_report

    if not args.sweep.is_dir():
        _fail(parser, f"{args.sweep}: no such folder")
    try:
        runs = (args.runs if args.runs in ("representative", "all")
                else [name for name in args.runs.split(",") if name])
        index = write_report(args.sweep, args.out, args.jobs, runs=runs)
    except ValueError as exc:  # no readable run; a symbolic link refused
        _fail(parser, str(exc))
    except OSError as exc:
        print(cannot_write(parser.prog, exc, args.out or args.sweep / "report"),
              file=sys.stderr)
        return 1
    print(index)
    return 0


# ---------------------------------------------------------------- vgrad-plot-run


def plot_run_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``vgrad-plot-run``: the exit status (see the module's doc)."""
    parser = _parser(PLOT_RUN_HELP, prog)
    parser.add_argument("run", type=Path, metavar="RUN", help="a run folder (holding summary.json)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="output folder (default: RUN/figures)")
    return _interruptible(_plot_run, parser, parser.parse_args(argv))


def _plot_run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from vgrad.analysis import figures, load_run
    from vgrad.analysis.report import output_folder

    if not (args.run / "summary.json").is_file():
        _fail(parser, f"{args.run}: not a run folder (no summary.json)")
    try:
        run = load_run(args.run)
    except ValueError as exc:
        _fail(parser, str(exc))
    if run.status in ("failed", "running"):
        _fail(parser, f"{args.run}: status {run.status!r}, nothing to plot")
    if run.status == "interrupted":
        print(f"{args.run}: interrupted after {run.summary.get('epochs_done')} epoch(s); "
              "plotting what it trained")
    out = args.out or args.run / "figures"

    def draw() -> None:  # links and an unwritable folder refused before anything is drawn
        output_folder(out, own=args.out is None,
                      names=tuple(f"{kind}.{ext}" for kind in figures.RUN_FIGURES
                                  for ext in ("png", "pdf")))
        for kind, make in figures.RUN_FIGURES.items():
            fig = make(run)
            if fig is None:
                note = figures.unrecorded(run, kind)
                if note:
                    print(f"not recorded in this run, skipped: {note}")
                continue
            for path in figures.save(fig, out / kind):
                print(path)

    return _writing(parser, out, draw)


# ---------------------------------------------------------------- vgrad-plot-sweep


def plot_sweep_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``vgrad-plot-sweep``: the exit status (see the module's doc)."""
    parser = _parser(PLOT_SWEEP_HELP, prog)
    parser.add_argument("sweep", type=Path, metavar="SWEEP", help="a folder holding run folders")
    parser.add_argument("--x", required=True, metavar="AXIS", help="sweep axis for bars (e.g. act)")
    parser.add_argument("--y", metavar="AXIS",
                        help="second axis: draws a heatmap of --metric over x and y")
    parser.add_argument("--hue", metavar="AXIS",
                        help="axis of the profile and curves (default: --x)")
    parser.add_argument("--metric", metavar="METRIC",
                        help="final metric of the heatmap (default: test accuracy when there "
                        "is a test set, else train accuracy)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="output folder (default: SWEEP/figures)")
    return _interruptible(_plot_sweep, parser, parser.parse_args(argv))


def _plot_sweep(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from vgrad.analysis import figures, load_sweep
    from vgrad.analysis.report import output_folder

    if not args.sweep.is_dir():
        _fail(parser, f"{args.sweep}: no such folder")
    sweep = load_sweep(args.sweep)
    if sweep.runs.empty:
        _fail(parser, f"{args.sweep}: no run the analysis can read")
    out = args.out or args.sweep / "figures"
    # The registry's figures for these axes (figures.SWEEP_FIGURES, as the report's).
    made = figures.command_figures(sweep, args.x, args.y, args.hue, args.metric)
    files = tuple(f"{n}.{ext}" for n in made for ext in ("png", "pdf"))

    def draw() -> None:
        # Links refused before anything is drawn; the folder made once the axes are known.
        output_folder(out, own=args.out is None, names=files, create=False)
        try:
            drawn = {name: make() for name, make in made.items()}
        except KeyError as exc:
            _fail(parser, str(exc.args[0]))
        output_folder(out, own=args.out is None, names=files)
        for name, fig in drawn.items():
            if fig is not None:
                for path in figures.save(fig, out / name):
                    print(path)

    return _writing(parser, out, draw)


#: ``python -m vgrad.cli COMMAND``: the console commands, where they are not on PATH.
COMMANDS = {"report": (REPORT, report_main), "plot-run": (PLOT_RUN, plot_run_main),
            "plot-sweep": (PLOT_SWEEP, plot_sweep_main)}


def main(argv: list[str] | None = None) -> int:
    """``python -m vgrad.cli report|plot-run|plot-sweep ARGS``: the same as the console
    command ``vgrad-report ARGS`` (...), for an install whose scripts folder is not on
    PATH (``python -m vgrad.train`` is ``vgrad-train``)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        usage = ("usage: python -m vgrad.cli {report,plot-run,plot-sweep} ARGS  "
                 "(the same as vgrad-report, vgrad-plot-run, vgrad-plot-sweep; "
                 "training: python -m vgrad.train)")
        if argv and argv[0] in ("-h", "--help"):
            print(usage)
            return 0
        print(usage, file=sys.stderr)
        print(f"vgrad.cli: error: {'no command' if not argv else f'unknown command {argv[0]!r}'}",
              file=sys.stderr)
        return 2
    prog, command = COMMANDS[argv[0]]
    return command(argv[1:], prog=prog)


if __name__ == "__main__":
    sys.exit(main())
