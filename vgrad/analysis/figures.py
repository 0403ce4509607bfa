"""The sources' figures, and more, from run folders (matplotlib).

Per run (a :class:`~vgrad.analysis.tables.Run`):
  ``gradients``   mean and std of each layer's kernel gradient over steps, and the loss
                  (the figure of "Visualizing the vanishing gradient problem"; std on a
                  log axis)
  ``weights``     mean and std of each layer's kernel over epochs (visualize preset)
  ``learning_speed``  ||dC/db_l|| per layer over training (Nielsen's chapter 5)
  ``histograms``  fixed-bin log10|gradient| histograms per layer over epochs, pooled
                  over seeds ("How ReLU avoids vanishing gradients", its TensorBoard view)
  ``saturation``  saturated and dead fractions per hidden layer over epochs

Per sweep (a :class:`~vgrad.analysis.tables.Sweep`):
  ``profile``     per-layer gradient norm (and delta norm) against layer index, at
                  initialisation and at the end, one line per value of an axis
  ``heatmap``     a final metric over two axes (median over seeds), diverged runs marked
  ``bars``        final train/test accuracy per value of an axis (the activations book
                  chapter, Fig. 5.18): median and interquartile range over seeds
  ``curves``      a per-epoch metric per value of an axis (the activations book chapter,
                  Figs. 5.15, 5.17), or a per-step one (``grad_global_norm``, ``loss``)

Each function returns a Figure, or None when the runs did not record what it needs; a
missing panel within a figure is replaced by a note. With several seeds, lines are the
mean over seeds (the geometric mean on log axes) and bands span min to max; from five
seeds on, lines are the median and bands the interquartile range. Long step axes are
averaged over blocks of steps (the title says how many) so that trends stay readable.

**Nothing is pooled silently.** A sweep figure draws one line per value of its axis
(colour) and, when a second axis varies, per value of that one too (line style); any
further axis that varies is pooled and the title names it with its values. Categories
keep the order of the sweep. Runs that did not record a statistic a panel draws (other
probes, no test set) while other runs did are named in a note ("not recorded in:
act=relu (delta_norm)"), never just left out. **Nothing breaks on exploded runs**: what
is finite is drawn, and a note says which seeds diverged, or that a log-scaled panel has
no positive finite value (all zero, vanished, or diverged). Colours: layers on the
sequential, colour-blind-safe viridis scale (input side dark; a colour bar instead of a
legend from 13 layers on); categories in the Okabe-Ito palette, then a longer one, never
repeated within a figure.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from vgrad import store  # noqa: E402
from vgrad.analysis.tables import Run, Sweep, axis_column  # noqa: E402

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
             "#000000"]
#: Line styles for a second swept axis.
STYLES = ["-", "--", ":", "-."]

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

#: From this many layers on, layers get a colour bar rather than a legend.
MAX_LEGEND_LAYERS = 12


def layer_colors(n: int) -> list:
    return [plt.get_cmap("viridis")(x) for x in np.linspace(0.0, 0.85, n)]


def palette(n: int) -> list:
    """``n`` distinct category colours: Okabe-Ito, then tab20 (never one colour twice)."""
    if n <= len(OKABE_ITO):
        return OKABE_ITO[:n]
    more = [plt.get_cmap("tab20")(i) for i in range(20)]
    extra = [plt.get_cmap("viridis")(x) for x in np.linspace(0, 1, max(n - 28, 0))]
    return (OKABE_ITO + more + extra)[:n]


def _figure(rows: int, cols: int = 1, width: float = 6.4, height: float = 2.3,
            sharex: bool = True) -> tuple[Figure, np.ndarray]:
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows, cols, figsize=(width, height * rows), sharex=sharex,
                                 squeeze=False, layout="constrained")
    return fig, axes


def _note(ax, text: str, clear: bool = True) -> None:
    """Write ``text`` in the middle of ``ax`` (clearing its ticks when it is empty)."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9,
            color="0.4", wrap=True)
    if clear:
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
          band: bool = True, style: str = "-") -> tuple[int, bool]:
    """Plot values [S, T] over x: the seeds' centre line and spread band (see the module
    docstring). Non-finite values (and, on a log axis, values <= 0) are left out.
    Returns the block size used along x (1 = every point) and whether anything was
    drawn."""
    values = np.asarray(values, np.float64)
    values = np.where(np.isfinite(values), values, np.nan)
    if log:
        values = np.where(values > 0, values, np.nan)
    if not np.isfinite(values).any():
        return 1, False
    x, values, size = _blocks(np.asarray(x, np.float64), values, log)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (diverged seeds)
        if len(values) >= MANY_SEEDS:
            low, center, high = np.nanpercentile(values, [25, 50, 75], axis=0)
        else:
            center = (np.exp(np.nanmean(np.log(values), axis=0)) if log
                      else np.nanmean(values, axis=0))
            low, high = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
    ax.plot(x, center, color=color, label=label, linestyle=style)
    if band and len(values) > 1:
        ax.fill_between(x, low, high, color=color, alpha=0.18, linewidth=0)
    return size, True


def _log_scale(ax, drawn: bool, what: str) -> None:
    """A log y axis, or a note when nothing positive and finite was drawn on it."""
    if drawn:
        ax.set_yscale("log")
    else:
        _note(ax, f"{what}: no positive finite value to draw (every value is zero, "
                  "vanished below float range, or not finite after a divergence)",
              clear=False)


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


def _diverged_note(runs: Sequence[Run]) -> str:
    """'k of n seeds diverged (...)' for the runs of a figure, or ''."""
    steps = [s["diverged_at_step"] for r in runs for s in r.summary.get("per_seed", [])]
    bad = [s for s in steps if s is not None]
    if not bad:
        return ""
    return (f"{len(bad)} of {len(steps)} seeds diverged (at step {min(bad)}"
            f"{f'–{max(bad)}' if max(bad) > min(bad) else ''}; their lines stop there)")


def _layer_legend(fig: Figure, ax, colors: list, names: list[str]) -> None:
    """A legend of the layers below the figure, or a colour bar when there are many."""
    if len(names) <= MAX_LEGEND_LAYERS:
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncols=min(6, len(labels)),
                       fontsize=8)
        return
    norm = matplotlib.colors.Normalize(0, len(names) - 1)
    cmap = matplotlib.colors.LinearSegmentedColormap.from_list("layers", colors)
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=fig.axes,
                 label="layer (0 = next to the input)", shrink=0.8)


