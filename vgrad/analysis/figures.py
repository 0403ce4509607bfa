"""The sources' figures, and more, from run folders (matplotlib).

Per run (a :class:`~vgrad.analysis.tables.Run`):
  ``gradients``   mean and std of each layer's kernel gradient over steps, and the loss
                  (the figure of "Visualizing the vanishing gradient problem"; std on a
                  log axis)
  ``weights``     mean and std of each layer's kernel over epochs (visualize preset)
  ``learning_speed``  ||dC/db_l|| per layer over training (Nielsen's chapter 5)
  ``histograms``  fixed-bin log10|gradient| histograms per layer over epochs
                  ("How ReLU avoids vanishing gradients",
                  TensorBoard view)
  ``saturation``  saturated and dead fractions per hidden layer over epochs

Per sweep (a :class:`~vgrad.analysis.tables.Sweep`):
  ``profile``     per-layer gradient norm (and delta norm) against layer index, at
                  initialisation and at the end, one line per value of an axis
  ``heatmap``     a final metric over two axes, averaged over seeds, diverged runs marked
  ``bars``        final train/test accuracy per value of an axis (the activations book
                  chapter, Fig. 5.18)
  ``curves``      a per-epoch metric per value of an axis (the activations book chapter,
                  Figs. 5.15, 5.17)

Each function returns a Figure, or None when the runs did not record what it needs; a
missing panel within a figure is replaced by a note. With several seeds, lines are the
mean over seeds (the geometric mean on log axes) and bands span min to max; from five
seeds on, lines are the median and bands the interquartile range. Long step axes are
averaged over blocks of steps (the title says how many) so that trends stay readable.
Colours: layers on the sequential, colour-blind-safe viridis scale (input side dark);
categories in the Okabe-Ito palette.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from vgrad.analysis.tables import Run, Sweep, axis_column  # noqa: E402

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
             "#000000"]

STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "legend.frameon": False,
    "lines.linewidth": 1.3,
    "axes.prop_cycle": matplotlib.cycler(color=OKABE_ITO),
}


def layer_colors(n: int) -> list:
    return [plt.get_cmap("viridis")(x) for x in np.linspace(0.0, 0.85, n)]


def _figure(rows: int, cols: int = 1, width: float = 6.4, height: float = 2.3,
            sharex: bool = True) -> tuple[Figure, np.ndarray]:
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows, cols, figsize=(width, height * rows), sharex=sharex,
                                 squeeze=False, layout="constrained")
    return fig, axes


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9,
            color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


#: Seeds from which lines are medians and bands interquartile ranges.
MANY_SEEDS = 5
#: Step axes longer than this are averaged over blocks of steps.
MAX_POINTS = 250


def _blocks(x: np.ndarray, values: np.ndarray, log: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Average [S, T] values over blocks of consecutive steps (geometric if log)."""
    size = int(np.ceil(len(x) / MAX_POINTS))
    if size <= 1:
        return x, values, 1
    n = len(x) // size * size
    xb = x[:n].reshape(-1, size).mean(1)
    v = values[:, :n].reshape(values.shape[0], -1, size)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks (diverged seeds)
        vb = np.exp(np.nanmean(np.log(v), -1)) if log else np.nanmean(v, -1)
    return xb, vb, size


#: Axes with more series than this show lines only (bands would hide each other).
MAX_BANDS = 6


def _band(ax, x, values: np.ndarray, color, label: str, log: bool = False,
          band: bool = True) -> int:
    """Plot values [S, T] over x: the seeds' centre line and spread band (see the module
    docstring). Returns the block size used along x (1 = every point)."""
    values = np.asarray(values, np.float64)
    if log:
        values = np.where(values > 0, values, np.nan)
    x, values, size = _blocks(np.asarray(x, np.float64), values, log)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (diverged seeds)
        if len(values) >= MANY_SEEDS:
            low, center, high = np.nanpercentile(values, [25, 50, 75], axis=0)
        else:
            center = (np.exp(np.nanmean(np.log(values), axis=0)) if log
                      else np.nanmean(values, axis=0))
            low, high = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
    ax.plot(x, center, color=color, label=label)
    if band and len(values) > 1:
        ax.fill_between(x, low, high, color=color, alpha=0.18, linewidth=0)
    return size


def _seed_note(n_seeds: int, block: int = 1, bands: bool = True) -> str:
    notes = []
    spread = ("band: interquartile range" if n_seeds >= MANY_SEEDS else "band: min–max") \
        if bands else "bands omitted for clarity"
    if n_seeds >= MANY_SEEDS:
        notes.append(f"median of {n_seeds} seeds, {spread}")
    elif n_seeds > 1:
        notes.append(f"mean of {n_seeds} seeds, {spread}")
    if block > 1:
        notes.append(f"averaged over blocks of {block} recorded steps")
    return "; ".join(notes)


