"""One self-contained HTML page for a sweep (or a single run): the command that made
it, a table of its runs, the sweep figures over the axes that vary, and each run's
figures. Figures are written beside the page as PNG and referenced by relative,
URL-encoded paths, so the folder opens in any browser from disk, whatever the run
folders are called (``scripts/plot_run.py`` and ``plot_sweep.py`` also write PDF).

    python scripts/report.py outputs/sweeps/DATE/TIME     # -> .../report/index.html

A sweep whose runs all diverged still gets its page: the table says where each seed
diverged and the figures draw what was finite before.

Every file is written whole (a temporary file, then a rename) and never through a
symbolic link: a link planted at ``report/``, ``report/figures/``, ``index.html``,
``runs.csv`` or a figure's name is refused (:class:`vgrad.store.LinkRefused`) before
anything is drawn. The processes drawing run figures end with the report's process,
however it ends (Ctrl-C, SIGTERM, ``kill -9``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import multiprocessing
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from vgrad import store
from vgrad.analysis import figures, theory_figures
from vgrad.analysis.tables import Run, Sweep, load_sweep

#: Per-run figures are drawn for at most this many runs (the table lists them all).
MAX_RUN_FIGURES = 12


def summary_table(runs: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """One row per run: its swept axes, status, seeds, diverged seeds (and the steps
    where they diverged) and final metrics (median and interquartile range over seeds)."""
    columns = [figures.axis_column(runs, a) for a in axes]
    rows = []
    for name, group in runs.groupby("run", sort=False):
        steps = sorted(int(s) for s in group["diverged_at_step"].dropna())
        row = {"run": name, **{a: group[c].iloc[0] for a, c in zip(axes, columns, strict=True)},
               "status": group["status"].iloc[0], "seeds": len(group),
               "diverged": f"{len(steps)} (step {', '.join(map(str, steps))})" if steps
               else "0"}
        for metric in ("final_train_acc", "final_test_acc", "final_train_loss"):
            values = group[metric].dropna()
            if values.empty:
                row[metric.replace("final_", "")] = "—"
            elif len(values) == 1:
                row[metric.replace("final_", "")] = f"{values.iloc[0]:.3g}"
            else:
                q = values.quantile([0.25, 0.5, 0.75])
                row[metric.replace("final_", "")] = (f"{q[0.5]:.3g} "
                                                     f"[{q[0.25]:.3g}, {q[0.75]:.3g}]")
        rows.append(row)
    return pd.DataFrame(rows)


def _img(path: Path, root: Path, caption: str) -> str:
    rel = quote(path.relative_to(root).as_posix())
    return (f'<figure><a href="{html.escape(rel)}"><img src="{html.escape(rel)}" '
            f'alt="{html.escape(caption)}"></a><figcaption>{html.escape(caption)}'
            "</figcaption></figure>")


def _status_text(runs: pd.DataFrame) -> str:
    counts = runs.drop_duplicates("run")["status"].value_counts()
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def run_figures(run: Run, stem: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """Draw and save (PNG) one run's figures as ``stem_KIND.png``; return the figures
    written, by kind, and the kinds the run did not record."""
    written, missing = [], []
    for kind, make in figures.RUN_FIGURES.items():
        fig = make(run)
        if fig is None:
            missing.append(kind)
            continue
        png = figures.save(fig, stem.parent / f"{stem.name}_{kind}", formats=("png",))[0]
        written.append((kind, png))
    return written, missing


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(1)
        if os.getppid() != parent:  # the report's process ended (even by kill -9)
            os._exit(1)


def _worker_init(parent: int) -> None:
    """Set up a process drawing run figures: Ctrl-C is the report's process's to handle
    (a terminal sends SIGINT to every process of the group), and the worker ends within
    a second of the process that started it, however that one ended."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent,), name="vgrad-watch-parent",
                     daemon=True).start()


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while workers are started, so that they inherit SIG_IGN and a
    Ctrl-C while they import (before ``_worker_init`` runs) prints no traceback from
    each of them. Only the main thread can set signal handlers; elsewhere, a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _end_workers(pool: ProcessPoolExecutor) -> None:
    """Stop a pool now: cancel what has not started, end what has."""
    workers = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    for worker in workers:
        worker.join(timeout=5)
        if worker.is_alive():
            worker.kill()