def _legend_below(fig: Figure, ax, ncols: int = 6, skip: str = "") -> None:
    """One legend below the figure for the lines of ``ax`` (or of several axes, each
    label once; labels containing ``skip`` left out)."""
    handles, labels = [], []
    for one in np.atleast_1d(ax).ravel():
        for handle, label in zip(*one.get_legend_handles_labels(), strict=True):
            if label not in labels and not (skip and skip in label):
                handles.append(handle)
                labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(ncols, len(labels)),
                   fontsize=8 if len(labels) <= 8 else 7)


def _title(run: Run) -> str:
    c = run.config
    model = (c.get("model") or {}).get("name", "mlp")
    parts = [f"act={c.get('act', {}).get('name')}", f"init={c.get('init', {}).get('name')}",
             f"depth={c.get('depth')}"]
    if model != "mlp":
        parts.insert(0, f"model={model}")
    status = "" if run.status == "completed" else f" [{run.status}]"
    return f"{run.name}{status}: " + ", ".join(parts)


def _suptitle(fig: Figure, *lines: str) -> None:
    fig.suptitle("\n".join(line for line in lines if line), fontsize=9)


# --- per run ---------------------------------------------------------------------------------


def _layer_lines(ax, x, values: np.ndarray, names: list[str], log: bool = False) -> tuple:
    """One line per layer of values [S, T, L]; returns (block, anything drawn)."""
    colors = layer_colors(len(names))
    bands = len(names) <= MAX_BANDS
    block, drawn = 1, False
    for layer, name in enumerate(names):
        b, d = _band(ax, x, values[:, :, layer], colors[layer], name, log=log, band=bands)
        block, drawn = max(block, b), drawn or d
    return block, drawn


def gradients(run: Run) -> Figure | None:
    """The figure of "Visualizing the vanishing gradient problem": mean and std of each
    layer's kernel gradient, and the loss."""
    m = run.metrics
    if "grad_std" not in m:
        return None
    names, step, S = [str(n) for n in m["layer_names"]], m["step"], m["grad_std"].shape[0]
    fig, ax = _figure(3)
    _, drawn = _layer_lines(ax[0, 0], step, m["grad_mean"], names)
    if not drawn:
        _note(ax[0, 0], "no finite gradient mean was recorded", clear=False)
    block, drawn = _layer_lines(ax[1, 0], step, m["grad_std"], names, log=True)
    _log_scale(ax[1, 0], drawn, "gradient std")
    if "loss" in m:
        _, drawn = _band(ax[2, 0], step, m["loss"], OKABE_ITO[0], "batch loss")
        if not drawn:
            _note(ax[2, 0], "no finite batch loss was recorded", clear=False)
    else:
        _note(ax[2, 0], "the batch loss was not recorded in this run (probe global_norms)")
    ax[0, 0].set(title="Mean of the kernel gradient ∂L/∂W", ylabel="mean ∂L/∂W")
    ax[1, 0].set(title="Standard deviation of the kernel gradient", ylabel="std ∂L/∂W")
    ax[2, 0].set(title="Training loss on each step's batch", ylabel="loss", xlabel="step")
    _layer_legend(fig, ax[0, 0], layer_colors(len(names)), names)
    _suptitle(fig, _title(run), _seed_note(S, block, len(names) <= MAX_BANDS),
              _diverged_note([run]))
    return fig


def weights(run: Run) -> Figure | None:
    """The WeightCapture figure of "Visualizing the vanishing gradient problem": mean and
    std of each kernel over epochs."""
    m = run.metrics
    if "weight_std" not in m:
        return None
    names, epoch, S = [str(n) for n in m["layer_names"]], m["epoch"], m["weight_std"].shape[0]
    fig, ax = _figure(2)
    _layer_lines(ax[0, 0], epoch, m["weight_mean"], names)
    _layer_lines(ax[1, 0], epoch, m["weight_std"], names)
    ax[0, 0].set(title="Mean of the kernel weights", ylabel="mean W")
    ax[1, 0].set(title="Standard deviation of the kernel weights", ylabel="std W",
                 xlabel="epoch (0 = initialisation)")
    _layer_legend(fig, ax[0, 0], layer_colors(len(names)), names)
    _suptitle(fig, _title(run), _seed_note(S, bands=len(names) <= MAX_BANDS),
              _diverged_note([run]))
    return fig


def learning_speed(run: Run) -> Figure | None:
    """Nielsen's figure (chapter 5): the speed of learning ||dC/db_l|| of each layer over
    training."""
    m = run.metrics
    if "bias_grad_norm" not in m and "probe_bias_grad_norm" not in m:
        return None
    names = [str(n) for n in m["layer_names"]]
    fig, ax = _figure(2, sharex=False)
    S, block = 1, 1
    if "probe_bias_grad_norm" in m:
        S = m["probe_bias_grad_norm"].shape[0]
        _, drawn = _layer_lines(ax[0, 0], m["epoch"], m["probe_bias_grad_norm"], names, True)
        _log_scale(ax[0, 0], drawn, "‖∂C/∂b_l‖")
        ax[0, 0].set(title="Averaged over the probe batch, at epoch boundaries",
                     ylabel="‖∂C/∂b_l‖", xlabel="epoch (0 = initialisation)")
    else:
        _note(ax[0, 0], "probe-batch bias gradients were not recorded in this run")
    if "bias_grad_norm" in m:
        S = m["bias_grad_norm"].shape[0]
        block, drawn = _layer_lines(ax[1, 0], m["step"], m["bias_grad_norm"], names, True)
        _log_scale(ax[1, 0], drawn, "‖∂C/∂b_l‖")
        ax[1, 0].set(title="On each step's mini-batch", ylabel="‖∂C/∂b_l‖", xlabel="step")
    else:
        _note(ax[1, 0], "per-step bias gradients were not recorded in this run")
    _layer_legend(fig, ax[1, 0] if "bias_grad_norm" in m else ax[0, 0],
                  layer_colors(len(names)), names)
    _suptitle(fig, "Speed of learning ‖∂C/∂b_l‖ per layer — " + _title(run),
              _seed_note(S, block, len(names) <= MAX_BANDS), _diverged_note([run]))
    return fig