def _legend_below(fig: Figure, ax, ncols: int = 6) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(ncols, len(labels)),
               fontsize=8 if len(labels) <= 8 else 7)


def _title(run: Run) -> str:
    c = run.config
    parts = [f"act={c.get('act', {}).get('name')}", f"init={c.get('init', {}).get('name')}",
             f"depth={c.get('depth')}"]
    return f"{run.name}: " + ", ".join(parts)


# --- per run ---------------------------------------------------------------------------------


def gradients(run: Run) -> Figure | None:
    """The figure of "Visualizing the vanishing gradient problem": mean and std of each
    layer's kernel gradient, and the loss."""
    m = run.metrics
    if "grad_std" not in m:
        return None
    names, step, S = [str(n) for n in m["layer_names"]], m["step"], m["grad_std"].shape[0]
    fig, ax = _figure(3)
    colors = layer_colors(len(names))
    bands = len(names) <= MAX_BANDS
    for layer, name in enumerate(names):
        _band(ax[0, 0], step, m["grad_mean"][:, :, layer], colors[layer], name, band=bands)
        block = _band(ax[1, 0], step, m["grad_std"][:, :, layer], colors[layer], name,
                      log=True, band=bands)
    if "loss" in m:
        _band(ax[2, 0], step, m["loss"], OKABE_ITO[0], "batch loss")
    else:
        _note(ax[2, 0], "the batch loss was not recorded in this run (probe global_norms)")
    ax[0, 0].set(title="Mean of the kernel gradient ∂L/∂W", ylabel="mean ∂L/∂W")
    ax[1, 0].set(title="Standard deviation of the kernel gradient", yscale="log",
                 ylabel="std ∂L/∂W")
    ax[2, 0].set(title="Training loss on each step's batch", ylabel="loss", xlabel="step")
    _legend_below(fig, ax[0, 0])
    fig.suptitle(_title(run) + "\n" + _seed_note(S, block, bands), fontsize=9)
    return fig


def weights(run: Run) -> Figure | None:
    """The WeightCapture figure of "Visualizing the vanishing gradient problem": mean and
    std of each kernel over epochs."""
    m = run.metrics
    if "weight_std" not in m:
        return None
    names, epoch, S = [str(n) for n in m["layer_names"]], m["epoch"], m["weight_std"].shape[0]
    fig, ax = _figure(2)
    colors = layer_colors(len(names))
    bands = len(names) <= MAX_BANDS
    for layer, name in enumerate(names):
        _band(ax[0, 0], epoch, m["weight_mean"][:, :, layer], colors[layer], name, band=bands)
        _band(ax[1, 0], epoch, m["weight_std"][:, :, layer], colors[layer], name, band=bands)
    ax[0, 0].set(title="Mean of the kernel weights", ylabel="mean W")
    ax[1, 0].set(title="Standard deviation of the kernel weights", ylabel="std W",
                 xlabel="epoch (0 = initialisation)")
    _legend_below(fig, ax[0, 0])
    fig.suptitle(_title(run) + "\n" + _seed_note(S, bands=bands), fontsize=9)
    return fig


def learning_speed(run: Run) -> Figure | None:
    """Nielsen's figure (chapter 5): the speed of learning ||dC/db_l|| of each layer over
    training."""
    m = run.metrics
    if "bias_grad_norm" not in m and "probe_bias_grad_norm" not in m:
        return None
    names = [str(n) for n in m["layer_names"]]
    colors = layer_colors(len(names))
    fig, ax = _figure(2, sharex=False)
    S, block = 1, 1
    if "probe_bias_grad_norm" in m:
        S = m["probe_bias_grad_norm"].shape[0]
        for layer, name in enumerate(names):
            _band(ax[0, 0], m["epoch"], m["probe_bias_grad_norm"][:, :, layer], colors[layer],
                  name, log=True, band=len(names) <= MAX_BANDS)
        ax[0, 0].set(title="Averaged over the probe batch, at epoch boundaries", yscale="log",
                     ylabel="‖∂C/∂b_l‖", xlabel="epoch (0 = initialisation)")
    else:
        _note(ax[0, 0], "probe-batch bias gradients were not recorded in this run")
    if "bias_grad_norm" in m:
        S = m["bias_grad_norm"].shape[0]
        for layer, name in enumerate(names):
            block = _band(ax[1, 0], m["step"], m["bias_grad_norm"][:, :, layer], colors[layer],
                          name, log=True, band=len(names) <= MAX_BANDS)
        ax[1, 0].set(title="On each step's mini-batch", yscale="log", ylabel="‖∂C/∂b_l‖",
                     xlabel="step")
    else:
        _note(ax[1, 0], "per-step bias gradients were not recorded in this run")
    _legend_below(fig, ax[1, 0] if "bias_grad_norm" in m else ax[0, 0])
    fig.suptitle("Speed of learning ‖∂C/∂b_l‖ per layer — " + _title(run) + "\n"
                 + _seed_note(S, block, len(names) <= MAX_BANDS), fontsize=9)
    return fig


