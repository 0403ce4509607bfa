"""One self-contained HTML page for a sweep (or a single run): the commands that wrote
into its folder and its status counts (short, on top), the sweep figures over the axes
that vary and the sweep tables that apply (``SWEEP_TABLES``; each also written as
``NAME.csv`` beside ``runs.csv``), the runs table (folded for long sweeps; a click on a
column header sorts it) and the figures of each run, or of representative runs of a long
sweep (``runs``).
Figures are written beside the page as PNG and referenced by relative, URL-encoded
paths, so the folder opens in any browser from disk, offline, whatever the run folders
are called (``vgrad-plot-run`` and ``vgrad-plot-sweep`` also write PDF).

    vgrad-report outputs/sweeps/DATE/TIME     # -> .../report/index.html

A sweep whose runs all diverged still gets its page: the table says where each seed
diverged and the figures draw what was finite before.

Every file is written whole (a temporary file, then a rename) and never through a
symbolic link: a link planted at ``report/``, ``report/figures/``, ``index.html``,
``runs.csv``, a sweep table's CSV or a figure's name is refused
(:class:`vgrad.store.LinkRefused`) before anything is drawn. The processes drawing run
figures end with the report's process, however it ends (Ctrl-C, SIGTERM, ``kill -9``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import multiprocessing
import os
import shlex
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from vgrad import store
from vgrad.analysis import figures, width_figures
from vgrad.analysis.tables import Run, Sweep, axis_column, load_sweep, sweep_commands

#: A sweep of at most this many runs gets every run's figures by default; a longer one,
#: those of representative runs (``representative_runs``).
MAX_RUN_FIGURES = 12
#: The runs table is folded (``<details>``) from this many runs on.
FOLD_TABLE = 20


@dataclasses.dataclass(frozen=True)
class SweepTable:
    """A table of a whole sweep: shown on the page under the sweep's figures, and
    written beside ``runs.csv`` as ``NAME.csv`` (every column, full precision)."""

    #: ``applies(sweep)``: whether the table says something about this sweep.
    applies: Callable[[Sweep], bool]
    #: ``table(sweep)``: its rows (empty: nothing to show).
    table: Callable[[Sweep], pd.DataFrame]
    #: What the table holds, on the page.
    caption: str


#: The sweep tables, in the order the page shows them: name -> SweepTable.
SWEEP_TABLES: dict[str, SweepTable] = {
    "finite_width": SweepTable(
        width_figures.applies, width_figures.finite_width_table,
        "Finite-width fluctuations at initialisation, per (width, depth) cell: r = "
        "ln(‖δ_first‖²/‖δ_output‖²) over the seeds with no dead layer (variance with its "
        "standard error, mean, median) beside the exact and the leading-order predictions "
        "(vgrad.theory.relu_log_ratio, relu_log_ratio_leading); the ratio's median and "
        "mean over every seed, the mean's expectation and the standard error a mean of "
        "that many seeds has; seeds with a dead layer, found and expected"),
}


def summary_table(runs: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """One row per run: its swept axes, status, seeds, diverged seeds (and the steps
    where they diverged) and final metrics (median and interquartile range over seeds)."""
    columns = [axis_column(runs, a) for a in axes]
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


def run_figures(run: Run, stem: Path, varying: Sequence[str] = ()
                ) -> tuple[list[tuple[str, Path]], list[str]]:
    """Draw and save (PNG) one run's figures as ``stem_KIND.png``; return the figures
    written, by kind, and notes on those the run did not record (``figures.unrecorded``).
    """
    written, missing = [], []
    for kind, make in figures.RUN_FIGURES.items():
        fig = make(run, varying=list(varying))  # titled by the sweep's varying axes
        if fig is None:
            note = figures.unrecorded(run, kind)
            if note:
                missing.append(note)
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


def _draw_runs(runs: list[Run], figdir: Path, jobs: int,
               numbers: list[int] | None = None) -> list:
    """``run_figures`` of every run (see ``_drawing_runs``), waited for."""
    with _drawing_runs(runs, figdir, jobs, numbers) as results:
        return results()


@contextlib.contextmanager
def _drawing_runs(runs: list[Run], figdir: Path, jobs: int,
                  numbers: list[int] | None = None, varying: Sequence[str] = ()
                  ) -> Iterator[Callable[[], list]]:
    """Start drawing ``run_figures`` of every run, in files named by number (``numbers``,
    default the position in ``runs``: run folders may be named anything), in ``jobs``
    processes; yield a function that waits for the results. Drawing and rasterising
    figures is matplotlib's single-threaded work and a report's runs are independent,
    so the workers draw while the caller draws the sweep's figures. The workers end
    with this process; on an exception in the ``with`` block (KeyboardInterrupt
    included) they are ended at once and the exception goes on. The function draws
    itself the runs that no worker has started yet; with one job (or one run), all of
    them."""
    numbers = list(range(len(runs))) if numbers is None else numbers
    stems = [figdir / f"run_{n:03d}" for n in numbers]
    if jobs <= 1 or len(runs) <= 1:
        yield lambda: [run_figures(r, s, varying) for r, s in zip(runs, stems, strict=True)]
        return
    # spawn, not fork: the caller may hold threads (JAX's, in a sweep's process).
    pool = ProcessPoolExecutor(min(jobs, len(runs)),
                               mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(os.getpid(),))
    try:
        light = [dataclasses.replace(r, _metrics=None) for r in runs]  # workers read files
        with _sigint_ignored():  # workers are started by the first submissions
            futures = [pool.submit(run_figures, r, s, tuple(varying))
                       for r, s in zip(light, stems, strict=True)]

        def results() -> list:
            # This process, done with its own figures, takes the runs no worker has
            # started, from the last one back, while the workers go on from the first.
            mine = {}
            for i in reversed(range(len(futures))):
                if futures[i].cancel():
                    mine[i] = run_figures(runs[i], stems[i], varying)
            return [mine[i] if i in mine else f.result() for i, f in enumerate(futures)]

        yield results
    except BaseException:
        _end_workers(pool)
        raise
    pool.shutdown()


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


def representative_runs(runs: pd.DataFrame, axes: list[str], names: list[str]) -> list[str]:
    """Runs among ``names`` (in their order) that show every value of every swept axis at
    least once: greedily the run showing most values not shown yet, the earlier one on a
    tie (a full grid of a x b values takes max(a, b) runs; the first run is always
    chosen)."""
    if not names:
        return []
    first = runs.drop_duplicates("run").set_index("run")
    columns = [axis_column(runs, a) for a in axes]
    values = [{(c, str(first.at[n, c])) for c in columns} for n in names]
    missing = set().union(*values)
    chosen = {0}
    missing -= values[0]
    while missing:
        best = max(range(len(names)), key=lambda i: (len(values[i] & missing), -i))
        chosen.add(best)
        missing -= values[best]
    return [names[i] for i in sorted(chosen)]


def _chosen_runs(sweep: Sweep, runs: pd.DataFrame, axes: list[str],
                 which: str | list[str]) -> list[Run]:
    """The runs whose figures the page draws (see ``write_report``)."""
    drawable = [r for r in sweep.runs_list if r.status != "failed"]
    if not isinstance(which, str):
        wanted = list(dict.fromkeys(which))
        known = {r.name for r in sweep.runs_list}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ValueError(f"no run named {', '.join(map(repr, unknown))} in "
                             f"{sweep.root}")
        return [r for r in drawable if r.name in set(wanted)]
    if which == "all" or (which == "representative" and len(drawable) <= MAX_RUN_FIGURES):
        return drawable
    if which != "representative":
        raise ValueError(f"runs={which!r}: use 'representative', 'all' or a list of run "
                         "names")
    names = set(representative_runs(runs, axes, [r.name for r in drawable]))
    return [r for r in drawable if r.name in names]


#: Sorts a table on a click on a column header (numbers as numbers, blanks last); no
#: external resource, so the page works from disk, offline.
_SORT_JS = """<script>
for (const th of document.querySelectorAll("table.sortable th")) {
  th.addEventListener("click", () => {
    const body = th.closest("table").tBodies[0], i = th.cellIndex;
    const up = th.dataset.order !== "up";
    for (const other of th.parentNode.cells) delete other.dataset.order;
    th.dataset.order = up ? "up" : "down";
    const key = row => {
      const text = row.cells[i].textContent.trim(), n = parseFloat(text);
      return isNaN(n) ? [1, text] : [0, n];
    };
    const rows = Array.from(body.rows).sort((a, b) => {
      const [p, x] = key(a), [q, y] = key(b);
      const d = p - q || (p ? x.localeCompare(y, undefined, {numeric: true}) : x - y);
      return up ? d : -d;
    });
    body.append(...rows);
  });
}
</script>"""


def _table_html(table: pd.DataFrame, anchors: dict[str, str]) -> str:
    """The runs table as HTML, sortable by a click on a header; a run with figures on the
    page links to them."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    rows = []
    for record in table.itertuples(index=False):
        cells = []
        for column, value in zip(table.columns, record, strict=True):
            text = "—" if value is None or (isinstance(value, float) and value != value) \
                else html.escape(str(value))
            if column == "run" and str(value) in anchors:
                text = f'<a href="#{anchors[str(value)]}">{text}</a>'
            cells.append(f"<td>{text}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<table class="sortable"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _sweep_table_html(name: str, entry: SweepTable, table: pd.DataFrame) -> str:
    """A sweep table on the page: numbers to 4 significant digits, a link to its CSV."""
    shown = table.map(lambda v: f"{v:.4g}" if isinstance(v, float) else v)
    link = quote(f"{name}.csv")
    return (f"<figure>{_table_html(shown, {})}<figcaption>{html.escape(entry.caption)} "
            f'(<a href="{html.escape(link)}">{html.escape(name)}.csv</a>)</figcaption>'
            "</figure>")


def _commands_html(commands: list[str]) -> str:
    if not commands:
        return ("<p>Command: <code>(a single run: see .hydra/overrides.yaml)</code></p>")
    if len(commands) == 1:
        return f"<p>Command: <code>{html.escape(commands[0])}</code></p>"
    items = "".join(f"<li><code>{html.escape(c)}</code></li>" for c in commands)
    return (f"<p>{len(commands)} commands wrote into this folder (oldest first):</p>"
            f"<ol>{items}</ol>")


def write_report(sweep_dir: str | Path, out: str | Path | None = None,
                 jobs: int | None = None, runs: str | list[str] = "representative") -> Path:
    """Write ``out/index.html`` (default ``<sweep>/report/``); return its path.

    The page leads with the sweep's figures, then the runs table, then run figures for
    ``runs``: ``"representative"`` (the default) draws every run of a sweep of up to
    ``MAX_RUN_FIGURES`` runs and, for a longer one, runs that show every value of every
    swept axis at least once (``representative_runs``: max(a, b) runs for a grid of
    a x b values); ``"all"`` draws every run; a list of run names (as in the table's
    ``run`` column) draws those. The page says which runs have figures and how to get
    the others. Run figures are drawn by ``jobs`` processes (default: one per core).
    Raises ValueError when the folder holds no run the analysis can read or ``runs``
    names a run it does not hold, :class:`vgrad.store.LinkRefused` (a ValueError) when a
    symbolic link stands where the report writes, and OSError when the output cannot be
    written (all before anything is drawn)."""
    sweep: Sweep = load_sweep(sweep_dir)
    root = Path(out) if out is not None else Path(sweep_dir) / "report"
    figdir = root / "figures"
    table_runs = sweep.runs
    if table_runs.empty:
        raise ValueError(f"no run under {sweep_dir} that the analysis can read")
    axes = figures.varying_axes(table_runs)
    shown = _chosen_runs(sweep, table_runs, axes, runs)
    # Links and unwritable folders are refused before anything is drawn: a folder the
    # user named may be a link, the default report/ and figures/ (vgrad's) may not.
    _refuse_links(root, own=out is None,
                  names=("index.html", "runs.csv", *(f"{n}.csv" for n in SWEEP_TABLES)))
    _refuse_links(figdir, own=True, names=("sweep_*.png", "run_*.png"))
    _writable(root)
    _writable(figdir)
    ended = table_runs[table_runs["status"] != "failed"]
    parts: list[str] = []
    if not ended.empty and ended["diverged"].all():
        parts.append("<p class=note><b>Every seed of every run diverged.</b> The table "
                     "gives the step at which each diverged; the figures show what was "
                     "finite before.</p>")

    # Run figures (in files named by the run's position in the sweep: run folders may be
    # named anything, and a run keeps its files whichever runs are drawn) are drawn by
    # worker processes while this one draws the sweep's figures.
    position = {r.name: n for n, r in enumerate(sweep.runs_list)}
    with _drawing_runs(shown, figdir, jobs if jobs is not None else os.cpu_count() or 1,
                       [position[r.name] for r in shown], axes) as results:
        # Sweep figures over the axes that vary, those of figures.SWEEP_FIGURES that
        # apply, one at a time (PNG only: the page needs nothing more).
        for i, (_, caption, fig) in enumerate(figures.sweep_figures(sweep, axes)):
            png = figures.save(fig, figdir / f"sweep_{i}", formats=("png",))[0]
            parts.append(_img(png, root, caption))
        # Sweep tables under the figures, each also written as NAME.csv.
        for name, entry in SWEEP_TABLES.items():
            table = entry.table(sweep) if entry.applies(sweep) else pd.DataFrame()
            if not table.empty:
                store.write_text(root / f"{name}.csv", table.to_csv(index=False))
                parts.append(_sweep_table_html(name, entry, table))
        drawn = results()
    run_sections, anchors = [], {}
    # What no run shown recorded is said once, above the runs; each run names the rest.
    common = [n for n in (drawn[0][1] if drawn else [])
              if all(n in notes for _, notes in drawn)]
    where = "any run shown" if len(drawn) > 1 else "this run"
    unrecorded = (f"<p class=note>Not recorded in {where}: "
                  f"{html.escape(', '.join(common))}.</p>" if common else "")
    for run, (written, notes) in zip(shown, drawn, strict=True):
        anchors[run.name] = f"run-{position[run.name]}"
        label = figures.run_label(run, axes, math=False) if axes else run.name
        imgs = [_img(png, root, f"{label}: {kind.replace('_', ' ')}")
                for kind, png in written]
        own = [n for n in notes if n not in common]
        note = (f"<p class=note>Not recorded in this run: {html.escape(', '.join(own))}.</p>"
                if own else "")
        named = f": {html.escape(label)}" if axes else ""
        run_sections.append(f'<section id="{anchors[run.name]}"><h3>Run '
                            f"{html.escape(run.name)} ({html.escape(run.status)}){named}</h3>"
                            f"{note}{''.join(imgs)}</section>")

    store.write_text(root / "runs.csv", table_runs.to_csv(index=False))
    table = summary_table(table_runs, axes)
    table_html = _table_html(table, anchors)
    n_runs = len(table)
    if n_runs >= FOLD_TABLE:
        table_html = (f"<details><summary>{n_runs} runs (click to unfold; click a column "
                      f"header to sort)</summary>{table_html}</details>")
    skipped = "".join(f"<li>{html.escape(str(p))}: {html.escape(w)}</li>"
                      for p, w in sweep.skipped)
    if skipped:
        skipped = (f"<details{' open' if len(sweep.skipped) <= 5 else ''}><summary>"
                   f"{len(sweep.skipped)} run folder(s) skipped (unreadable or not ended)"
                   f"</summary><ul>{skipped}</ul></details>")
    drawable = sum(r.status != "failed" for r in sweep.runs_list)
    if len(shown) == drawable:
        which = "Every run that trained has its figures here."
    else:
        which = (f"Figures of {len(shown)} of the {drawable} runs that trained"
                 + (", chosen so that every value of every swept axis appears at least "
                    "once" if runs == "representative" else "")
                 + " (linked from the table). The others: <code>vgrad-report "
                 f"{html.escape(shlex.quote(str(sweep_dir)))} --runs all</code> (or "
                 "<code>--runs NAME,NAME</code>), or <code>vgrad-plot-run RUN</code> for one "
                 "run.")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>vgrad report: {html.escape(str(sweep_dir))}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 96vw; margin: 1em auto; color: #222; }}
p, h1, h2, h3 {{ max-width: 110ch; }}
code, pre {{ background: #f4f4f4; padding: .2em .4em; }}
table {{ border-collapse: collapse; font-size: .9em; }}
th, td {{ padding: .25em .7em; text-align: left; border-bottom: 1px solid #ddd; }}
table.sortable th {{ cursor: pointer; }}
th[data-order=up]::after {{ content: " ▲"; }} th[data-order=down]::after {{ content: " ▼"; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
figcaption, .note, summary {{ color: #555; font-size: .9em; }}
</style></head><body>
<h1>vgrad report</h1>
<p>Folder: <code>{html.escape(str(Path(sweep_dir).resolve()))}</code></p>
{_commands_html(sweep_commands(sweep.root))}
<p>{table_runs["run"].nunique()} run(s): {html.escape(_status_text(table_runs))};
swept axes: {html.escape(", ".join(axes) or "none")}.
<a href="#runs">Runs table</a>; all runs, one row per seed: <a href="runs.csv">runs.csv</a>.</p>
{skipped}
<h2>Sweep</h2>
{"".join(parts) or "<p class=note>One run: no sweep figures.</p>"}
<h2 id="runs">Runs</h2>
<p class=note>Final metrics: median [interquartile range] over seeds.</p>
{table_html}
<h2>Runs in detail</h2>
<p class=note>{which}</p>
{unrecorded}
{"".join(run_sections)}
{_SORT_JS}
</body></html>
"""
    index = root / "index.html"
    store.write_text(index, page)
    return index