def _pooled_counts(counts: np.ndarray, seed: int | None) -> tuple[np.ndarray, str]:
    """Histogram counts [E, L, B] of one seed, or summed over the seeds ([S, E, L, B])
    wherever a seed's counts are finite; and a note on what was pooled."""
    S = counts.shape[0]
    if seed is not None:
        return np.nan_to_num(counts[seed]), f"seed index {seed}"
    finite = np.isfinite(counts).all(axis=(2, 3))  # [S, E]: not yet diverged
    total = np.where(finite[:, :, None, None], counts, 0).sum(axis=0)
    first_bin = counts[..., 0] / np.maximum(counts.sum(axis=-1), 1)  # [S, E, L]
    vanished = [s for s in range(S) if finite[s, -1] and (first_bin[s, -1] > 0.999).all()]
    parts = [f"pooled over {S} seed(s)" if S > 1 else "one seed"]
    if (~finite).any():
        parts.append(f"{int((~finite[:, -1]).sum())} diverged seed(s) counted until their "
                     "divergence")
    if vanished:
        parts.append(f"{len(vanished)} seed(s) whose gradients ended all below 1e-12 "
                     "(dead or vanished)")
    return total, "; ".join(parts)


def histograms(run: Run, key: str = "grad_hist", seed: int | None = None) -> Figure | None:
    """Fixed-bin histograms of log10|gradient| (or weight) per layer over epochs: one
    panel per layer (x: log10 of the magnitude, y: epoch, colour: fraction of entries),
    pooled over the seeds (``seed``: one seed index instead)."""
    m = run.metrics
    if key not in m or "hist_edges" not in m:
        return None
    names, edges = [str(n) for n in m["layer_names"]], m["hist_edges"]
    counts, pooled = _pooled_counts(np.asarray(m[key], np.float64), seed)
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig, ax = _figure(rows, cols, width=2.1 * cols + 1.0, height=2.3, sharex=True)
    what = "∂L/∂W" if key == "grad_hist" else "W"
    filled = np.flatnonzero(counts.sum(axis=(0, 1)))
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
    _suptitle(fig, f"log10|{what}| per layer over training (fixed bins; {pooled})",
              _title(run))
    return fig


def saturation(run: Run) -> Figure | None:
    """Saturated and dead fractions of each hidden layer over epochs."""
    m = run.metrics
    if "act_sat_frac" not in m:
        return None
    hidden = [str(n) for n in m["layer_names"]][: m["act_sat_frac"].shape[2]]
    S = m["act_sat_frac"].shape[0]
    fig, ax = _figure(2)
    _layer_lines(ax[0, 0], m["epoch"], m["act_sat_frac"], hidden)
    _layer_lines(ax[1, 0], m["epoch"], m["act_dead_frac"], hidden)
    threshold = run.config.get("record", {}).get("sat_threshold", 0.1)
    ax[0, 0].set(title=f"Saturated: |f′(z)| < {threshold:g} × max |f′| (example-unit pairs)",
                 ylabel="fraction", ylim=(-0.02, 1.02))
    ax[1, 0].set(title="Dead: units with f′(z) = 0 on every probe example",
                 ylabel="fraction", ylim=(-0.02, 1.02), xlabel="epoch (0 = initialisation)")
    _layer_legend(fig, ax[0, 0], layer_colors(len(hidden)), hidden)
    _suptitle(fig, _title(run), _seed_note(S, bands=len(hidden) <= MAX_BANDS),
              _diverged_note([run]))
    return fig


def _at_init_and_end(ax, values: np.ndarray, label: str, colors: Sequence, log: bool,
                     style: str = "-") -> bool:
    """A profile across layers (values [S, E, L]) at initialisation and at the last
    epoch, one line each; whether anything was drawn."""
    x = np.arange(values.shape[2])
    drawn = False
    for e, when, color in ((0, "initialisation", colors[0]), (-1, "end", colors[1])):
        _, d = _band(ax, x, values[:, e, :], color, f"{label} at {when}", log=log, style=style)
        drawn = drawn or d
    return drawn


def signal(run: Run) -> Figure | None:
    """The forward signal across layers, at initialisation and at the end: its length
    q^l (mean squared pre-activation) and the correlation c^l between different inputs
    (mean-field theory's length and correlation maps: Poole et al. 2016, Schoenholz et
    al. 2017); for residual nets also each block's branch and skip-path variance (Brock,
    De & Smith 2021)."""
    m = run.metrics
    if "signal_q" not in m:
        return None
    names, S = [str(n) for n in m["layer_names"]], m["signal_q"].shape[0]
    residual = "branch_var" in m
    fig, ax = _figure(3 if residual else 2, sharex=False)
    drawn = _at_init_and_end(ax[0, 0], m["signal_q"], "signal", OKABE_ITO, log=True)
    _log_scale(ax[0, 0], drawn, "$q^l$")
    _at_init_and_end(ax[1, 0], m["signal_c"], "signal", OKABE_ITO, log=False)
    ax[0, 0].set(title="Length of the signal: $q^l$ = mean of z² per unit (probe batch)",
                 ylabel="$q^l$")
    ax[1, 0].set(title="Correlation between different inputs: $c^l$ (mean over pairs)",
                 ylabel="$c^l$", ylim=(-1.05, 1.05))
    for a in ax[:2, 0]:
        a.set_xticks(range(len(names)) if len(names) <= 16 else
                     np.linspace(0, len(names) - 1, 9).round().astype(int))
        a.set_xlabel("layer (0 = next to the input; " + f"{names[0]} … {names[-1]})")
    if residual:
        blocks = np.arange(1, m["branch_var"].shape[2] + 1)
        drawn = False
        for key, what, style in (("skip_var", "skip path h", "-"),
                                 ("branch_var", "branch α·F(h)", "--")):
            for e, when, color in ((0, "initialisation", OKABE_ITO[0]),
                                   (-1, "end", OKABE_ITO[1])):
                _, d = _band(ax[2, 0], blocks, m[key][:, e, :], color,
                             f"{what} at {when}", log=True, style=style)
                drawn = drawn or d
        _log_scale(ax[2, 0], drawn, "variance")
        ax[2, 0].set(title="Per residual block: variance of the skip path and of the branch",
                     ylabel="variance", xlabel="block")
        _legend_below(fig, ax[2, 0], ncols=2)
    else:
        _legend_below(fig, ax[0, 0], ncols=2)
    _suptitle(fig, "Forward signal — " + _title(run), _seed_note(S), _diverged_note([run]))
    return fig