def histograms(run: Run, key: str = "grad_hist", seed: int = 0) -> Figure | None:
    """Fixed-bin histograms of log10|gradient| (or weight) per layer over epochs: one
    panel per layer (x: log10 of the magnitude, y: epoch, colour: fraction of entries)."""
    m = run.metrics
    if key not in m or "hist_edges" not in m:
        return None
    names, edges, counts = [str(n) for n in m["layer_names"]], m["hist_edges"], m[key][seed]
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig, ax = _figure(rows, cols, width=2.1 * cols + 1.0, height=2.3, sharex=True)
    what = "∂L/∂W" if key == "grad_hist" else "W"
    filled = np.flatnonzero(np.nan_to_num(counts).sum(axis=(0, 1)))
    lo, hi = (edges[max(filled[0] - 2, 0)], edges[min(filled[-1] + 3, len(edges) - 1)]) \
        if len(filled) else (edges[0], edges[-1])
    epoch_edges = np.append(m["epoch"], m["epoch"][-1] + 1) - 0.5
    image = None
    for layer, name in enumerate(names):
        a = ax[layer // cols, layer % cols]
        frac = counts[:, layer] / np.maximum(counts[:, layer].sum(-1, keepdims=True), 1)
        image = a.pcolormesh(edges, epoch_edges, frac, cmap="viridis", shading="flat",
                             norm=matplotlib.colors.PowerNorm(0.5, vmin=0, vmax=1))
        a.set(title=name, xlim=(lo, hi))
        a.grid(False)
    for a in ax[-1]:
        a.set_xlabel(f"log10 |{what}|")
    for a in ax[:, 0]:
        a.set_ylabel("epoch")
    for layer in range(len(names), rows * cols):
        ax[layer // cols, layer % cols].set_visible(False)
    fig.colorbar(image, ax=ax, label="fraction of the layer's entries (square-root scale)",
                 shrink=0.8)
    fig.suptitle(f"log10|{what}| per layer over training (seed {int(run.rows()[seed]['seed'])},"
                 f" fixed bins) — {_title(run)}", fontsize=9)
    return fig


def saturation(run: Run) -> Figure | None:
    """Saturated and dead fractions of each hidden layer over epochs."""
    m = run.metrics
    if "act_sat_frac" not in m:
        return None
    hidden = [str(n) for n in m["layer_names"]][:-1]
    S = m["act_sat_frac"].shape[0]
    colors = layer_colors(len(hidden) + 1)
    fig, ax = _figure(2)
    bands = len(hidden) <= MAX_BANDS
    for layer, name in enumerate(hidden):
        _band(ax[0, 0], m["epoch"], m["act_sat_frac"][:, :, layer], colors[layer], name,
              band=bands)
        _band(ax[1, 0], m["epoch"], m["act_dead_frac"][:, :, layer], colors[layer], name,
              band=bands)
    threshold = run.config.get("record", {}).get("sat_threshold", 0.1)
    ax[0, 0].set(title=f"Saturated: |f′(z)| < {threshold:g} × max |f′| (example-unit pairs)",
                 ylabel="fraction", ylim=(-0.02, 1.02))
    ax[1, 0].set(title="Dead: units with f′(z) = 0 on every probe example",
                 ylabel="fraction", ylim=(-0.02, 1.02), xlabel="epoch (0 = initialisation)")
    _legend_below(fig, ax[0, 0])
    fig.suptitle(_title(run) + "\n" + _seed_note(S, bands=bands), fontsize=9)
    return fig


RUN_FIGURES = {"gradients": gradients, "weights": weights, "learning_speed": learning_speed,
               "histograms": histograms, "saturation": saturation}


# --- per sweep -------------------------------------------------------------------------------


def _groups(sweep: Sweep, axis: str) -> list[tuple[str, list[Run]]]:
    """Runs grouped by the value of ``axis`` (failed runs left out), in table order."""
    runs = sweep.runs
    column = axis_column(runs, axis)
    first = runs.drop_duplicates("run")
    groups: dict[str, list[Run]] = {}
    for _, row in first.iterrows():
        if row["status"] != "failed":
            groups.setdefault(str(row[column]), []).append(sweep.run(row["run"]))
    return list(groups.items())


def _stack_ragged(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate [S_i, T_i] arrays along seeds, NaN-padding T to the longest."""
    width = max(p.shape[1] for p in parts)
    return np.concatenate([np.pad(p.astype(np.float64), ((0, 0), (0, width - p.shape[1])),
                                  constant_values=np.nan) for p in parts])


def _by_depth(groups: list[tuple[str, list[Run]]]) -> list[tuple[str, list[Run]]]:
    """Split each group by number of layers when depths differ within it: averaging
    layer k of nets of different depths would mean nothing."""
    out = []
    for value, runs in groups:
        depths: dict[int, list[Run]] = {}
        for r in runs:
            depths.setdefault(len(r.metrics["layer_names"]), []).append(r)
        if len(depths) == 1:
            out.append((value, runs))
        else:
            out += [(f"{value}, {n} layers", rs) for n, rs in sorted(depths.items())]
    return out


def _profile_rows(runs: list[Run], key: str, at: str) -> np.ndarray | None:
    """[runs x seeds, L] per-layer values at the first step, or averaged over the last
    tenth of the recorded steps."""
    rows = []
    for run in runs:
        if key not in run.metrics:
            return None
        v = run.metrics[key]  # [S, T, L]
        if at == "init":
            rows.append(v[:, 0])
        else:
            tail = max(1, v.shape[1] // 10)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a diverged seed: all NaN
                rows.append(np.nanmean(v[:, -tail:], axis=1))
    return np.concatenate(rows)


def profile(sweep: Sweep, hue: str, keys: Sequence[str] = ("grad_norm", "delta_norm")
            ) -> Figure:
    """The vanishing profile: per-layer norms against layer index, one line per value."""
    groups = _by_depth(_groups(sweep, hue))
    labels = {"grad_norm": "‖∂L/∂W_l‖", "delta_norm": "mean ‖δ_l‖"}
    fig, ax = _figure(len(keys), 2, width=8.0, height=2.8, sharex=False)
    n_layers = max(len(r.metrics["layer_names"]) for _, runs in groups for r in runs)
    for row, key in enumerate(keys):
        for col, at in enumerate(("init", "end")):
            a = ax[row, col]
            drawn = False
            for i, (value, runs) in enumerate(groups):
                values = _profile_rows(runs, key, at)
                if values is None:
                    continue
                x = np.arange(values.shape[1])
                _band(a, x, values, OKABE_ITO[i % len(OKABE_ITO)], f"{hue}={value}", log=True)
                drawn = True
            if not drawn:
                _note(a, f"{key} was not recorded in these runs")
                continue
            when = "at step 0" if at == "init" else "(last 10% of steps)"
            a.set(yscale="log", title=f"{labels.get(key, key)} {when}",
                  xlabel="layer (0 = next to the input)", ylabel=labels.get(key, key))
            a.set_xticks(range(n_layers))
    _legend_below(fig, ax[0, 0], ncols=4)
    seeds = sum(len(r.rows()) for _, runs in groups for r in runs) // max(len(groups), 1)
    fig.suptitle(f"Gradient profile across layers by {hue}\n{_seed_note(seeds)}", fontsize=9)
    return fig


def _final_metric(sweep: Sweep, metric: str) -> str:
    runs = sweep.runs
    for candidate in (metric, f"final_{metric}"):
        if candidate in runs.columns:
            return candidate
    raise KeyError(f"no metric {metric!r}; try final_train_acc, final_test_acc, "
                   "final_train_loss, final_test_loss")


def default_metric(sweep: Sweep) -> str:
    runs = sweep.runs
    has_test = "final_test_acc" in runs and runs["final_test_acc"].notna().any()
    return "final_test_acc" if has_test else "final_train_acc"


def heatmap(sweep: Sweep, x: str, y: str, metric: str | None = None) -> Figure:
    """A final metric over two axes (mean over seeds and runs of a cell); cells where a
    seed diverged are marked with the number of diverged seeds."""
    runs = sweep.runs
    metric = _final_metric(sweep, metric or default_metric(sweep))
    cx, cy = axis_column(runs, x), axis_column(runs, y)
    grid = runs.pivot_table(index=cy, columns=cx, values=metric, aggfunc="mean", dropna=False)
    diverged = runs.pivot_table(index=cy, columns=cx, values="diverged", aggfunc="sum",
                                dropna=False)
    fig, ax = _figure(1, 1, width=1.1 * grid.shape[1] + 2.5, height=0.6 * grid.shape[0] + 1.6)
    a = ax[0, 0]
    image = a.imshow(grid.to_numpy(np.float64), cmap="viridis", aspect="auto")
    a.set_xticks(range(grid.shape[1]), [str(v) for v in grid.columns])
    a.set_yticks(range(grid.shape[0]), [str(v) for v in grid.index])
    a.grid(False)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            value, n_div = grid.iat[i, j], diverged.iat[i, j]
            text = "—" if np.isnan(value) else f"{value:.3f}"
            if n_div and n_div > 0:
                text += f"\n{int(n_div)} diverged"
            a.text(j, i, text, ha="center", va="center", fontsize=8,
                   color="white" if np.isnan(value) or value < np.nanmean(grid.to_numpy())
                   else "black")
    a.set(xlabel=x, ylabel=y, title=f"{metric.replace('_', ' ')} (mean over seeds)")
    fig.colorbar(image, ax=a, label=metric.replace("_", " "))
    return fig


def bars(sweep: Sweep, x: str, metrics: Sequence[str] = ("final_train_acc", "final_test_acc")
         ) -> Figure:
    """Final accuracy per value of an axis: bars = mean over seeds, whiskers = sd."""
    runs = sweep.runs
    cx = axis_column(runs, x)
    present = [m for m in metrics if m in runs and runs[m].notna().any()]
    stats = runs.groupby(cx, sort=False)[present].agg(["mean", "std"])
    fig, ax = _figure(1, 1, width=max(4.0, 0.9 * len(stats) + 2), height=3.2)
    a = ax[0, 0]
    width = 0.8 / max(len(present), 1)
    for i, m in enumerate(present):
        pos = np.arange(len(stats)) + (i - (len(present) - 1) / 2) * width
        a.bar(pos, stats[(m, "mean")], width, yerr=stats[(m, "std")].fillna(0), capsize=2,
              label=m.replace("final_", "").replace("_", " "), color=OKABE_ITO[i])
    a.set_xticks(range(len(stats)), [str(v) for v in stats.index])
    a.set(xlabel=x, ylabel="accuracy" if all("acc" in m for m in present) else "value",
          title=f"Final {' and '.join(m.replace('final_', '').replace('_', ' ') for m in present)}"
          f" by {x}")
    a.legend()
    return fig


def curves(sweep: Sweep, hue: str, metric: str = "train_loss") -> Figure | None:
    """A per-epoch metric (default training loss) per value of an axis."""
    groups = _groups(sweep, hue)
    fig, ax = _figure(1, 1, width=6.4, height=3.2)
    a = ax[0, 0]
    drawn = False
    for i, (value, runs) in enumerate(groups):
        if any(metric not in r.metrics for r in runs):
            continue
        values = _stack_ragged([r.metrics[metric] for r in runs])
        epochs = max((r.metrics["epoch"] for r in runs), key=len)
        _band(a, epochs, values, OKABE_ITO[i % len(OKABE_ITO)], f"{hue}={value}")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    seeds = sum(len(r.rows()) for _, runs in groups for r in runs) // max(len(groups), 1)
    a.set(xlabel="epoch (0 = initialisation)", ylabel=metric.replace("_", " "),
          title=f"{metric.replace('_', ' ')} by {hue}\n{_seed_note(seeds)}")
    a.legend()
    return fig


# --- output -----------------------------------------------------------------------------------


def save(fig: Figure, stem: str | Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf``; close the figure."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in formats:
        path = stem.with_suffix(f".{ext}")
        fig.savefig(path)
        paths.append(path)
    plt.close(fig)
    return paths


def varying_axes(runs: pd.DataFrame) -> list[str]:
    """The swept axes: config columns whose value differs between runs. A group whose
    choice varies counts once (``act``, not also ``act.alpha`` of one of its choices)."""
    runs = runs.drop_duplicates("run")
    skip = {"run", "run_dir", "seed", "status", "diverged", "diverged_at_step", "error",
            "compile_s", "run_s", "steps_per_s"}
    varying = [c for c in runs.columns if c not in skip
               and not c.startswith(("initial_", "final_"))
               and runs[c].astype(str).nunique() > 1]
    groups = {c[: -len(".name")] for c in varying if c.endswith(".name")}
    return [c[: -len(".name")] if c.endswith(".name") else c for c in varying
            if c.endswith(".name") or c.split(".")[0] not in groups]
