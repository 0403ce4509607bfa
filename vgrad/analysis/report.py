"""One self-contained HTML page for a sweep (or a single run): the command that made
it, a table of its runs, the sweep figures over the axes that vary, and each run's
figures. Figures are written beside the page (PNG for the page, PDF for papers) and
referenced by relative paths, so the folder opens in any browser from disk.

    python scripts/report.py outputs/sweeps/DATE/TIME     # -> .../report/index.html
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from vgrad.analysis import figures
from vgrad.analysis.tables import Sweep, load_sweep

#: Per-run figures are drawn for at most this many runs (the table lists them all).
MAX_RUN_FIGURES = 12


def summary_table(runs: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """One row per run: its swept axes, status, seeds, diverged seeds and final metrics
    (mean ± sd over seeds)."""
    columns = [figures.axis_column(runs, a) for a in axes]
    rows = []
    for name, group in runs.groupby("run", sort=False):
        row = {"run": name, **{a: group[c].iloc[0] for a, c in zip(axes, columns, strict=True)},
               "status": group["status"].iloc[0], "seeds": len(group),
               "diverged": int(group["diverged"].sum())}
        for metric in ("final_train_acc", "final_test_acc", "final_train_loss"):
            values = group[metric].dropna()
            row[metric.replace("final_", "")] = (
                "—" if values.empty else f"{values.mean():.3f} ± {values.std(ddof=0):.3f}")
        rows.append(row)
    return pd.DataFrame(rows)


def _img(path: Path, root: Path, caption: str) -> str:
    rel = path.relative_to(root).as_posix()
    return (f'<figure><a href="{rel}"><img src="{rel}" alt="{html.escape(caption)}"></a>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def write_report(sweep_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``out/index.html`` (default ``<sweep>/report/``); return its path."""
    sweep: Sweep = load_sweep(sweep_dir)
    root = Path(out) if out is not None else Path(sweep_dir) / "report"
    figdir = root / "figures"
    runs = sweep.runs
    if runs.empty:
        raise ValueError(f"no ended run under {sweep_dir}")
    axes = figures.varying_axes(runs)
    parts: list[str] = []

    # Sweep figures over the axes that vary.
    sweep_figs: list[tuple[str, object]] = []
    if axes:
        hue = axes[0]
        sweep_figs += [(f"Gradient profile across layers by {hue}", figures.profile(sweep, hue)),
                       (f"Final accuracy by {hue}", figures.bars(sweep, hue)),
                       (f"Training loss by {hue}", figures.curves(sweep, hue, "train_loss"))]
        if len(axes) > 1:
            sweep_figs.append((f"{figures.default_metric(sweep)} over {axes[0]} × {axes[1]}",
                               figures.heatmap(sweep, axes[0], axes[1])))
    for i, (caption, fig) in enumerate(sweep_figs):
        if fig is not None:
            png = figures.save(fig, figdir / f"sweep_{i}")[0]
            parts.append(_img(png, root, caption))

    # Per-run figures.
    run_sections = []
    for run in [r for r in sweep.runs_list if r.status != "failed"][:MAX_RUN_FIGURES]:
        imgs, notes = [], []
        for kind, make in figures.RUN_FIGURES.items():
            fig = make(run)
            if fig is None:
                notes.append(kind)
                continue
            safe = run.name.replace("/", "_")
            png = figures.save(fig, figdir / f"run_{safe}_{kind}")[0]
            imgs.append(_img(png, root, f"{run.name}: {kind.replace('_', ' ')}"))
        note = (f"<p class=note>Not recorded in this run: {', '.join(notes)}.</p>"
                if notes else "")
        run_sections.append(f"<h3>Run {html.escape(run.name)}</h3>{note}{''.join(imgs)}")

    runs_csv = root / "runs.csv"
    runs.to_csv(runs_csv, index=False)
    table = summary_table(runs, axes).to_html(index=False, border=0, na_rep="—")
    command = sweep.command()
    skipped = "".join(f"<li>{html.escape(str(p))}: {html.escape(w)}</li>"
                      for p, w in sweep.skipped)
    statuses = runs.drop_duplicates("run")["status"].value_counts().to_dict()
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
<p>{sum(statuses.values())} run(s): {html.escape(str(statuses))};
swept axes: {html.escape(", ".join(axes) or "none")}.
All runs, one row per seed: <a href="runs.csv">runs.csv</a>.</p>
{f"<p>Skipped (did not end):</p><ul>{skipped}</ul>" if skipped else ""}
<h2>Runs</h2>
{table}
<h2>Sweep</h2>
{"".join(parts) or "<p class=note>One run: no sweep figures.</p>"}
<h2>Runs in detail</h2>
{"".join(run_sections)}
</body></html>
"""
    root.mkdir(parents=True, exist_ok=True)
    index = root / "index.html"
    index.write_text(page)
    return index