def _draw_runs(runs: list[Run], figdir: Path, jobs: int) -> list:
    """``run_figures`` of every run, in files named by position (run folders may be named
    anything), drawn by ``jobs`` processes: drawing and rasterising figures is
    matplotlib's single-threaded work, and a report's runs are independent. The workers
    end with this process; on an exception here (KeyboardInterrupt included) they are
    ended at once and the exception goes on."""
    stems = [figdir / f"run_{n:03d}" for n in range(len(runs))]
    if jobs <= 1 or len(runs) <= 1:
        return [run_figures(r, s) for r, s in zip(runs, stems, strict=True)]
    # spawn, not fork: the caller may hold threads (JAX's, in a sweep's process).
    pool = ProcessPoolExecutor(min(jobs, len(runs)),
                               mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(os.getpid(),))
    try:
        light = [dataclasses.replace(r, _metrics=None) for r in runs]  # workers read files
        with _sigint_ignored():  # workers are started by the first submissions
            results = pool.map(run_figures, light, stems)
        drawn = list(results)
    except BaseException:
        _end_workers(pool)
        raise
    pool.shutdown()
    return drawn


def _writable(folder: Path) -> None:
    """Create ``folder`` and check that a file can be made in it (an OSError naming the
    folder otherwise), before anything is drawn."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".vgrad-probe.", suffix=".tmp")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(folder)) from exc
    os.close(fd)
    os.unlink(probe)


def output_folder(folder: Path, own: bool, names: tuple[str, ...] = (),
                  create: bool = True) -> Path:
    """Make ``folder`` ready for vgrad's files ``names`` (glob patterns allowed): refuse
    a symbolic link at any of them, and at ``folder`` itself when it is vgrad's own (a
    default such as ``SWEEP/report``, not one the user named), then (with ``create``)
    create the folder and check that it can be written. Raises
    :class:`vgrad.store.LinkRefused` or an OSError naming the folder, before anything
    is written."""
    folder = _refuse_links(Path(folder), own, names)
    if create:
        _writable(folder)
    return folder


def _refuse_links(folder: Path, own: bool, names: tuple[str, ...]) -> Path:
    if own:
        store.refuse_link(folder)
    if folder.is_dir():
        store.refuse_links(folder, names)
    return folder


def cannot_write(prog: str, exc: OSError, folder: Path | None = None) -> str:
    """The one line a script prints when its output could not be written."""
    where = Path(exc.filename) if exc.filename else folder
    if where is not None and where.name.startswith(".") and where.name.endswith(".tmp"):
        where = where.parent  # a temporary file of store.atomic_write: name its folder
    reason = exc.strerror or str(exc)
    return (f"{prog}: error: cannot write {where if where is not None else 'the output'} "
            f"({reason}); choose another folder with --out DIR")


def write_report(sweep_dir: str | Path, out: str | Path | None = None,
                 jobs: int | None = None) -> Path:
    """Write ``out/index.html`` (default ``<sweep>/report/``); return its path. Run
    figures are drawn by ``jobs`` processes (default: one per core). Raises ValueError
    when the folder holds no run the analysis can read, :class:`vgrad.store.LinkRefused`
    (a ValueError) when a symbolic link stands where the report writes, and OSError
    when the output cannot be written (both before anything is drawn)."""
    sweep: Sweep = load_sweep(sweep_dir)
    root = Path(out) if out is not None else Path(sweep_dir) / "report"
    figdir = root / "figures"
    runs = sweep.runs
    if runs.empty:
        raise ValueError(f"no run under {sweep_dir} that the analysis can read")
    # Links and unwritable folders are refused before anything is drawn: a folder the
    # user named may be a link, the default report/ and figures/ (vgrad's) may not.
    _refuse_links(root, own=out is None, names=("index.html", "runs.csv"))
    _refuse_links(figdir, own=True, names=("sweep_*.png", "run_*.png"))
    _writable(root)
    _writable(figdir)
    ended = runs[runs["status"] != "failed"]
    axes = figures.varying_axes(runs)
    parts: list[str] = []
    if not ended.empty and ended["diverged"].all():
        parts.append("<p class=note><b>Every seed of every run diverged.</b> The table "
                     "gives the step at which each diverged; the figures show what was "
                     "finite before.</p>")

    # Sweep figures over the axes that vary (PNG only: the page needs nothing more).
    sweep_figs: list[tuple[str, object]] = []
    if axes and not ended.empty:
        hue = axes[0]
        sweep_figs += [(f"Gradient profile across layers by {hue}", figures.profile(sweep, hue)),
                       (f"Gradient through time by {hue}", figures.time_profile(sweep, hue)),
                       (f"Final accuracy by {hue}", figures.bars(sweep, hue)),
                       (f"Training loss by {hue}", figures.curves(sweep, hue, "train_loss"))]
        if len(axes) > 1:
            sweep_figs.append((f"{figures.default_metric(sweep)} over {axes[0]} × {axes[1]}",
                               figures.heatmap(sweep, axes[0], axes[1])))
        # Signal-propagation theory beside the measurements, where it applies.
        sweep_figs += [
            ("Trainability phase diagram with the 6 ξ_c curve of mean-field theory",
             theory_figures.phase_diagram(sweep)),
            ("Correlation and δ across layers at initialisation: measured vs theory",
             theory_figures.signal_theory(sweep)),
            ("Dynamical isometry: Jacobian singular values against depth",
             theory_figures.isometry(sweep))]
    for i, (caption, fig) in enumerate(sweep_figs):
        if fig is not None:
            png = figures.save(fig, figdir / f"sweep_{i}", formats=("png",))[0]
            parts.append(_img(png, root, caption))

    # Per-run figures.
    run_sections = []
    drawable = [r for r in sweep.runs_list if r.status != "failed"]
    shown = drawable[:MAX_RUN_FIGURES]
    drawn = _draw_runs(shown, figdir, jobs if jobs is not None else os.cpu_count() or 1)
    for run, (written, notes) in zip(shown, drawn, strict=True):
        imgs = [_img(png, root, f"{run.name}: {kind.replace('_', ' ')}")
                for kind, png in written]
        note = (f"<p class=note>Not recorded in this run: {', '.join(notes)}.</p>"
                if notes else "")
        run_sections.append(f"<h3>Run {html.escape(run.name)} "
                            f"({html.escape(run.status)})</h3>{note}{''.join(imgs)}")

    store.write_text(root / "runs.csv", runs.to_csv(index=False))
    table = summary_table(runs, axes).to_html(index=False, border=0, na_rep="—")
    command = sweep.command()
    skipped = "".join(f"<li>{html.escape(str(p))}: {html.escape(w)}</li>"
                      for p, w in sweep.skipped)
    more = len(drawable) - len(shown)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>vgrad report: {html.escape(str(sweep_dir))}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
code, pre {{ background: #f4f4f4; padding: .2em .4em; }}
table {{ border-collapse: collapse; font-size: .9em; }}
th, td {{ padding: .25em .7em; text-align: left; border-bottom: 1px solid #ddd; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
figcaption, .note {{ color: #555; font-size: .9em; }}
</style></head><body>
<h1>vgrad report</h1>
<p>Folder: <code>{html.escape(str(Path(sweep_dir).resolve()))}</code></p>
<p>Command: <code>{html.escape(command or "(a single run: see .hydra/overrides.yaml)")}</code></p>
<p>{runs["run"].nunique()} run(s): {html.escape(_status_text(runs))};
swept axes: {html.escape(", ".join(axes) or "none")}.
All runs, one row per seed: <a href="runs.csv">runs.csv</a>.</p>
{f"<p>Skipped (unreadable or not ended):</p><ul>{skipped}</ul>" if skipped else ""}
<h2>Runs</h2>
<p class=note>Final metrics: median [interquartile range] over seeds.</p>
{table}
<h2>Sweep</h2>
{"".join(parts) or "<p class=note>One run: no sweep figures.</p>"}
<h2>Runs in detail</h2>
{"".join(run_sections)}
{f"<p class=note>{more} more run(s) not drawn here: scripts/plot_run.py RUN.</p>" if more > 0
 else ""}
</body></html>
"""
    index = root / "index.html"
    store.write_text(index, page)
    return index