def _time_rows(m: dict, at: str, layer: int = -1) -> np.ndarray:
    """||dL/dh_t|| of one recurrent layer, [S, T]: at the first step, or averaged over
    the last tenth of the recorded steps."""
    v = np.asarray(m["time_delta_norm"][:, :, layer], np.float64)  # [S, steps, T]
    if at == "init":
        return v[:, 0]
    tail = max(1, v.shape[1] // 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a diverged seed: all NaN
        return np.nanmean(v[:, -tail:], axis=1)


def through_time(run: Run) -> Figure | None:
    """Recurrent nets: the gradient through time. ||dL/dh_t|| against the time step t for
    every recurrent layer at the first step and late in training (the time profile, the
    recurrent analogue of the layer profile); the top layer's ||dL/dh_t|| over t and
    training steps as a heatmap; and the recurrent kernel's spectral radius and largest
    singular value per epoch (Pascanu, Mikolov & Bengio 2013)."""
    m = run.metrics
    if "time_delta_norm" not in m:
        return None
    S, _, R, T = m["time_delta_norm"].shape
    spectrum = "rec_radius" in m
    fig, ax = _figure(3 if spectrum else 2, sharex=False, height=2.5)
    t = np.arange(1, T + 1)
    colors, drawn = layer_colors(max(R, 2)), False
    for r in range(R):
        for at, style, when in (("init", "-", "step 0"), ("end", "--", "last 10% of steps")):
            label = f"rnn_{r}, {when}" if R > 1 else when
            drawn |= _band(ax[0, 0], t, _time_rows(m, at, r), colors[r], label, log=True,
                           style=style)[1]
    _log_scale(ax[0, 0], drawn, "‖∂L/∂h_t‖")
    ax[0, 0].set(title="Gradient reaching the state at step t: mean ‖∂L/∂h_t‖ (loss at t = T)",
                 xlabel="time step t", ylabel="‖∂L/∂h_t‖")
    if drawn:
        ax[0, 0].legend(fontsize=7, ncols=2 if R > 1 else 1)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        top = np.log10(np.nanmedian(np.asarray(m["time_delta_norm"][:, :, -1], np.float64),
                                    axis=0))  # [steps, T]
    top = np.where(np.isfinite(top), top, np.nan)
    if np.isfinite(top).any():
        image = ax[1, 0].imshow(top.T, aspect="auto", origin="lower", cmap="viridis",
                                extent=(m["step"][0], m["step"][-1] + 1, 0.5, T + 0.5),
                                interpolation="nearest")
        fig.colorbar(image, ax=ax[1, 0], label="log10 ‖∂L/∂h_t‖")
    else:
        _note(ax[1, 0], "‖∂L/∂h_t‖: no finite value to draw")
    over = "median over seeds" if S > 1 else "one seed"
    ax[1, 0].set(title=f"Top recurrent layer, over training ({over})",
                 xlabel="training step", ylabel="time step t")
    if spectrum:
        epochs = np.arange(m["rec_radius"].shape[1])
        drawn = False
        for r in range(R):
            for key, what, style in (("rec_radius", "spectral radius", "-"),
                                     ("rec_sv_max", "largest singular value", "--")):
                label = f"rnn_{r}: {what}" if R > 1 else what
                drawn |= _band(ax[2, 0], epochs, m[key][:, :, r], colors[r], label,
                               log=True, style=style)[1]
        ax[2, 0].axhline(1.0, color="0.5", linewidth=0.8, linestyle=":")
        _log_scale(ax[2, 0], drawn, "spectrum")
        ax[2, 0].set(title="Recurrent kernel (the candidate block for LSTM and GRU)",
                     xlabel="epoch (0 = initialisation)", ylabel="value")
        if drawn:
            ax[2, 0].legend(fontsize=7, ncols=2 if R > 1 else 1)
    _suptitle(fig, "Gradients through time — " + _title(run), _seed_note(S),
              _diverged_note([run]))
    return fig


RUN_FIGURES = {"gradients": gradients, "weights": weights, "learning_speed": learning_speed,
               "histograms": histograms, "saturation": saturation, "signal": signal,
               "time": through_time}


# --- per sweep: which runs make which line -----------------------------------------------


def _ordered(values: pd.Series) -> list[str]:
    """The distinct values of a column as text, in the order the sweep made them."""
    return list(dict.fromkeys(values.astype(str)))


@dataclass
class Line:
    """The runs drawn as one line (or bar) of a sweep figure."""

    label: str
    runs: list[Run]
    color: object
    style: str = "-"


@dataclass
class Split:
    """How a sweep figure splits its runs: the lines, and what it pools (named in the
    title)."""

    lines: list[Line]
    pooled: str  # "" or "pooled over depth (2, 4, 8)"


#: Axes that change the number of layers come first for the line style: a profile
#: across layers cannot pool nets of different depths.
SHAPE_AXES = ("depth", "widths")


def split(sweep: Sweep, hue: str) -> Split:
    """One line per value of ``hue`` (colour) and of a second varying axis (line style,
    up to four values; depth first); any other varying axis is pooled and named."""
    runs = sweep.runs
    ended = runs[runs["status"] != "failed"].drop_duplicates("run")
    hue_col = axis_column(runs, hue)
    others = sorted((a for a in varying_axes(ended) if axis_column(runs, a) != hue_col),
                    key=lambda a: a not in SHAPE_AXES)
    style_axis = next((a for a in others
                       if ended[axis_column(runs, a)].astype(str).nunique() <= len(STYLES)),
                      None)
    pooled = [a for a in others if a != style_axis]
    hues = _ordered(ended[hue_col])
    colors = dict(zip(hues, palette(len(hues)), strict=True))
    styles = ({v: STYLES[i] for i, v in enumerate(_ordered(ended[axis_column(runs,
                                                                              style_axis)]))}
              if style_axis else {})
    lines: dict[tuple[str, str], Line] = {}
    for _, row in ended.iterrows():
        h = str(row[hue_col])
        s = str(row[axis_column(runs, style_axis)]) if style_axis else ""
        label = f"{hue}={h}" + (f", {style_axis}={s}" if style_axis else "")
        line = lines.setdefault((h, s), Line(label, [], colors[h], styles.get(s, "-")))
        line.runs.append(sweep.run(row["run"]))
    note = ""
    if pooled:
        parts = [f"{a} ({', '.join(_ordered(ended[axis_column(runs, a)]))})" for a in pooled]
        note = "pooled over " + "; ".join(parts)
    return Split(list(lines.values()), note)


#: The evaluation's statistics: always recorded, but the test set's are NaN throughout a
#: run without a test set (``data.test_size=0``), which counts as not recorded.
EVAL_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc")
#: Lines (or runs) a "not recorded in" note names before it says how many more.
MAX_NAMED = 6


def recorded(run: Run, key: str) -> bool:
    """Whether ``run`` recorded the statistic ``key``: an array of its ``metrics.npz``
    (``delta_norm``, ``test_acc``), or an ``initial_``/``final_`` column of the runs
    table. A test-set statistic of a run without a test set is not recorded; columns
    that are not the evaluation's (timing, config) always are."""
    base = key.removeprefix("final_").removeprefix("initial_")
    if base != key and base not in EVAL_KEYS:
        return True
    if base.startswith("test_") and base in EVAL_KEYS:
        # accuracy is finite whenever a test set exists, even on a diverged net
        seeds = run.summary.get("per_seed") or []
        has_test = any(s.get(when, {}).get("test_acc") is not None
                       for s in seeds for when in ("initial", "final"))
        if not has_test and base == key and "test_acc" in run.metrics:
            has_test = bool(np.isfinite(np.asarray(run.metrics["test_acc"],
                                                   np.float64)).any())
        if not has_test:
            return False
    return base != key or key in run.metrics


def _recorded_lines(lines: Sequence[Line], key: str) -> tuple[list[Line | None], str]:
    """Each line cut to its runs that recorded ``key`` (None for a line with none), and
    a note naming the lines, or the runs of a line, that did not: "not recorded in:
    act=relu; act=tanh [run 3] (delta_norm)". The note is "" when every run recorded
    ``key``, and also when none did (the figure says that in its own way)."""
    kept: list[Line | None] = []
    missing: list[str] = []
    for line in lines:
        flags = [recorded(r, key) for r in line.runs]
        runs = [r for r, f in zip(line.runs, flags, strict=True) if f]
        kept.append(dataclasses.replace(line, runs=runs) if runs else None)
        if not all(flags):
            names = [r.name for r, f in zip(line.runs, flags, strict=True) if not f]
            missing.append(line.label if not runs else
                           f"{line.label} [run{'s' if len(names) > 1 else ''} "
                           f"{', '.join(names)}]")
    if not missing or all(line is None for line in kept):
        return kept, ""
    named = "; ".join(missing[:MAX_NAMED])
    if len(missing) > MAX_NAMED:
        named += f" and {len(missing) - MAX_NAMED} more"
    return kept, f"not recorded in: {named} ({key})"


def _category_lines(sweep: Sweep, ended: pd.DataFrame, columns: Sequence[str],
                    axes: Sequence[str]) -> dict[tuple[str, ...], Line]:
    """The runs of each category (a bar, a heatmap cell) as a Line labelled
    ``axis=value, ...``, keyed by the category's values (``columns`` of ``ended``)."""
    out: dict[tuple[str, ...], Line] = {}
    for _, row in ended.drop_duplicates("run").iterrows():
        key = tuple(str(row[c]) for c in columns)
        label = ", ".join(f"{a}={v}" for a, v in zip(axes, key, strict=True))
        out.setdefault(key, Line(label, [], None)).runs.append(sweep.run(row["run"]))
    return out


def _stack_ragged(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate [S_i, T_i] arrays along seeds, NaN-padding T to the longest."""
    width = max(p.shape[1] for p in parts)
    return np.concatenate([np.pad(p.astype(np.float64), ((0, 0), (0, width - p.shape[1])),
                                  constant_values=np.nan) for p in parts])


def _by_depth(lines: list[Line]) -> list[Line]:
    """Split each line by number of layers when depths differ within it: averaging
    layer k of nets of different depths would mean nothing."""
    out = []
    for line in lines:
        depths: dict[int, list[Run]] = {}
        for r in line.runs:
            depths.setdefault(len(r.metrics["layer_names"]), []).append(r)
        if len(depths) == 1:
            out.append(line)
        else:
            out += [Line(f"{line.label}, {n} layers", rs, line.color, STYLES[i % len(STYLES)])
                    for i, (n, rs) in enumerate(sorted(depths.items()))]
    return out


def _profile_rows(runs: list[Run], key: str, at: str) -> np.ndarray | None:
    """[runs x seeds, L] per-layer values at the first step, or averaged over the last
    tenth of the recorded steps (NaN for a seed that diverged)."""
    rows = []
    for run in runs:
        if key not in run.metrics:
            return None
        v = np.asarray(run.metrics[key], np.float64)  # [S, T, L]
        if at == "init":
            rows.append(v[:, 0])
        else:
            tail = max(1, v.shape[1] // 10)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a diverged seed: all NaN
                rows.append(np.nanmean(v[:, -tail:], axis=1))
    return np.concatenate(rows)


def _seeds_of(lines: list[Line]) -> int:
    counts = [sum(len(r.rows()) for r in line.runs) for line in lines]
    return min(counts) if counts else 0


#: The config keys the mean-field prediction of a run depends on.
THEORY_KEYS = ("model", "act", "init", "bias_init", "depth", "bn", "data")


@dataclass
class Prediction:
    """Mean-field theory of a net at initialisation: ||delta_l|| / ||delta_output|| for
    the Dense layers (output last), the gradient factor chi_1 per layer at the fixed
    point, and the gradient depth scale -1 / ln chi_1."""

    delta_ratio: np.ndarray
    chi: float
    depth_scale: float


def theory_prediction(run: Run) -> Prediction | str:
    """The mean-field prediction for a run's config (Poole et al. 2016; Schoenholz et al.
    2017: ``vgrad.theory``), or why there is none: the theory is for wide MLPs without
    batch norm, with an elementwise activation, a zero-mean fan-in-scaled kernel
    initializer and a zero-mean bias initializer, and is averaged over the run's own
    training inputs."""
    return _prediction(_theory_config(run))


def _theory_config(run: Run) -> str:
    """The part of a run's config the prediction depends on, as canonical JSON."""
    return json.dumps({k: run.config.get(k) for k in THEORY_KEYS}, sort_keys=True,
                      default=str)


def theory_inputs(config: DictConfig) -> tuple | str:
    """(activation, sigma_w^2, sigma_b^2) of a run config the mean-field theory describes,
    or why it does not: plain MLPs without batch norm, an elementwise activation, a
    fan-in-scaled zero-mean kernel initializer and a zero-mean Gaussian or zero bias."""
    from vgrad import theory

    model = config.get("model")
    if model is not None and model.name != "mlp":
        return f"model={model.name} (the theory drawn is for plain MLPs)"
    if config.get("bn") not in (None, "none"):
        return "batch norm"
    try:
        return (theory.activation(config.act), theory.sigma_w2_of(config.init),
                theory.sigma_b2_of(config.bias_init))
    except (ValueError, KeyError, AttributeError) as exc:
        return str(exc).split(";")[0]


@functools.lru_cache(maxsize=256)
def _prediction(config_json: str) -> Prediction | str:
    from omegaconf import OmegaConf

    from vgrad import data, theory
    from vgrad.errors import ConfigError

    cfg = OmegaConf.create(json.loads(config_json))
    inputs = theory_inputs(cfg)
    if isinstance(inputs, str):
        return inputs
    act, sigma_w2, sigma_b2 = inputs
    try:
        x = data.load(cfg.data).x_train
    except (ConfigError, OSError) as exc:
        return str(exc).split(";")[0]
    q = theory.q_star(act, sigma_w2, sigma_b2)
    return Prediction(theory.mean_delta_profile(act, int(cfg.depth), sigma_w2, sigma_b2, x),
                      theory.chi(act, q, sigma_w2),
                      theory.gradient_depth_scale(act, sigma_w2, sigma_b2))


def _depth_scale_text(pred: Prediction) -> str:
    """The depth scale xi = -1 / ln chi_1 in words: E||delta||^2 changes e-fold every
    |xi| layers, shrinking towards the input below chi_1 = 1 and growing above."""
    if abs(pred.chi - 1.0) < 1e-6:
        return "critical (E‖δ‖² flat across layers)"
    way = "shrinks" if pred.chi < 1 else "grows"
    return f"E‖δ‖² {way} e-fold every {abs(pred.depth_scale):.3g} layers"


def _draw_theory(ax, lines: list[Line], measured: list[np.ndarray | None]) -> str:
    """Draw each line's mean-field delta profile (dotted, in the line's colour), scaled
    to the measured median at the output layer; return the note that says what was
    drawn and, for the lines without a prediction, why."""
    drawn, missing = [], {}
    for line, values in zip(lines, measured, strict=True):
        configs = {_theory_config(r) for r in line.runs}
        pred = (theory_prediction(line.runs[0]) if len(configs) == 1
                else "the line pools nets the theory tells apart")
        if isinstance(pred, str) or values is None:
            missing.setdefault(pred if isinstance(pred, str) else "not recorded",
                               []).append(line.label)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            anchor = np.nanmedian(values[:, -1])
        if not np.isfinite(anchor) or len(pred.delta_ratio) != values.shape[1]:
            missing.setdefault("no finite output-layer delta", []).append(line.label)
            continue
        ax.plot(np.arange(len(pred.delta_ratio)), anchor * pred.delta_ratio, color=line.color,
                linestyle=":", linewidth=1.2, marker="o", markersize=3.5,
                markerfacecolor="white", zorder=3, label=f"{line.label} (mean-field theory)")
        drawn.append(f"{line.label}: χ₁ = {pred.chi:.3g}, {_depth_scale_text(pred)}")
    parts = []
    if drawn:
        parts.append("open circles (δ at step 0): mean-field theory for infinite width, "
                     "scaled to the measured output layer")
        parts += drawn
    if len(missing) == 1 and not drawn:
        parts.append(f"no mean-field prediction: {next(iter(missing))}")
    else:
        parts += [f"no mean-field prediction for {', '.join(labels)} ({why})"
                  for why, labels in missing.items()]
    return "\n".join(parts)


def profile(sweep: Sweep, hue: str, keys: Sequence[str] = ("grad_norm", "delta_norm"),
            theory: bool = True) -> Figure:
    """The vanishing profile: per-layer norms against layer index, one line per value.
    With ``theory``, the delta panel at step 0 also draws the mean-field prediction of
    each line where the theory applies, and says where it does not."""
    how = split(sweep, hue)
    lines = _by_depth(how.lines)
    if len(lines) > len(how.lines):  # nets of different depths got lines of their own
        how.pooled = "; ".join(p for p in how.pooled.removeprefix("pooled over ").split("; ")
                               if not p.startswith(SHAPE_AXES))
        how.pooled = f"pooled over {how.pooled}" if how.pooled else ""
    labels = {"grad_norm": "‖∂L/∂W_l‖", "delta_norm": "mean ‖δ_l‖"}
    fig, ax = _figure(len(keys), 2, width=8.0, height=2.8, sharex=False)
    n_layers = max((len(r.metrics["layer_names"]) for line in lines for r in line.runs),
                   default=1)
    theory_note, missing = "", []
    for row, key in enumerate(keys):
        kept, note = _recorded_lines(lines, key)
        missing.append(note)
        for col, at in enumerate(("init", "end")):
            a = ax[row, col]
            drawn = False
            measured = []
            for line in kept:
                values = None if line is None else _profile_rows(line.runs, key, at)
                measured.append(values)
                if values is None:
                    continue
                x = np.arange(values.shape[1])
                drawn |= _band(a, x, values, line.color, line.label, log=True,
                               style=line.style)[1]
            if all(line is None for line in kept):
                _note(a, f"{key} was not recorded in these runs")
                continue
            if theory and key == "delta_norm" and at == "init":
                theory_note = _draw_theory(a, lines, measured)
            when = "at step 0" if at == "init" else "(last 10% of steps)"
            a.set(title=f"{labels.get(key, key)} {when}", xlabel="layer (0 = next to the input)",
                  ylabel=labels.get(key, key))
            _log_scale(a, drawn, labels.get(key, key))
            a.set_xticks(range(n_layers) if n_layers <= 16 else
                         np.linspace(0, n_layers - 1, 9).round().astype(int))
    _legend_below(fig, ax, ncols=4, skip="(mean-field theory)")
    runs = [r for line in lines for r in line.runs]
    _suptitle(fig, f"Gradient profile across layers by {hue}", how.pooled,
              _seed_note(_seeds_of(lines)), _diverged_note(runs), *missing, theory_note)
    return fig


def time_profile(sweep: Sweep, hue: str) -> Figure | None:
    """Recurrent nets: the top recurrent layer's ||dL/dh_t|| against the time step t, one
    line per value of ``hue`` (bands over seeds), at the first step and late in training;
    None when no run recorded it. Runs of different sequence lengths share the x axis
    counted back from the loss (T - t), so their vanishing rates compare directly."""
    how = split(sweep, hue)
    kept, missing = _recorded_lines(how.lines, "time_delta_norm")
    lines = [line for line in kept if line is not None]
    if not lines:
        return None
    fig, ax = _figure(1, 2, width=8.0, height=3.0, sharex=False)
    for col, at in enumerate(("init", "end")):
        a, drawn = ax[0, col], False
        for line in lines:
            for length, runs in _by_length(line.runs).items():
                rows = np.concatenate([_time_rows(r.metrics, at) for r in runs])
                label = line.label if len(_by_length(line.runs)) == 1 else \
                    f"{line.label}, T={length}"
                drawn |= _band(a, np.arange(length)[::-1], rows, line.color, label,
                               log=True, style=line.style)[1]
        _log_scale(a, drawn, "‖∂L/∂h_t‖")
        when = "at step 0" if at == "init" else "(last 10% of steps)"
        a.set(title=f"mean ‖∂L/∂h_t‖ {when}", xlabel="steps back from the loss, T − t",
              ylabel="‖∂L/∂h_t‖")
    _legend_below(fig, ax, ncols=3)
    runs = [r for line in lines for r in line.runs]
    _suptitle(fig, f"Gradient through time by {hue} (top recurrent layer)", how.pooled,
              _seed_note(_seeds_of(lines)), _diverged_note(runs), missing)
    return fig


def _by_length(runs: list[Run]) -> dict[int, list[Run]]:
    out: dict[int, list[Run]] = {}
    for r in runs:
        if "time_delta_norm" in r.metrics:
            out.setdefault(r.metrics["time_delta_norm"].shape[-1], []).append(r)
    return out


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


def _pooled_note(runs: pd.DataFrame, named: Sequence[str]) -> str:
    """'pooled over a (..); b (..)' for the varying axes not in ``named``."""
    ended = runs[runs["status"] != "failed"].drop_duplicates("run")
    cols = {axis_column(runs, a) for a in named}
    pooled = [a for a in varying_axes(ended) if axis_column(runs, a) not in cols]
    if not pooled:
        return ""
    parts = [f"{a} ({', '.join(_ordered(ended[axis_column(runs, a)]))})" for a in pooled]
    return "pooled over " + "; ".join(parts)


def heatmap(sweep: Sweep, x: str, y: str, metric: str | None = None) -> Figure:
    """A final metric over two axes (the median over the seeds and runs of a cell);
    cells where a seed diverged are marked with the number of diverged seeds."""
    runs = sweep.runs
    metric = _final_metric(sweep, metric or default_metric(sweep))
    cx, cy = axis_column(runs, x), axis_column(runs, y)
    ended = runs[runs["status"] != "failed"].assign(
        _x=lambda d: d[cx].astype(str), _y=lambda d: d[cy].astype(str))
    xs, ys = _ordered(ended["_x"]), _ordered(ended["_y"])
    grid = ended.pivot_table(index="_y", columns="_x", values=metric, aggfunc="median",
                             dropna=False).reindex(index=ys, columns=xs)
    diverged = ended.pivot_table(index="_y", columns="_x", values="diverged", aggfunc="sum",
                                 dropna=False).reindex(index=ys, columns=xs)
    cells = _category_lines(sweep, ended, ("_y", "_x"), (y, x))
    kept, missing = _recorded_lines(list(cells.values()), metric)
    absent = {k for k, line in zip(cells, kept, strict=True) if line is None}
    fig, ax = _figure(1, 1, width=1.1 * len(xs) + 2.5, height=0.6 * len(ys) + 1.8)
    a = ax[0, 0]
    values = grid.to_numpy(np.float64)
    finite = values[np.isfinite(values)]
    image = a.imshow(np.where(np.isfinite(values), values, np.nan), cmap="viridis",
                     aspect="auto", vmin=finite.min() if finite.size else 0,
                     vmax=finite.max() if finite.size else 1)
    a.set_xticks(range(len(xs)), xs)
    a.set_yticks(range(len(ys)), ys)
    a.grid(False)
    middle = np.median(finite) if finite.size else 0.0
    for i in range(len(ys)):
        for j in range(len(xs)):
            value, n_div = values[i, j], diverged.iat[i, j]
            text = "—" if not np.isfinite(value) else f"{value:.3g}"
            if not np.isfinite(value) and (ys[i], xs[j]) in absent:
                text = "not\nrecorded"
            if n_div and n_div > 0:
                text += f"\n{int(n_div)} diverged"
            a.text(j, i, text, ha="center", va="center", fontsize=8,
                   color="white" if not np.isfinite(value) or value < middle else "black")
    notes = [f"{metric.replace('_', ' ')} (median over seeds)"]
    for axis, n in ((y, len(ys)), (x, len(xs))):
        if n == 1:
            notes.append(f"{axis} was not swept: one value")
    a.set(xlabel=x, ylabel=y, title="\n".join(
        notes + [n for n in [_pooled_note(runs, (x, y)), missing] if n]))
    fig.colorbar(image, ax=a, label=metric.replace("_", " "))
    return fig


def bars(sweep: Sweep, x: str, metrics: Sequence[str] = ("final_train_acc", "final_test_acc")
         ) -> Figure:
    """Final metrics per value of an axis: bars are the median over seeds (and over any
    pooled axis, named in the title), whiskers the interquartile range."""
    runs = sweep.runs
    cx = axis_column(runs, x)
    ended = runs[runs["status"] != "failed"].assign(_x=lambda d: d[cx].astype(str))
    present = [m for m in metrics if m in ended and ended[m].notna().any()]
    order = _ordered(ended["_x"])
    fig, ax = _figure(1, 1, width=max(4.0, 0.9 * len(order) + 2), height=3.2)
    a = ax[0, 0]
    if not present:
        _note(a, "no finite final metric: every run diverged or failed")
        return fig
    width = 0.8 / len(present)
    colors = palette(len(present))
    categories = list(_category_lines(sweep, ended, ("_x",), (x,)).values())
    missing = [_recorded_lines(categories, m)[1] for m in present]
    for i, m in enumerate(present):
        q = ended.groupby("_x", sort=False)[m].quantile([0.25, 0.5, 0.75]).unstack()
        q = q.reindex(order)
        pos = np.arange(len(order)) + (i - (len(present) - 1) / 2) * width
        median = q[0.5].to_numpy(np.float64)
        err = np.stack([median - q[0.25].to_numpy(np.float64),
                        q[0.75].to_numpy(np.float64) - median])
        a.bar(pos, np.nan_to_num(median), width, yerr=np.nan_to_num(err), capsize=2,
              label=m.replace("final_", "").replace("_", " "), color=colors[i])
    a.set_xticks(range(len(order)), order)
    is_acc = all("acc" in m for m in present)
    if is_acc:
        a.set_ylim(0, 1.02)
    what = " and ".join(m.replace("final_", "").replace("_", " ") for m in present)
    n_seeds = ended.groupby("_x", sort=False).size().min()
    a.set(xlabel=x, ylabel="accuracy" if is_acc else "value", title="\n".join(
        n for n in [f"Final {what} by {x}: median of {n_seeds}+ seeds, whiskers: "
                    "interquartile range", _pooled_note(runs, (x,)), *missing] if n))
    a.legend()
    return fig


def _curve_axis(runs: Sequence[Run], metric: str) -> str:
    """"epoch" or "step": the axis ``metric`` is recorded along, one value per seed
    (from the runs' ``summary.json``). Raises ValueError for a metric no run recorded,
    or one with more axes (per layer, per bin), naming the metrics ``curves`` draws."""
    scalars: dict[str, str] = {}
    dims_of: dict[str, list] = {}
    for run in runs:
        for key, dims in (run.summary.get("arrays") or {}).items():
            dims_of.setdefault(key, list(dims))
            if list(dims) in (["seed", "epoch"], ["seed", "step"]):
                scalars.setdefault(key, dims[1])
    if metric in scalars:
        return scalars[metric]
    by_axis = {axis: ", ".join(sorted(k for k, a in scalars.items() if a == axis))
               for axis in ("epoch", "step")}
    accepts = (f"curves draws one value per seed and epoch ({by_axis['epoch'] or 'none'}) "
               f"or per seed and step ({by_axis['step'] or 'none'})")
    if metric in dims_of:
        raise ValueError(f"{metric!r} has axes {dims_of[metric]}, not one value per epoch "
                         f"or step (profile and the run figures draw per-layer "
                         f"statistics); {accepts}")
    raise ValueError(f"no run recorded a metric {metric!r}; {accepts}")


def curves(sweep: Sweep, hue: str, metric: str = "train_loss") -> Figure | None:
    """A per-epoch metric (default training loss: ``train_loss``, ``test_acc``, ...) or a
    per-step one (``grad_global_norm``, ``loss``: on a log axis if it is a norm) per
    value of an axis; None when the sweep has no run that ended. Raises ValueError for a
    metric no run recorded or that is not one value per epoch or step."""
    how = split(sweep, hue)
    every = [r for line in how.lines for r in line.runs]
    if not every:
        return None
    axis = _curve_axis(every, metric)
    kept, missing = _recorded_lines(how.lines, metric)
    lines = [line for line in kept if line is not None]
    what = metric.replace("_", " ")
    fig, ax = _figure(1, 1, width=6.4, height=3.2)
    a = ax[0, 0]
    log = "norm" in metric
    drawn, block = False, 1
    for line in lines:
        values = _stack_ragged([r.metrics[metric] for r in line.runs])
        x = max((r.metrics[axis] for r in line.runs), key=len)
        b, d = _band(a, x, values, line.color, line.label, log=log, style=line.style)
        drawn, block = drawn or d, max(block, b)
    if not lines:
        why = " (no run has a test set)" if metric.startswith("test_") else ""
        _note(a, f"{what} was not recorded in these runs{why}")
    elif log:
        _log_scale(a, drawn, what)
    elif not drawn:
        _note(a, f"no finite {what}: every run diverged")
    a.set(xlabel="epoch (0 = initialisation)" if axis == "epoch" else "step",
          ylabel=what,
          title="\n".join(n for n in [
              f"{what} by {hue}", how.pooled,
              _seed_note(_seeds_of(lines), block),
              _diverged_note([r for line in lines for r in line.runs]), missing] if n))
    if drawn:
        a.legend()
    return fig


# --- output -----------------------------------------------------------------------------------


def save(fig: Figure, stem: str | Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` (the whole name kept: dots are not suffixes);
    close the figure. Each file is rendered in memory and written whole or not at all
    (``store.atomic_write``); a symbolic link at any of the paths is refused
    (``store.LinkRefused``) before anything is written, never written through."""
    stem = Path(stem)
    paths = [stem.parent / f"{stem.name}.{ext}" for ext in formats]
    try:
        for path in paths:
            store.refuse_link(path)
        stem.parent.mkdir(parents=True, exist_ok=True)
        for ext, path in zip(formats, paths, strict=True):
            buf = io.BytesIO()
            fig.savefig(buf, format=ext)
            store.atomic_write(path, buf.getvalue())
    finally:
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
