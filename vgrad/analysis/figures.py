"""The sources' figures, and more, from run folders (matplotlib).

Per run (a :class:`~vgrad.analysis.tables.Run`; each takes ``varying``, the sweep's
varying axes, to name the run by them: see "Names" below):
  ``gradients``   mean and std of each layer's kernel gradient over steps, and the loss
                  (the figure of "Visualizing the vanishing gradient problem"; std on a
                  log axis)
  ``weights``     mean and std of each layer's kernel over epochs (visualize preset)
  ``learning_speed``  ||dC/db_l|| per layer over training (Nielsen's chapter 5)
  ``histograms``  fixed-bin log10|gradient| histograms per layer over epochs, pooled
                  over seeds ("How ReLU avoids vanishing gradients", its TensorBoard view);
                  the x range is the fixed bins' range, the same for every run
  ``saturation``  saturated and dead fractions per hidden layer over epochs (for LSTM and
                  GRU: of the gate the cell records, named in the panel titles)
  ``signal``      the forward signal q^l, c^l across layers (opt-in probes)
  ``through_time``  recurrent nets: ||dL/dh_t|| against T - t, and the recurrent spectrum

Per sweep (a :class:`~vgrad.analysis.tables.Sweep`):
  ``profile``     per-layer gradient norm and delta norm against layer index, at
                  initialisation and at the end, one line per value of an axis; a panel
                  only for what was recorded; None for recurrent nets of one recurrent
                  layer (two points: ``time_profile`` is their profile)
  ``time_profile``  recurrent nets: ||dL/dh_t|| against T - t, the steps back from the loss
  ``heatmap``     a final metric over two axes (median over seeds), diverged runs marked
  ``bars``        final accuracy (the loss, on a log axis, for a regression task) per value
                  of an axis and, grouped, per value of a second varying axis: median and
                  interquartile range over seeds
  ``curves``      a per-epoch metric per value of an axis (the activations book chapter,
                  Figs. 5.15, 5.17), or a per-step one (``grad_global_norm``, ``loss``),
                  or one layer of a per-layer one (``update_ratio``, ``layer=0``)
``SWEEP_FIGURES`` registers the sweep figures (and the theory figures of
``theory_figures``) with when each applies; ``sweep_figures(sweep)`` draws those that do,
for the report and the command line.

**Names.** A figure names runs by what varies: a sweep figure's lines and bars by the
sweep's axes (``act=tanh``, ``depth=10``), with math names where there is one (σ_w², σ_b²,
α, T, lr: ``AXIS_NAMES``), and its suptitle gives the settings its runs share, once. A
run figure drawn for a sweep (``varying=figures.varying_axes(sweep.runs)``) is titled
by the run's values of those axes, then the settings it does not vary and the run's
folder; without ``varying`` by its key settings (model and its branch scale, activation,
initializers with their σ_w²/σ_b², depth, width, clipping, optimizer, data), so that runs
that differ are never titled alike (``run_label``).

Each function returns a Figure, or None when the runs did not record what it needs; a
missing panel within a figure is replaced by a note. With several seeds, lines are the
mean over seeds (the geometric mean on log axes) and bands span min to max; from five
seeds on, lines are the median and bands the interquartile range. Long step axes are
averaged over blocks of steps (the caption says how many) so that trends stay readable.

**Titles fit, notes go below.** A suptitle is short (what, by which axes, and the shared
settings); what a reader needs to read the figure right (what a line or bar is a median
of, what was pooled, which seeds diverged, which runs did not record a panel) is a
caption below the axes, inside the figure: every text of a figure lies within its bounds.

**Nothing is pooled silently.** A sweep figure draws one line per value of its axis
(colour) and, when a second axis varies, per value of that one too (line style; bars:
grouped bars by colour); any further axis that varies is pooled and the caption names it
with its values and says how many configurations and seeds each line or bar pools.
Categories keep the order of the sweep. Runs that did not record a statistic a panel
draws (other probes, no test set) while other runs did are named in a note ("not
recorded in: act=relu (delta_norm)"), never just left out. **Nothing breaks on exploded
runs**: what is finite is drawn, and a note says which seeds diverged, or that a
log-scaled panel has no positive finite value (all zero, vanished, or diverged); values
that are exactly zero (a ReZero net's branch gradients at step 0) are marked with ▼ at
the bottom of a log axis and named in the caption. **Baselines**: accuracy panels draw
chance (1 / number of classes), a regression task's loss panels the loss of predicting
the mean (the variance of the target: 1/6 for the adding problem). Colours: layers on
the sequential, colour-blind-safe viridis scale (input side dark; a colour bar instead
of a legend from 13 layers on); categories in the Okabe-Ito palette, then a longer one,
never repeated within a figure.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from vgrad import store  # noqa: E402
from vgrad.analysis.tables import Run, Sweep, axis_column, flatten  # noqa: E402

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
#: Font sizes of suptitles and captions (points).
TITLE_SIZE, CAPTION_SIZE = 9, 8
#: A generous average glyph width of DejaVu Sans, in ems: what wrapping counts with.
GLYPH_EM = 0.62


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
    """Write ``text`` in the middle of ``ax`` (clearing its ticks when it is empty),
    wrapped to the width of the axes."""
    width = ax.get_position().width * ax.figure.get_figwidth()
    ax.text(0.5, 0.5, _wrap(text, 0.9 * width, 9), ha="center", va="center",
            transform=ax.transAxes, fontsize=9, color="0.4")
    if clear:
        ax.set_xticks([])
        ax.set_yticks([])


# --- names -----------------------------------------------------------------------------------

#: How titles and legends name a config key: (math text for figures, plain text for
#: pages). Keys not listed are named by themselves (``act``, ``depth``, ``data.test_size``).
AXIS_NAMES: dict[str, tuple[str, str]] = {
    "init.sigma_w2": (r"$\sigma_w^2$", "σ_w²"),
    "bias_init.sigma_b2": (r"$\sigma_b^2$", "σ_b²"),
    "init.std": (r"std$(W)$", "std(W)"),
    "init.gain": ("gain", "gain"),
    "bias_init.std": (r"std$(b)$", "std(b)"),
    "bias_init.value": (r"$b$", "b"),
    "model.alpha": (r"$\alpha$", "α"),
    "model.skip": ("skip", "skip"),
    "model.norm": ("norm", "norm"),
    "model.alpha_init": (r"$\alpha_0$", "α₀"),
    "model.recurrent_init": (r"$W_{hh}$ init", "W_hh init"),
    "model.recurrent_scale": (r"$W_{hh}$ scale", "W_hh scale"),
    "model.forget_bias": (r"$b_f$", "b_f"),
    "optim.lr": ("lr", "lr"),
    "optim.momentum": ("momentum", "momentum"),
    "data.length": (r"$T$", "T"),
    "clip.max": ("clip max", "clip max"),
    "batch_size": ("batch", "batch"),
}
#: How values of some keys read (by their text): ReZero rather than "rezero".
VALUE_NAMES: dict[str, dict[str, str]] = {
    "model.alpha": {"one": "1", "rezero": "ReZero", "skipinit": "SkipInit",
                    "fixup": "Fixup", "inv_sqrt_depth": "1/√depth"},
    "model.skip": {"True": "on", "False": "off"},
}


def _key(axis: str) -> str:
    """A sweep axis as a config key: ``act.name`` is the group ``act``."""
    return axis[: -len(".name")] if axis.endswith(".name") else axis


def axis_name(axis: str, math: bool = True) -> str:
    """How figures (``math``) or pages name a sweep axis: σ_w² for ``init.sigma_w2``."""
    key = _key(axis)
    names = AXIS_NAMES.get(key)
    return key if names is None else names[0 if math else 1]


def value_text(axis: str, value: object) -> str:
    """A value of a sweep axis as figures show it (``ReZero`` for ``rezero``)."""
    text = str(value)
    return VALUE_NAMES.get(_key(axis), {}).get(text, text)


def label(axis: str, value: object, math: bool = True) -> str:
    """``axis=value`` with the axis's math name: ``$\\sigma_w^2$=1.5``, ``act=tanh``."""
    return f"{axis_name(axis, math)}={value_text(axis, value)}"


#: The settings a run is named by when no sweep says what varies, in this order
#: ("group.*": the parameters of the group's choice), and values that go unsaid.
SETTINGS = ("model", "model.*", "act", "act.*", "init", "init.*", "bias_init", "bias_init.*",
            "depth", "width", "widths", "bn", "clip", "clip.*", "optim", "optim.lr", "loss",
            "data", "data.length")
QUIET = {"model": "mlp", "bias_init": "zeros", "clip": "none", "bn": "none", "widths": None,
         "init.mean": 0.0, "bias_init.mean": 0.0, "init.distribution": "normal",
         "init.mode": "fan_in", "model.norm": "none", "model.block_dense": 1,
         "model.recurrent_scale": 1.0, "model.forget_bias": 1.0, "model.alpha_init": 0.0}


def settings(config: dict) -> list[tuple[str, object]]:
    """A run's key settings as (config key, value), in the order of ``SETTINGS``."""
    flat = flatten(config)
    out: list[tuple[str, object]] = []
    for entry in SETTINGS:
        if entry.endswith(".*"):
            group = entry[:-2]
            if QUIET.get(group, "") == flat.get(f"{group}.name"):
                continue  # a choice that goes unsaid says nothing of its parameters
            keys = [k for k in flat if k.startswith(f"{group}.") and k != f"{group}.name"]
        else:
            keys = [f"{entry}.name" if f"{entry}.name" in flat else entry]
        for k in keys:
            if k in flat and not (_key(k) in QUIET and QUIET[_key(k)] == flat[k]) \
                    and flat[k] is not None:
                out.append((_key(k), flat[k]))
    return out


def _excluded(key: str, axes: Sequence[str]) -> bool:
    return any(key == _key(a) or key.startswith(_key(a) + ".") for a in axes)


def axis_value(run: Run, axis: str) -> object:
    """A run's value of a sweep axis (its config: ``act`` is ``act.name``)."""
    flat = flatten(run.config)
    for candidate in (axis, f"{axis}.name"):
        if candidate in flat:
            return flat[candidate]
    return "—"


def run_label(run: Run, varying: Sequence[str] | None = None, math: bool = True) -> str:
    """What a run is called: its values of ``varying`` (a sweep's varying axes, as
    ``varying_axes`` gives them) with math names ("σ_w²=2.0, depth=30"); without, or
    when none varies, its key settings (``settings``) — model and branch scale,
    activation, initializers with σ_w²/σ_b², depth, width, clipping, optimizer, data.
    ``math``: matplotlib math text (figures) or plain Unicode (pages)."""
    if varying:
        return ", ".join(label(a, axis_value(run, a), math) for a in varying)
    return ", ".join(label(k, v, math) for k, v in settings(run.config))


def constants_label(runs: Sequence[Run], exclude: Sequence[str] = (), math: bool = True) -> str:
    """The key settings every one of ``runs`` shares, less the keys under ``exclude``:
    what a figure says once instead of in every label."""
    if not runs:
        return ""
    common = [kv for kv in settings(runs[0].config) if not _excluded(kv[0], exclude)]
    for run in runs[1:]:
        theirs = {k: str(v) for k, v in settings(run.config)}
        common = [(k, v) for k, v in common if theirs.get(k) == str(v)]
    return ", ".join(label(k, v, math) for k, v in common)


@functools.lru_cache(maxsize=4096)
def _width_pt(text: str, size: float) -> float:
    """How wide ``text`` draws at ``size`` points, in points (math text where ``$``
    pairs say so)."""
    from matplotlib.font_manager import FontProperties

    renderer = _measurer()
    math = text.count("$") >= 2 and text.count("$") % 2 == 0
    try:
        width, _, _ = renderer.get_text_width_height_descent(
            text, FontProperties(size=size), ismath=math)
    except ValueError:  # math text matplotlib cannot parse: a generous guess
        width = len(text) * GLYPH_EM * size
    return float(width)


@functools.lru_cache(maxsize=1)
def _measurer():
    """A 72-dpi renderer: text widths in points."""
    from matplotlib.backends.backend_agg import RendererAgg

    return RendererAgg(10, 10, 72)


def _wrap(text: str, width_in: float, size: float) -> str:
    """``text`` broken at spaces into lines that fit ``width_in`` inches at ``size``
    points (measured as matplotlib draws them); never inside ``$math$``."""
    limit = width_in * 72
    out = []
    for line in text.split("\n"):
        current = ""
        for word in re.findall(r"(?:\$[^$]*\$|[^\s$])+", line):
            longer = f"{current} {word}" if current else word
            if current and _width_pt(longer, size) > limit:
                out.append(current)
                current = word
            else:
                current = longer
        out.append(current)
    return "\n".join(out)


def _grow(fig: Figure, inches: float) -> None:
    """Make the figure taller by ``inches``, so that what is added keeps the panels'
    size."""
    width, height = fig.get_size_inches()
    fig.set_size_inches(width, height + inches)


def _lines_height(n: int, size: float) -> float:
    """Inches that ``n`` lines of text at ``size`` points take."""
    return n * size * 1.25 / 72


def _suptitle(fig: Figure, *lines: str) -> None:
    """A short title over the figure (lines wrapped to its width; the figure grows by
    the lines after the first)."""
    text = _wrap("\n".join(line for line in lines if line), fig.get_figwidth() - 0.3,
                 TITLE_SIZE)
    if not text:
        return
    fig.suptitle(text, fontsize=TITLE_SIZE)
    _grow(fig, _lines_height(text.count("\n"), TITLE_SIZE))


def _caption(fig: Figure, *lines: str, ax=None) -> None:
    """Notes below the figure, inside its bounds: the figure grows by their height and
    the layout keeps clear of them; a legend below the panels (``_legend_below``) moves
    into the same strip, above the notes. The text belongs to ``ax`` (default: the first
    axes) so that it travels with the figure's texts; call once per figure, last."""
    lines = [line for line in lines if line]
    if not lines or not fig.axes:
        return
    width, height = fig.get_size_inches()
    text = _wrap("\n".join(lines), width - 0.3, CAPTION_SIZE)
    below = [g for g in fig.legends if g._outside_loc == "lower"]
    renderer = fig.canvas.get_renderer()
    legends = sum(g.get_window_extent(renderer).height / fig.dpi + 0.04 for g in below)
    notes = _lines_height(text.count("\n") + 1, CAPTION_SIZE) + 8 / 72
    grown = sum(getattr(g, "_vgrad_grown", 0.0) for g in below)
    height = max(height + legends + notes - grown, height)
    fig.set_size_inches(width, height)
    extra = legends + notes
    fig.get_layout_engine().set(rect=(0, extra / height, 1, 1 - extra / height))
    top = extra - 0.02
    for legend in below:  # out of the layout's hands: placed in the strip
        legend.set_loc("upper center")
        legend.set_bbox_to_anchor((width / 2, top), transform=fig.dpi_scale_trans)
        top -= legend.get_window_extent(renderer).height / fig.dpi + 0.04
    owner = ax if ax is not None else fig.axes[0]
    note = owner.text(0.12, top - 0.02, text, transform=fig.dpi_scale_trans, ha="left",
                      va="top", fontsize=CAPTION_SIZE, color="0.3")
    note.set_in_layout(False)


def _run_title(fig: Figure, what: str, run: Run, varying: Sequence[str] | None,
               *lines: str) -> None:
    """A run figure's suptitle: what it shows and the run's name (by ``varying``), then
    the settings the name leaves out and the run's folder."""
    status = "" if run.status == "completed" else f" [{run.status}]"
    shared = constants_label([run], varying or ()) if varying else ""
    _suptitle(fig, f"{what} — {run_label(run, varying)}{status}",
              ", ".join(p for p in (shared, f"run {run.name}") if p), *lines)


def _title(run: Run) -> str:
    """A run's name without a sweep (its key settings)."""
    return run_label(run)


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
#: The marker of values that are exactly zero on a log axis.
ZERO_MARK = "▼"


def _mark_zeros(ax, x: np.ndarray, zero: np.ndarray, color, label: str,
                drawn: bool) -> None:
    """Mark with ZERO_MARK, at the bottom of a log axis, the points ``x[zero]`` where a
    line's value is exactly zero (no place on a log axis), and remember the line's label
    for the caption (``_zero_note``)."""
    if not zero.any():
        return
    xs = np.asarray(x, np.float64)[zero]
    if len(xs) > MAX_POINTS:
        xs = xs[:: int(np.ceil(len(xs) / MAX_POINTS))]
    ax.scatter(xs, np.full(len(xs), 0.02), marker="v", s=14, color=color, clip_on=False,
               transform=ax.get_xaxis_transform(), zorder=4,
               label=None if drawn else label)
    ax.update_datalim(np.column_stack([xs, np.zeros(len(xs))]), updatey=False)
    ax.autoscale_view()
    zeros = ax.__dict__.setdefault("_vgrad_zeros", [])
    if label not in zeros:
        zeros.append(label)


def _zero_note(fig: Figure) -> str:
    """The caption's line on values marked exactly zero, or '': each line (or layer)
    with the panels where it is."""
    where: dict[str, list[str]] = {}
    for ax in fig.axes:
        for label in ax.__dict__.get("_vgrad_zeros", []):
            panel = ax.get_title() or ax.get_ylabel()
            where.setdefault(label, [])
            if panel and panel not in where[label]:
                where[label].append(panel)
    if not where:
        return ""
    together: dict[tuple[str, ...], list[str]] = {}  # lines zero in the same panels
    for label, panels in where.items():
        together.setdefault(tuple(panels), []).append(label)
    parts = [f"{', '.join(labels)} ({'; '.join(panels)})" if panels else ", ".join(labels)
             for panels, labels in together.items()]
    return (f"{ZERO_MARK} at the bottom of a log axis: exactly 0 there, which a log axis "
            f"cannot draw: {'; '.join(parts)}")


def _band(ax, x, values: np.ndarray, color, label: str, log: bool = False,
          band: bool = True, style: str = "-") -> tuple[int, bool]:
    """Plot values [S, T] over x: the seeds' centre line and spread band (see the module
    docstring). Non-finite values are left out. On a log axis negative values are left
    out too, but an exact 0 (a gradient that underflowed, a dead layer) is a value: it
    pulls the centre down (a geometric mean with a zero is zero; a median of mostly
    zeros is zero) rather than vanishing and letting the centre jump up; points where
    the centre is exactly 0 are marked at the bottom (``_mark_zeros``). Returns the
    block size used along x (1 = every point) and whether a line was drawn."""
    values = np.asarray(values, np.float64)
    values = np.where(np.isfinite(values), values, np.nan)
    x = np.asarray(x, np.float64)
    if log:
        values = np.where(values >= 0, values, np.nan)
        # Blocks average the positive values; a seed whose block holds only zeros is 0.
        zero = np.where(np.isnan(values), np.nan, (values == 0).astype(np.float64))
        _, zero, _ = _blocks(x, zero, log=False)
        x, values, size = _blocks(x, np.where(values > 0, values, np.nan), log)
        values = np.where(zero == 1, 0.0, values)
    else:
        x, values, size = _blocks(x, values, log)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (diverged seeds)
        if len(values) >= MANY_SEEDS:
            low, center, high = np.nanpercentile(values, [25, 50, 75], axis=0)
        else:
            center = (np.exp(np.nanmean(np.log(values), axis=0)) if log
                      else np.nanmean(values, axis=0))
            low, high = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
    if log:
        zero_center = center == 0
        center = np.where(center > 0, center, np.nan)
    drawn = bool(np.isfinite(center).any())
    if log:
        _mark_zeros(ax, x, zero_center, color, label, drawn=drawn)
    if not drawn:
        return 1, False
    ax.plot(x, center, color=color, label=label, linestyle=style)
    alone = np.isfinite(center) & ~np.isfinite(np.r_[np.nan, center[:-1]]) \
        & ~np.isfinite(np.r_[center[1:], np.nan])
    if alone.any():  # points between gaps make no line segment: a dot each
        ax.scatter(x[alone], center[alone], s=10, color=color, zorder=3)
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
        ax.set_yticks([])


def _layer_ticks(ax, n: int | None = None) -> None:
    """Integer ticks at regular steps (1, 2, 5, 10 ...) on a layer or time axis."""
    ax.xaxis.set_major_locator(MaxNLocator(nbins=min(n or 10, 10), integer=True,
                                           steps=[1, 2, 5, 10]))


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
        _legend_below(fig, ax, ncols=6)
        return
    norm = matplotlib.colors.Normalize(0, len(names) - 1)
    cmap = matplotlib.colors.LinearSegmentedColormap.from_list("layers", colors)
    bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=fig.axes,
                       label="layer (0: input side)", shrink=0.8)
    bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _legend_below(fig: Figure, ax, ncols: int = 6, skip: str = "",
                  rename: dict[str, str] | None = None, extra: Sequence = ()) -> None:
    """One legend below the figure for the lines of ``ax`` (or of several axes, each
    label once; labels containing ``skip`` left out; ``rename``: label -> legend text;
    ``extra``: more (handle, text) pairs), in as many columns as fit its width."""
    handles, labels = [], []
    for one in np.atleast_1d(ax).ravel():
        for handle, text in zip(*one.get_legend_handles_labels(), strict=True):
            if text not in labels and not (skip and skip in text):
                handles.append(handle)
                labels.append(text)
    texts = [(rename or {}).get(text, text) for text in labels]
    for handle, text in extra:
        handles.append(handle)
        texts.append(text)
    if not handles:
        return
    size = 8 if len(texts) <= 8 else 7
    texts = [_wrap(t, fig.get_figwidth() - 1.0, size) for t in texts]
    entry = max(_width_pt(line, size) for t in texts for line in t.split("\n")) \
        + 4 * size  # points: the handle and the gaps
    fit = max(1, int((fig.get_figwidth() * 72 - 20) // entry))
    ncols = min(ncols, fit, len(texts))
    legend = fig.legend(handles, texts, loc="outside lower center", ncols=ncols,
                        fontsize=size)
    rows = sum(max(t.count("\n") + 1 for t in texts[i:i + ncols])
               for i in range(0, len(texts), ncols))
    legend._vgrad_grown = _lines_height(rows, size) * 1.15 + 0.1
    _grow(fig, legend._vgrad_grown)


# --- tasks: regression or classification, and their baselines ---------------------------------


def regression(run: Run) -> bool:
    """Whether a run's task is a regression (real-valued targets, ``loss=regression``:
    the adding problem), whose "accuracy" is only a share within a tolerance."""
    from vgrad import data

    config = run.config
    return (config.get("loss") == "regression"
            or (config.get("data") or {}).get("name") in data.REGRESSION)


@functools.lru_cache(maxsize=64)
def _task_baseline(data_json: str, is_regression: bool) -> float | None:
    """The training targets' variance (regression) or 1 / the number of classes, from
    the data a run trained on; None when the data cannot be loaded here."""
    from omegaconf import OmegaConf

    from vgrad import data
    from vgrad.errors import ConfigError

    try:
        ds = data.load(OmegaConf.create(json.loads(data_json)))
    except (ConfigError, OSError, ValueError, KeyError, AttributeError):
        return None
    if is_regression:
        return float(np.var(np.asarray(ds.y_train, np.float64)))
    return 1.0 / ds.n_classes if ds.n_classes > 1 else None


def baseline(runs: Sequence[Run], metric: str) -> tuple[float, str] | None:
    """What ``metric`` scores without learning, where the runs' task has such a value:
    chance, 1 / the number of classes, for the accuracy of a classification task; the
    loss of predicting the target's mean, its variance (1/6 for the adding problem), for
    the loss of a regression task. (value, legend text), or None: other metrics, runs of
    different kinds of task or of tasks whose baselines differ by more than 10%, data
    that cannot be loaded here."""
    base = metric.removeprefix("final_").removeprefix("initial_")
    kind = ("acc" if base.endswith("_acc") else
            "loss" if base in ("loss", "train_loss", "test_loss") else None)
    if kind is None or not runs:
        return None
    kinds = {regression(r) for r in runs}
    if len(kinds) > 1 or (kind == "acc") == kinds.pop():
        return None
    is_regression = kind == "loss"
    values = [_task_baseline(json.dumps(r.config.get("data"), sort_keys=True, default=str),
                             is_regression) for r in runs]
    if any(v is None for v in values) or max(values) > 1.1 * min(values):
        return None
    value = float(np.mean(values))
    about = "=" if max(values) - min(values) < 1e-3 * value else "≈"
    if is_regression:
        return value, f"predicting the mean: MSE {about} Var(target) {about} {value:.3g}"
    return value, f"chance: 1/{round(1 / value)} {about} {value:.3g}"


def _draw_baseline(ax, runs: Sequence[Run], metric: str) -> float | None:
    """A dashed grey line at ``baseline(runs, metric)`` across ``ax`` (a line collection,
    so that it is not one of the data lines); its value, or None when there is none."""
    found = baseline(runs, metric)
    if found is None:
        return None
    value, text = found
    ax.hlines(value, 0, 1, transform=ax.get_yaxis_transform(), colors="0.35",
              linestyles=(0, (4, 3)), linewidth=1.0, label=text, zorder=1)
    return value


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


def gradients(run: Run, varying: Sequence[str] | None = None) -> Figure | None:
    """The figure of "Visualizing the vanishing gradient problem": mean and std of each
    layer's kernel gradient, and the loss (on a log axis with the loss of predicting the
    mean for a regression task)."""
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
        log = regression(run)
        _, drawn = _band(ax[2, 0], step, m["loss"], OKABE_ITO[0], "batch loss", log=log)
        if _draw_baseline(ax[2, 0], [run], "loss") is not None:
            ax[2, 0].legend(fontsize=7, loc="upper right")
        if log:
            _log_scale(ax[2, 0], drawn, "batch loss")
        elif not drawn:
            _note(ax[2, 0], "no finite batch loss was recorded", clear=False)
    else:
        _note(ax[2, 0], "the batch loss was not recorded in this run (probe global_norms)")
    ax[0, 0].set(title="Mean of the kernel gradient ∂L/∂W", ylabel="mean ∂L/∂W")
    ax[1, 0].set(title="Standard deviation of the kernel gradient", ylabel="std ∂L/∂W")
    ax[2, 0].set(title="Training loss on each step's batch", ylabel="loss", xlabel="step")
    _layer_legend(fig, ax[0, 0], layer_colors(len(names)), names)
    _run_title(fig, "Kernel gradients", run, varying)
    _caption(fig, _seed_note(S, block, len(names) <= MAX_BANDS), _diverged_note([run]),
             _zero_note(fig))
    return fig


def weights(run: Run, varying: Sequence[str] | None = None) -> Figure | None:
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
    _layer_ticks(ax[1, 0], len(epoch))
    _layer_legend(fig, ax[0, 0], layer_colors(len(names)), names)
    _run_title(fig, "Kernel weights", run, varying)
    _caption(fig, _seed_note(S, bands=len(names) <= MAX_BANDS), _diverged_note([run]))
    return fig


#: Nielsen's speed of learning of layer l, the norm of its bias gradient.
SPEED_LABEL = r"$\Vert\partial C/\partial b_l\Vert$"


def learning_speed(run: Run, varying: Sequence[str] | None = None) -> Figure | None:
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
        _log_scale(ax[0, 0], drawn, SPEED_LABEL)
        ax[0, 0].set(title="Averaged over the probe batch, at epoch boundaries",
                     ylabel=SPEED_LABEL, xlabel="epoch (0 = initialisation)")
        _layer_ticks(ax[0, 0], len(m["epoch"]))
    else:
        _note(ax[0, 0], "probe-batch bias gradients were not recorded in this run")
    if "bias_grad_norm" in m:
        S = m["bias_grad_norm"].shape[0]
        block, drawn = _layer_lines(ax[1, 0], m["step"], m["bias_grad_norm"], names, True)
        _log_scale(ax[1, 0], drawn, SPEED_LABEL)
        ax[1, 0].set(title="On each step's mini-batch", ylabel=SPEED_LABEL,
                     xlabel="step")
    else:
        _note(ax[1, 0], "per-step bias gradients were not recorded in this run")
    _layer_legend(fig, ax[1, 0] if "bias_grad_norm" in m else ax[0, 0],
                  layer_colors(len(names)), names)
    _run_title(fig, f"Speed of learning {SPEED_LABEL}", run, varying)
    _caption(fig, _seed_note(S, block, len(names) <= MAX_BANDS), _diverged_note([run]),
             _zero_note(fig))
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


def histograms(run: Run, key: str = "grad_hist", seed: int | None = None,
               varying: Sequence[str] | None = None) -> Figure | None:
    """Fixed-bin histograms of log10|gradient| (or weight) per layer over epochs: one
    panel per layer (x: log10 of the magnitude over the bins' whole fixed range, the
    same in every run; y: epoch; colour: fraction of entries), pooled over the seeds
    (``seed``: one seed index instead)."""
    m = run.metrics
    if key not in m or "hist_edges" not in m:
        return None
    names, edges = [str(n) for n in m["layer_names"]], m["hist_edges"]
    counts, pooled = _pooled_counts(np.asarray(m[key], np.float64), seed)
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig, ax = _figure(rows, cols, width=max(2.1 * cols + 1.2, 5.0), height=2.3, sharex=True)
    what = "∂L/∂W" if key == "grad_hist" else "W"
    epoch_edges = np.append(m["epoch"], m["epoch"][-1] + 1) - 0.5
    image = None
    for layer, name in enumerate(names):
        a = ax[layer // cols, layer % cols]
        frac = counts[:, layer] / np.maximum(counts[:, layer].sum(-1, keepdims=True), 1)
        image = a.pcolormesh(edges, epoch_edges, frac, cmap="viridis", shading="flat",
                             norm=matplotlib.colors.PowerNorm(0.5, vmin=0, vmax=1))
        a.set(title=name, xlim=(edges[0], edges[-1]))
        a.yaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(False)
    for a in ax[-1]:
        a.set_xlabel(f"log10 |{what}|")
    for a in ax[:, 0]:
        a.set_ylabel("epoch")
    for layer in range(len(names), rows * cols):
        ax[layer // cols, layer % cols].set_visible(False)
    fig.colorbar(image, ax=ax, label="fraction of entries (√ scale)",
                 shrink=0.8 if rows > 1 else 1.0)
    _run_title(fig, f"log10 |{what}| per layer over training", run, varying)
    _caption(fig, f"fixed bins, {edges[0]:g} to {edges[-1]:g}, the same for every run "
                  "(the first bin also counts zeros and smaller values, the last larger "
                  f"ones); {pooled}")
    return fig


#: The gate a recurrent cell's ``act_*`` statistics describe (``vgrad.models.rnn``
#: captures the Elman cell's f, LSTM's forget gate, GRU's update gate).
RECORDED_GATE = {"lstm": "forget gate f = σ(·)", "gru": "update gate z = σ(·)"}


def saturation(run: Run, varying: Sequence[str] | None = None) -> Figure | None:
    """Saturated and dead fractions of each hidden layer over epochs (for LSTM and GRU,
    of the gate the cell records: the titles name it)."""
    m = run.metrics
    if "act_sat_frac" not in m:
        return None
    hidden = [str(n) for n in m["layer_names"]][: m["act_sat_frac"].shape[2]]
    S = m["act_sat_frac"].shape[0]
    fig, ax = _figure(2)
    _layer_lines(ax[0, 0], m["epoch"], m["act_sat_frac"], hidden)
    _layer_lines(ax[1, 0], m["epoch"], m["act_dead_frac"], hidden)
    threshold = run.config.get("record", {}).get("sat_threshold", 0.1)
    gate = RECORDED_GATE.get((run.config.get("model") or {}).get("name"))
    if gate:
        ax[0, 0].set(title=f"Saturated {gate}: σ′ < {threshold:g} × max σ′ (gate near 0 or 1)",
                     ylabel="fraction", ylim=(-0.02, 1.02))
        ax[1, 0].set(title=f"Stuck {gate.split(' =')[0]}: σ′ = 0 on every probe example",
                     ylabel="fraction", ylim=(-0.02, 1.02),
                     xlabel="epoch (0 = initialisation)")
    else:
        ax[0, 0].set(title=f"Saturated: |f′(z)| < {threshold:g} × max |f′| (example-unit pairs)",
                     ylabel="fraction", ylim=(-0.02, 1.02))
        ax[1, 0].set(title="Dead: units with f′(z) = 0 on every probe example",
                     ylabel="fraction", ylim=(-0.02, 1.02), xlabel="epoch (0 = initialisation)")
    _layer_ticks(ax[1, 0], len(m["epoch"]))
    _layer_legend(fig, ax[0, 0], layer_colors(len(hidden)), hidden)
    _run_title(fig, f"Saturation of the {gate.split(' =')[0]}" if gate else "Saturation",
               run, varying)
    _caption(fig, _seed_note(S, bands=len(hidden) <= MAX_BANDS), _diverged_note([run]))
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


def signal(run: Run, varying: Sequence[str] | None = None) -> Figure | None:
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
        _layer_ticks(a, len(names))
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
        _layer_ticks(ax[2, 0], len(blocks))
        _legend_below(fig, ax[2, 0], ncols=2)
    else:
        _legend_below(fig, ax[0, 0], ncols=2)
    _run_title(fig, "Forward signal", run, varying)
    _caption(fig, _seed_note(S), _diverged_note([run]), _zero_note(fig))
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


#: The time axis of every recurrent figure: steps back from the loss (read after the last
#: input step T), so that sequences of different lengths line up at the loss.
TIME_AXIS = "steps back from the loss, T − t"
#: The gradient reaching the recurrent state h_t.
STATE_GRAD = r"$\Vert\partial L/\partial h_t\Vert$"


def through_time(run: Run, varying: Sequence[str] | None = None) -> Figure | None:
    """Recurrent nets: the gradient through time. ||dL/dh_t|| against T - t (the steps
    back from the loss, as in ``time_profile``) for every recurrent layer at the first
    step and late in training (the recurrent analogue of the layer profile); the top
    layer's ||dL/dh_t|| over T - t and training steps as a heatmap; and the recurrent
    kernel's spectral radius and largest singular value per epoch (Pascanu, Mikolov &
    Bengio 2013)."""
    m = run.metrics
    if "time_delta_norm" not in m:
        return None
    S, _, R, T = m["time_delta_norm"].shape
    spectrum = "rec_radius" in m
    fig, ax = _figure(3 if spectrum else 2, sharex=False, height=2.5)
    back = np.arange(T)[::-1]  # T - t for t = 1 ... T
    colors, drawn = layer_colors(max(R, 2)), False
    for r in range(R):
        for at, style, when in (("init", "-", "step 0"), ("end", "--", "last 10% of steps")):
            label = f"rnn_{r}, {when}" if R > 1 else when
            drawn |= _band(ax[0, 0], back, _time_rows(m, at, r), colors[r], label, log=True,
                           style=style)[1]
    _log_scale(ax[0, 0], drawn, STATE_GRAD)
    ax[0, 0].set(title=f"Gradient reaching the state $h_t$: mean {STATE_GRAD}",
                 xlabel=TIME_AXIS, ylabel=STATE_GRAD)
    _layer_ticks(ax[0, 0], T)
    if drawn:
        ax[0, 0].legend(fontsize=7, ncols=2 if R > 1 else 1)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        top = np.log10(np.nanmedian(np.asarray(m["time_delta_norm"][:, :, -1], np.float64),
                                    axis=0))  # [steps, T]
    top = np.where(np.isfinite(top), top, np.nan)[:, ::-1]  # columns: T - t = 0 ... T - 1
    if np.isfinite(top).any():
        image = ax[1, 0].imshow(top.T, aspect="auto", origin="lower", cmap="viridis",
                                extent=(m["step"][0], m["step"][-1] + 1, -0.5, T - 0.5),
                                interpolation="nearest")
        fig.colorbar(image, ax=ax[1, 0], label=f"log10 {STATE_GRAD}")
        ax[1, 0].yaxis.set_major_locator(MaxNLocator(integer=True))
        ax[1, 0].grid(False)
    else:
        _note(ax[1, 0], f"{STATE_GRAD}: no finite value to draw")
    over = "median over seeds" if S > 1 else "one seed"
    ax[1, 0].set(title=f"Top recurrent layer, over training ({over})",
                 xlabel="training step", ylabel="T − t")
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
        _layer_ticks(ax[2, 0], len(epochs))
        if drawn:
            ax[2, 0].legend(fontsize=7, ncols=2 if R > 1 else 1)
    _run_title(fig, "Gradients through time", run, varying)
    _caption(fig, f"T = {T} input steps; the loss is read after the last one (T − t = 0)",
             _seed_note(S), _diverged_note([run]), _zero_note(fig))
    return fig


#: The figures of one run: name -> function(run, varying=None) -> Figure | None (None:
#: the run did not record what the figure draws).
RUN_FIGURES: dict[str, Callable[..., Figure | None]] = {
    "gradients": gradients, "weights": weights, "learning_speed": learning_speed,
    "histograms": histograms, "saturation": saturation, "signal": signal,
    "time": through_time}

#: The probe (``record.step_probes`` or ``record.epoch_probes``) that records what each
#: run figure draws, for the note of a run that did not.
RUN_FIGURE_PROBES = {
    "gradients": "step probe kernel_grad_stats", "weights": "epoch probe weight_stats",
    "learning_speed": "step probe bias_grad_norm or epoch probe probe_bias_grad_norm",
    "histograms": "epoch probe histograms", "saturation": "epoch probe activation_stats",
    "signal": "epoch probe forward_signal", "time": "step probe time_delta_norm"}


def unrecorded(run: Run, kind: str) -> str | None:
    """What to tell a reader of ``run`` about its missing figure ``kind``: which probe
    records it, or None where the figure does not apply (through time: recurrent nets
    only)."""
    if kind == "time" and not recurrent(run):
        return None
    return f"{kind.replace('_', ' ')} ({RUN_FIGURE_PROBES[kind]})"


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
    """How a sweep figure splits its runs: the lines, what it pools (named in the
    caption) and the axis drawn by line style, if any."""

    lines: list[Line]
    pooled: str  # "" or "pooled over depth (2, 4, 8)"
    style_axis: str | None = None


#: Axes that change the number of layers come first for the line style: a profile
#: across layers cannot pool nets of different depths.
SHAPE_AXES = ("depth", "widths")


def _ended(sweep: Sweep) -> pd.DataFrame:
    runs = sweep.runs
    return runs[runs["status"] != "failed"] if len(runs) else runs


def _second_axis(runs: pd.DataFrame, first: str, most: int) -> str | None:
    """The varying axis drawn beside ``first`` (depth first): the first with at most
    ``most`` values."""
    ended = runs[runs["status"] != "failed"].drop_duplicates("run")
    col = axis_column(runs, first)
    others = sorted((a for a in varying_axes(ended) if axis_column(runs, a) != col),
                    key=lambda a: a not in SHAPE_AXES)
    return next((a for a in others if ended[axis_column(runs, a)].astype(str).nunique() <= most),
                None)


def split(sweep: Sweep, hue: str) -> Split:
    """One line per value of ``hue`` (colour) and of a second varying axis (line style,
    up to four values; depth first); any other varying axis is pooled and named."""
    runs = sweep.runs
    ended = runs[runs["status"] != "failed"].drop_duplicates("run")
    hue_col = axis_column(runs, hue)
    style_axis = _second_axis(runs, hue, len(STYLES))
    pooled = _pooled_note(runs, [hue] + ([style_axis] if style_axis else []))
    hues = _ordered(ended[hue_col])
    colors = dict(zip(hues, palette(len(hues)), strict=True))
    styles = ({v: STYLES[i] for i, v in enumerate(_ordered(ended[axis_column(runs,
                                                                              style_axis)]))}
              if style_axis else {})
    lines: dict[tuple[str, str], Line] = {}
    for _, row in ended.iterrows():
        h = str(row[hue_col])
        s = str(row[axis_column(runs, style_axis)]) if style_axis else ""
        text = label(hue, h) + (f", {label(style_axis, s)}" if style_axis else "")
        line = lines.setdefault((h, s), Line(text, [], colors[h], styles.get(s, "-")))
        line.runs.append(sweep.run(row["run"]))
    return Split(list(lines.values()), pooled, style_axis)


def _by_axes(hue: str, style_axis: str | None) -> str:
    return axis_name(hue) + (f" and {axis_name(style_axis)}" if style_axis else "")


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
    return kept, _not_recorded(missing, key)


def _not_recorded(missing: list[str], key: str) -> str:
    named = "; ".join(missing[:MAX_NAMED])
    if len(missing) > MAX_NAMED:
        named += f" and {len(missing) - MAX_NAMED} more"
    return f"not recorded in: {named} ({key})"


def _category_lines(sweep: Sweep, ended: pd.DataFrame, columns: Sequence[str],
                    axes: Sequence[str]) -> dict[tuple[str, ...], Line]:
    """The runs of each category (a bar, a heatmap cell) as a Line labelled
    ``axis=value, ...``, keyed by the category's values (``columns`` of ``ended``)."""
    out: dict[tuple[str, ...], Line] = {}
    for _, row in ended.drop_duplicates("run").iterrows():
        key = tuple(str(row[c]) for c in columns)
        text = ", ".join(label(a, v) for a, v in zip(axes, key, strict=True))
        out.setdefault(key, Line(text, [], None)).runs.append(sweep.run(row["run"]))
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


#: A profile figure draws at most this many lines; beyond, the deepest nets only.
MAX_PROFILE_LINES = 16


def _deepest(lines: list[Line]) -> tuple[list[Line], str]:
    """The lines of the deepest nets, and a caption saying so, when there are more than
    MAX_PROFILE_LINES lines of nets of several depths (a 13 x 10 phase diagram would
    draw 130 lines): vanishing and exploding show most at depth. Else all, and ''."""
    layers = [len(line.runs[0].metrics["layer_names"]) for line in lines]
    if len(lines) <= MAX_PROFILE_LINES or len(set(layers)) == 1:
        return lines, ""
    deepest = max(layers)
    kept = [dataclasses.replace(line, style="-")  # one depth left: no style to tell
            for line, n in zip(lines, layers, strict=True) if n == deepest]
    others = ", ".join(str(n) for n in sorted(set(layers)) if n != deepest)
    return kept, (f"the deepest nets only ({deepest} layers; not drawn: {others} layers, "
                  f"{len(lines) - len(kept)} lines)")


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


def _lines_note(lines: list[Line], block: int = 1, bands: bool = True) -> str:
    """The caption's count of what each line is a median (or mean) of: seeds, or, where
    a line pools runs of several configurations, those runs and their seeds (a line
    over 10 depths of 1 seed each is not "10 seeds")."""
    n, runs = _seeds_of(lines), min((len(line.runs) for line in lines), default=1)
    note = _seed_note(n, block, bands)
    if runs > 1 and n > 1:
        seeds = n // runs if n % runs == 0 else None
        each = f"{seeds} seed{'s' if seeds != 1 else ''} each" if seeds else "their seeds"
        note = note.replace(f"of {n} seeds", f"of {n} curves per line ({runs} pooled runs, "
                                             f"{each})", 1)
    return note


def _runs_of(lines: Sequence[Line | None]) -> list[Run]:
    return [r for line in lines if line is not None for r in line.runs]


def recurrent(run: Run) -> bool:
    """Whether a run's net is recurrent: it recorded arrays along time or recurrent
    layers (``summary.json``'s ``arrays``)."""
    return any("time" in dims or "recurrent" in dims
               for dims in (run.summary.get("arrays") or {}).values())


def _one_recurrent_layer(run: Run) -> bool:
    """A recurrent net of one recurrent layer: its "layers" are that layer and the
    readout, two points that make no profile across layers."""
    return recurrent(run) and len(run.summary.get("layers") or []) <= 2


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


#: The legend entry of the mean-field overlay.
THEORY_HANDLE = Line2D([], [], color="0.3", linestyle=":", linewidth=1.2, marker="o",
                       markersize=3.5, markerfacecolor="white")


def _draw_theory(ax, lines: list[Line], measured: list[np.ndarray | None]
                 ) -> tuple[dict[str, str], list[str]]:
    """Draw each line's mean-field delta profile (dotted, in the line's colour), scaled
    to the measured median at the output layer. Returns the legend texts of the lines
    drawn (their label with chi_1 and the depth scale) and the notes: what the circles
    are and, for the lines without a prediction, why."""
    rename, missing = {}, {}
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
        scale = ("ξ = ∞" if abs(pred.chi - 1.0) < 1e-6 else
                 f"ξ = {abs(pred.depth_scale):.3g}")
        rename[line.label] = f"{line.label}: χ₁ = {pred.chi:.3g}, {scale}"
    notes = []
    if rename:
        notes.append("open circles: mean-field theory (legend: χ₁ and ξ per line)")
    if len(missing) == 1 and not rename:
        notes.append(f"no mean-field prediction: {next(iter(missing))}")
    else:
        notes += [f"no mean-field prediction for {', '.join(labels)} ({why})"
                  for why, labels in missing.items()]
    return rename, notes


#: The caption's explanation of the mean-field overlay.
THEORY_NOTE = ("open circles: mean-field theory for infinite width at step 0, scaled to the "
               "measured output layer; χ₁: its gradient factor per layer; ξ = 1/|ln χ₁|: "
               "the depth over which E‖δ‖² shrinks e-fold towards the input (χ₁ < 1) or "
               "grows e-fold (χ₁ > 1)")
#: How the profile names what it draws.
PROFILE_LABELS = {"grad_norm": r"$\Vert\partial L/\partial W_l\Vert$",
                  "delta_norm": r"mean $\Vert\delta_l\Vert$"}


def profile(sweep: Sweep, hue: str, keys: Sequence[str] = ("grad_norm", "delta_norm"),
            theory: bool = True) -> Figure | None:
    """The vanishing profile: per-layer norms against layer index (integer ticks), one
    line per value of ``hue``, at step 0 and late in training; a row of panels per
    statistic of ``keys`` some run recorded (a caption names those none did). With
    ``theory``, the delta panel at step 0 also draws the mean-field prediction of each
    line where the theory applies (χ₁ in the legend), and says where it does not.
    None when no run recorded any of ``keys``, or when every run is a recurrent net of
    one recurrent layer (two points; ``time_profile`` draws its profile through
    time)."""
    how = split(sweep, hue)
    every = _runs_of(how.lines)
    if every and all(_one_recurrent_layer(r) for r in every):
        return None
    shown = [k for k in keys if any(recorded(r, k) for r in every)]
    if not shown:
        return None
    lines = _by_depth(how.lines)
    if len(lines) > len(how.lines):  # nets of different depths got lines of their own
        how.pooled = "; ".join(p for p in how.pooled.removeprefix("pooled over ").split("; ")
                               if not p.startswith(SHAPE_AXES))
        how.pooled = f"pooled over {how.pooled}" if how.pooled else ""
    lines, only_deepest = _deepest(lines)
    fig, ax = _figure(len(shown), 2, width=8.0, height=2.8, sharex=False)
    n_layers = max((len(r.metrics["layer_names"]) for r in every), default=1)
    rename, theory_notes, missing = {}, [], []
    for row, key in enumerate(shown):
        kept, note = _recorded_lines(lines, key)
        missing.append(note)
        what = PROFILE_LABELS.get(key, key)
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
                               band=len(lines) <= MAX_BANDS, style=line.style)[1]
            if theory and key == "delta_norm" and at == "init":
                rename, theory_notes = _draw_theory(a, lines, measured)
            when = "at step 0" if at == "init" else "(last 10% of steps)"
            a.set(title=f"{what} {when}", xlabel="layer (0 = next to the input)", ylabel=what)
            _log_scale(a, drawn, what)
            _layer_ticks(a, n_layers)
    extra = [(THEORY_HANDLE, "mean-field theory (δ at step 0)")] if rename else []
    _legend_below(fig, ax, ncols=4, skip="(mean-field theory)", rename=rename, extra=extra)
    absent = [f"{k} was not recorded in these runs" for k in keys if k not in shown]
    _suptitle(fig, f"Gradient profile across layers by {_by_axes(hue, how.style_axis)}",
              constants_label(every), *theory_notes)
    _caption(fig, only_deepest, THEORY_NOTE if rename else "", how.pooled,
             _lines_note(lines, bands=len(lines) <= MAX_BANDS),
             _diverged_note(_runs_of(lines)), *missing, *absent, _zero_note(fig))
    return fig


def time_profile(sweep: Sweep, hue: str) -> Figure | None:
    """Recurrent nets: the top recurrent layer's ||dL/dh_t|| against T - t, the steps
    back from the loss (lines of runs of different sequence lengths T line up at the
    loss, so that their vanishing rates compare directly), one line per value of ``hue``
    (bands over seeds), at the first step and late in training; None when no run
    recorded it."""
    how = split(sweep, hue)
    kept, missing = _recorded_lines(how.lines, "time_delta_norm")
    lines = [line for line in kept if line is not None]
    if not lines:
        return None
    fig, ax = _figure(1, 2, width=8.0, height=3.0, sharex=False)
    longest = 1
    for col, at in enumerate(("init", "end")):
        a, drawn = ax[0, col], False
        for line in lines:
            lengths = _by_length(line.runs)
            for length, runs in lengths.items():
                longest = max(longest, length)
                rows = np.concatenate([_time_rows(r.metrics, at) for r in runs])
                text = line.label if len(lengths) == 1 else \
                    f"{line.label}, {label('data.length', length)}"
                drawn |= _band(a, np.arange(length)[::-1], rows, line.color, text,
                               log=True, style=line.style)[1]
        _log_scale(a, drawn, STATE_GRAD)
        when = "at step 0" if at == "init" else "(last 10% of steps)"
        a.set(title=f"mean {STATE_GRAD} {when}", xlabel=TIME_AXIS, ylabel=STATE_GRAD)
        _layer_ticks(a, longest)
    _legend_below(fig, ax, ncols=3)
    runs = _runs_of(lines)
    _suptitle(fig, f"Gradient through time by {_by_axes(hue, how.style_axis)} "
                   "(top recurrent layer)", constants_label(runs))
    _caption(fig, "T − t = 0: the last input step, after which the loss is read",
             how.pooled, _lines_note(lines), _diverged_note(runs), missing,
             _zero_note(fig))
    return fig


def _by_length(runs: list[Run]) -> dict[int, list[Run]]:
    out: dict[int, list[Run]] = {}
    for r in runs:
        if "time_delta_norm" in r.metrics:
            out.setdefault(r.metrics["time_delta_norm"].shape[-1], []).append(r)
    return out


# --- per sweep: final metrics -------------------------------------------------------------


def _final_metric(sweep: Sweep, metric: str) -> str:
    runs = sweep.runs
    for candidate in (metric, f"final_{metric}"):
        if candidate in runs.columns:
            return candidate
    raise KeyError(f"no metric {metric!r}; try final_train_acc, final_test_acc, "
                   "final_train_loss, final_test_loss")


def default_metric(sweep: Sweep) -> str:
    """The final metric a sweep is judged by: test accuracy where there is a test set,
    else training accuracy; the loss (test, else training) for a regression task."""
    runs = sweep.runs
    ended = [r for r in sweep.runs_list if r.status != "failed"]
    kind = "loss" if ended and all(regression(r) for r in ended) else "acc"
    has_test = f"final_test_{kind}" in runs and runs[f"final_test_{kind}"].notna().any()
    return f"final_test_{kind}" if has_test else f"final_train_{kind}"


def _pooled_note(runs: pd.DataFrame, named: Sequence[str]) -> str:
    """'pooled over a (..); b (..)' for the varying axes not in ``named``."""
    ended = runs[runs["status"] != "failed"].drop_duplicates("run")
    cols = {axis_column(runs, a) for a in named}
    pooled = [a for a in varying_axes(ended) if axis_column(runs, a) not in cols]
    if not pooled:
        return ""
    parts = [f"{a} ({', '.join(_ordered(ended[axis_column(runs, a)]))})" for a in pooled]
    return "pooled over " + "; ".join(parts)


#: How a figure names a recorded array (others: the key, with
#: spaces for underscores).
METRIC_NAMES = {"train_acc": "train accuracy", "test_acc": "test accuracy",
                "grad_global_norm": "global gradient norm ‖∇L‖",
                "loss": "loss on each step's batch",
                "update_ratio": "update ratio ‖ΔW‖ / ‖W‖",
                "grad_norm": "‖∂L/∂W‖", "delta_norm": "mean ‖δ‖"}


def _metric_text(metric: str) -> str:
    """How a figure names a recorded array or a final metric (``final_test_acc``)."""
    metric = metric.removeprefix("final_")
    return METRIC_NAMES.get(metric, metric.replace("_", " ").replace(" acc", " accuracy"))


def _ink_on(rgba: tuple[float, ...]) -> str:
    """Black or white text, whichever reads on a cell of colour ``rgba`` (its relative
    luminance, WCAG 2)."""
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgba[:3])
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.18 else "white"


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
    width = min(max(6.4, 0.9 * len(xs) + 2.8), 10.0)  # a page's width at most
    fig, ax = _figure(1, 1, width=width, height=min(0.5 * len(ys) + 1.9, 8.0))
    size = 8 if len(xs) <= 8 else 6.5
    a = ax[0, 0]
    values = grid.to_numpy(np.float64)
    finite = values[np.isfinite(values)]
    # Cells without a finite value (every seed diverged, nothing recorded) are grey.
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")
    image = a.imshow(np.where(np.isfinite(values), values, np.nan), cmap=cmap,
                     aspect="auto", vmin=finite.min() if finite.size else 0,
                     vmax=finite.max() if finite.size else 1)
    a.set_xticks(range(len(xs)), [value_text(x, v) for v in xs])
    a.set_yticks(range(len(ys)), [value_text(y, v) for v in ys])
    if sum(len(v) for v in xs) > 6 * width:
        a.tick_params(axis="x", labelrotation=45)
    a.grid(False)
    for i in range(len(ys)):
        for j in range(len(xs)):
            value, n_div = values[i, j], diverged.iat[i, j]
            text = "—" if not np.isfinite(value) else f"{value:.3g}"
            if not np.isfinite(value) and (ys[i], xs[j]) in absent:
                text = "not\nrecorded"
            if n_div and n_div > 0:
                text += f"\n{int(n_div)} diverged"
            a.text(j, i, text, ha="center", va="center", fontsize=size,
                   color=_ink_on(image.to_rgba(value)) if np.isfinite(value) else "black")
    what = _metric_text(metric)
    a.set(xlabel=axis_name(x), ylabel=axis_name(y), title=f"{what}, median over seeds")
    bar = fig.colorbar(image, ax=a, label=what)
    every = [sweep.run(n) for n in _ordered(ended["run"])]
    _suptitle(fig, f"Final {what} by {axis_name(x)} and {axis_name(y)}",
              constants_label(every))
    notes = [f"{axis} was not swept: one value" for axis, n in ((y, len(ys)), (x, len(xs)))
             if n == 1]
    found = baseline(every, metric)
    _caption(fig, *notes, _pooled_note(runs, (x, y)), missing,
             f"for comparison, {found[1]}" if found else "", ax=bar.ax)
    return fig


#: Values of a second axis that bars draw as grouped bars (more: pooled and named).
MAX_HUES = 8
#: Bars a figure of the registry draws at most (a larger sweep: its heatmap).
MAX_BARS = 40


def _span(values: pd.Series) -> str:
    low, high = int(values.min()), int(values.max())
    return f"{low}" if low == high else f"{low}–{high}"


def _bar_missing(cats: dict[tuple[str, ...], Line], metric: str, x: str,
                 hue: str | None) -> str:
    """The "not recorded in" note of a bar panel: a value of ``x`` whose every bar lacks
    ``metric`` is named once ("data.test_size=0.0"), other bars one by one."""
    kept, note = _recorded_lines(list(cats.values()), metric)
    if not note or hue is None:
        return note
    by_x: dict[str, list] = {}
    for key, line, have in zip(cats, cats.values(), kept, strict=True):
        by_x.setdefault(key[0], []).append((line, have))
    names = []
    for xv, items in by_x.items():
        if all(have is None for _, have in items):
            names.append(label(x, xv))
            continue
        for line, have in items:
            if have is None:
                names.append(line.label)
            elif len(have.runs) < len(line.runs):
                kept_names = {r.name for r in have.runs}
                lost = [r.name for r in line.runs if r.name not in kept_names]
                names.append(f"{line.label} [run{'s' if len(lost) > 1 else ''} "
                             f"{', '.join(lost)}]")
    return _not_recorded(names, metric) if names else ""


def bars(sweep: Sweep, x: str, metrics: Sequence[str] | None = None,
         hue: str | None = None) -> Figure:
    """Final metrics per value of ``x`` and, grouped in colours, per value of ``hue``
    (default: a second varying axis, depth first, of at most ``MAX_HUES`` values; "" for
    none), one panel per metric: a bar is the median over the seeds of the
    configurations it holds, its whiskers the interquartile range; every other varying
    axis is pooled, and the caption names it and counts the configurations and seeds of
    a bar. Default metrics: train and test accuracy, with chance; for a regression task
    the train and test loss on a log axis, with the loss of predicting the mean."""
    runs = sweep.runs
    cx = axis_column(runs, x)
    ended = runs[runs["status"] != "failed"]
    every = [sweep.run(n) for n in _ordered(ended["run"])]
    if metrics is None:
        metrics = (("final_train_loss", "final_test_loss")
                   if every and all(regression(r) for r in every)
                   else ("final_train_acc", "final_test_acc"))
    hue = _second_axis(runs, x, MAX_HUES) if hue is None else (hue or None)
    ch = axis_column(runs, hue) if hue else None
    ended = ended.assign(_x=ended[cx].astype(str),
                         _h=ended[ch].astype(str) if ch else "")
    present = [m for m in metrics if m in ended and ended[m].notna().any()]
    xs, hs = _ordered(ended["_x"]), _ordered(ended["_h"])
    width = min(16.0, max(4.8, max(len(present), 1) * (len(xs) * (0.3 * len(hs) + 0.35)
                                                       + 1.2) + 0.6))
    fig, ax = _figure(1, max(len(present), 1), width=width, height=3.0, sharex=False)
    by = axis_name(x) + (f" and {axis_name(hue)}" if hue else "")
    if not present:
        _note(ax[0, 0], "no finite final metric: every run diverged or failed")
        _suptitle(fig, f"Final metrics by {by}", constants_label(every))
        return fig
    log = all("loss" in m for m in present)
    colors = palette(len(hs)) if hue else [OKABE_ITO[0]]
    step = 0.8 / len(hs)
    groups = ended.groupby(["_x", "_h"], sort=False)
    columns, axes_names = (("_x", "_h"), (x, hue)) if hue else (("_x",), (x,))
    cats = _category_lines(sweep, ended, columns, axes_names)
    all_diverged = groups["diverged"].all().to_dict()
    missing = []
    for col, m in enumerate(present):
        a = ax[0, col]
        q = groups[m].quantile([0.25, 0.5, 0.75]).unstack()
        lows = []
        for j, hv in enumerate(hs):
            pos, mid, err = [], [], []
            for i, xv in enumerate(xs):
                if (xv, hv) not in q.index:
                    continue  # no such configuration
                where = i + (j - (len(hs) - 1) / 2) * step
                low, median, high = (float(q.loc[(xv, hv), p]) for p in (0.25, 0.5, 0.75))
                if not np.isfinite(median) or (log and median <= 0):
                    if recorded(cats[(xv, hv) if hue else (xv,)].runs[0], m):
                        why = "diverged" if all_diverged.get((xv, hv), False) \
                            else "no finite value"
                        a.text(where, 0.03, why, rotation=90, fontsize=7,
                               ha="center", va="bottom", color="0.35",
                               transform=a.get_xaxis_transform())
                    continue
                pos.append(where)
                mid.append(median)
                err.append((median - low, high - median))
                lows.append(low if np.isfinite(low) and low > 0 else median)
            if pos:
                a.bar(pos, mid, step * 0.92, yerr=np.nan_to_num(np.array(err).T),
                      capsize=2, color=colors[j], error_kw={"elinewidth": 0.8},
                      label=label(hue, hv) if hue else None)
        chance = _draw_baseline(a, every, m)
        if chance is not None:
            lows.append(chance)
        a.set_xticks(range(len(xs)), [value_text(x, v) for v in xs])
        a.set_xlim(-0.6, len(xs) - 0.4)
        if sum(len(value_text(x, v)) for v in xs) * 6 > 72 * width / max(len(present), 1):
            a.tick_params(axis="x", labelrotation=30)
        a.set(xlabel=axis_name(x), title=_metric_text(m))
        if log:
            a.set_yscale("log")
            if lows:
                a.set_ylim(bottom=min(lows) / 3)
            a.set_ylabel("loss")
        elif all("acc" in p for p in present):
            a.set(ylim=(0, 1.02), ylabel="accuracy")
        else:
            a.set_ylabel("value")
        missing.append(_bar_missing(cats, m, x, hue))
    _legend_below(fig, ax, ncols=6)
    per = groups.agg(configs=("run", "nunique"), seeds=("run", "size"))
    pooled = _pooled_note(runs, [a for a in (x, hue) if a])
    if per["configs"].max() == 1 and per["seeds"].max() == 1:
        count = "a bar: one configuration, one seed"
    elif per["configs"].max() == 1:
        count = (f"a bar: the median over the {_span(per['seeds'])} seeds of one "
                 "configuration; whiskers: interquartile range")
    else:
        count = (f"a bar: the median over {_span(per['seeds'])} values, the seeds of "
                 f"{_span(per['configs'])} configurations ({pooled}); whiskers: "
                 "interquartile range")
        pooled = ""
    what = " and ".join(dict.fromkeys(_metric_text(m).split(" ", 1)[1] for m in present))
    _suptitle(fig, f"Final {what} by {by}", constants_label(every))
    _caption(fig, count, pooled, *missing,
             _diverged_note(every))
    return fig


# --- per sweep: curves over training --------------------------------------------------------

#: The per-seed axes ``curves`` draws along, and the axes of one layer it can choose from.
_ALONG = (["seed", "epoch"], ["seed", "step"])
_LAYER_AXES = ("layer", "hidden", "recurrent")


def _curve_axis(runs: Sequence[Run], metric: str, layer: int | str | None = None) -> str:
    """"epoch" or "step": the axis ``metric`` is recorded along, one value per seed
    (from the runs' ``summary.json``), or, with ``layer``, one value per seed and layer.
    Raises ValueError (one line) for a metric no run recorded, a per-layer one without
    ``layer``, or one with other axes (bins, time), naming the metrics ``curves``
    draws."""
    scalars: dict[str, str] = {}
    per_layer: dict[str, str] = {}
    dims_of: dict[str, list] = {}
    for run in runs:
        for key, dims in (run.summary.get("arrays") or {}).items():
            dims = list(dims)
            dims_of.setdefault(key, dims)
            if dims in _ALONG:
                scalars.setdefault(key, dims[1])
            elif len(dims) == 3 and dims[:2] in _ALONG and dims[2] in _LAYER_AXES:
                per_layer.setdefault(key, dims[1])
    if metric in scalars:
        if layer is not None:
            raise ValueError(f"{metric!r} has one value per seed and {scalars[metric]}, "
                             "no layer to choose: leave out layer")
        return scalars[metric]
    if metric in per_layer and layer is not None:
        return per_layer[metric]
    by_axis = {axis: ", ".join(sorted(k for k, a in scalars.items() if a == axis))
               for axis in ("epoch", "step")}
    accepts = (f"curves draws one value per seed and epoch ({by_axis['epoch'] or 'none'}) "
               f"or per seed and step ({by_axis['step'] or 'none'}), or with layer= one "
               f"layer of {', '.join(sorted(per_layer)) or 'none'}")
    if metric in per_layer:
        raise ValueError(f"{metric!r} has axes {dims_of[metric]}: one value per layer; "
                         "pass layer= (an index, 0 = next to the input, -1 = the output "
                         f"layer, or a layer's name); {accepts}")
    if metric in dims_of:
        raise ValueError(f"{metric!r} has axes {dims_of[metric]}, not one value per epoch "
                         f"or step (profile and the run figures draw per-layer "
                         f"statistics); {accepts}")
    raise ValueError(f"no run recorded a metric {metric!r}; {accepts}")


def _curve_values(run: Run, metric: str, layer: int | str | None) -> np.ndarray:
    """[S, T] values of ``metric`` (of one layer, by index or name, when given)."""
    values = np.asarray(run.metrics[metric], np.float64)
    if layer is None:
        return values
    names = [str(n) for n in run.metrics["layer_names"]][: values.shape[2]]
    if isinstance(layer, str):
        if layer not in names:
            raise ValueError(f"run {run.name} has no layer {layer!r} in {metric!r} "
                             f"(its layers: {', '.join(names)})")
        return values[:, :, names.index(layer)]
    if not -len(names) <= layer < len(names):
        raise ValueError(f"run {run.name} has {len(names)} layers in {metric!r}, "
                         f"no layer {layer}")
    return values[:, :, layer]


def _layer_name(runs: Sequence[Run], metric: str, layer: int | str) -> str:
    if isinstance(layer, str):
        return layer
    names = {str(list(r.metrics["layer_names"])[: r.metrics[metric].shape[2]][layer])
             for r in runs if metric in r.metrics}
    return names.pop() if len(names) == 1 else f"layer {layer}"


def _spans_decades(arrays: Sequence[np.ndarray], decades: float = 3.0) -> bool:
    """Whether the finite values of ``arrays`` are all positive and span more than
    ``decades`` decades: a linear axis would show one line and a flat floor (the loss of
    an exploding run against one that trains)."""
    with np.errstate(all="ignore"):
        values = np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in arrays]
                                or [np.zeros(0)])
    values = values[np.isfinite(values)]
    return bool(values.size and values.min() > 0 and values.max() > 10**decades * values.min())


def curves(sweep: Sweep, hue: str, metric: str = "train_loss",
           layer: int | str | None = None) -> Figure | None:
    """A per-epoch metric (default training loss: ``train_loss``, ``test_acc``, ...), a
    per-step one (``grad_global_norm``, ``loss``), or with ``layer`` (an index, or a name
    such as ``dense_0``) one layer of a per-layer one (``update_ratio``, ``grad_norm``),
    per value of an axis: median and band over seeds. Norms, ratios and a regression
    task's losses are drawn on a log axis; accuracies with chance and a regression
    task's losses with the loss of predicting the mean; a metric whose values span more
    than three decades (an exploding run's loss) gets a log axis too. None when the
    sweep has no run that ended. Raises ValueError (one line) for a metric no run
    recorded, a per-layer metric without ``layer``, or one with other axes."""
    how = split(sweep, hue)
    every = _runs_of(how.lines)
    if not every:
        return None
    axis = _curve_axis(every, metric, layer)
    kept, missing = _recorded_lines(how.lines, metric)
    lines = [line for line in kept if line is not None]
    what = _metric_text(metric)
    if layer is not None:
        what += f" of {_layer_name(_runs_of(lines), metric, layer)}"
    fig, ax = _figure(1, 1, width=6.4, height=3.2)
    a = ax[0, 0]
    stacked = [_stack_ragged([_curve_values(r, metric, layer) for r in line.runs])
               for line in lines]
    log = ("norm" in metric or metric.endswith("ratio")
           or (metric in ("loss", "train_loss", "test_loss") and all(map(regression, every)))
           or _spans_decades(stacked))
    drawn, block = False, 1
    for line, values in zip(lines, stacked, strict=True):
        x = max((r.metrics[axis] for r in line.runs), key=len)
        b, d = _band(a, x, values, line.color, line.label, log=log,
                     band=len(lines) <= MAX_BANDS, style=line.style)
        drawn, block = drawn or d, max(block, b)
    if not lines:
        why = " (no run has a test set)" if metric.startswith("test_") else ""
        _note(a, f"{what} was not recorded in these runs{why}")
    elif log:
        _log_scale(a, drawn, what)
    elif not drawn:
        _note(a, f"no finite {what}: every run diverged")
    if lines:
        _draw_baseline(a, _runs_of(lines), metric)
    a.set(xlabel="epoch (0 = initialisation)" if axis == "epoch" else "step", ylabel=what,
          title=f"{what} by {_by_axes(hue, how.style_axis)}")
    if axis == "epoch":
        _layer_ticks(a)
    if drawn:
        handles, texts = a.get_legend_handles_labels()
        size = 7 if len(texts) > 6 else 8
        if len(texts) <= 3:  # a short legend finds room inside
            a.legend(handles, [_wrap(t, 3.0, size) for t in texts], fontsize=size)
        else:  # a long one would hide lines: beside the axes, the figure made wider
            fig.set_figwidth(fig.get_figwidth() + 2.4)
            a.legend(handles, [_wrap(t, 2.2, size) for t in texts], fontsize=size,
                     loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    runs = _runs_of(lines)
    _suptitle(fig, constants_label(runs or every))
    _caption(fig, how.pooled, _lines_note(lines, block, len(lines) <= MAX_BANDS),
             _diverged_note(runs), missing, _zero_note(fig))
    return fig


# --- the sweep figures the report and the command line draw --------------------------------


def _configs(sweep: Sweep) -> int:
    return int(_ended(sweep)["run"].nunique()) if len(sweep.runs) else 0


def _ended_runs(sweep: Sweep) -> list[Run]:
    return [r for r in sweep.runs_list if r.status != "failed"]


def _wants_grad_norm(sweep: Sweep, axes: Sequence[str]) -> bool:
    """Whether the global gradient norm over steps says something about this sweep: it
    recorded it and clips (or varies clipping), is recurrent, or has runs that diverged
    or whose norm spans more than 100-fold (exploding)."""
    runs = [r for r in _ended_runs(sweep) if "grad_global_norm" in r.metrics]
    if not runs:
        return False
    if any((r.config.get("clip") or {}).get("name", "none") != "none" or recurrent(r)
           for r in runs):
        return True
    if any(s["diverged_at_step"] is not None for r in runs
           for s in r.summary.get("per_seed", [])):
        return True
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for r in runs:
            v = np.asarray(r.metrics["grad_global_norm"], np.float64)
            v = v[np.isfinite(v) & (v > 0)]
            if v.size and v.max() > 100 * v.min():
                return True
    return False


def _classification(sweep: Sweep) -> bool:
    runs = _ended_runs(sweep)
    return bool(runs) and not any(regression(r) for r in runs)


def _theory(name: str) -> Callable[[Sweep, Sequence[str]], Figure | None]:
    def draw(sweep: Sweep, axes: Sequence[str]) -> Figure | None:
        from vgrad.analysis import theory_figures

        return getattr(theory_figures, name)(sweep)
    return draw


@dataclass(frozen=True)
class SweepFigure:
    """A figure of a whole sweep, as the report and the command line draw it.
    ``axes``: the sweep's varying axes (``varying_axes``); the first is the figure's
    hue, the second (if any) its line style, group or heatmap row."""

    #: ``draw(sweep, axes)``: the figure, or None when the runs lack what it needs.
    draw: Callable[[Sweep, Sequence[str]], Figure | None]
    #: ``applies(sweep, axes)``: whether the figure says something about this sweep.
    applies: Callable[[Sweep, Sequence[str]], bool]
    #: ``caption(sweep, axes)``: the figure's caption on a page (plain text).
    caption: Callable[[Sweep, Sequence[str]], str]


def _by(axes: Sequence[str]) -> str:
    return axis_name(axes[0], math=False)


#: The sweep figures, in the order a report shows them: name -> SweepFigure.
SWEEP_FIGURES: dict[str, SweepFigure] = {
    "profile": SweepFigure(
        lambda s, axes: profile(s, axes[0]),
        lambda s, axes: not all(_one_recurrent_layer(r) for r in _ended_runs(s)),
        lambda s, axes: f"Gradient profile across layers by {_by(axes)}"),
    "time_profile": SweepFigure(
        lambda s, axes: time_profile(s, axes[0]),
        lambda s, axes: any("time_delta_norm" in r.metrics for r in _ended_runs(s)),
        lambda s, axes: f"Gradient through time by {_by(axes)} (‖∂L/∂h_t‖ against T − t)"),
    "bars": SweepFigure(
        lambda s, axes: bars(s, axes[0]),
        lambda s, axes: _configs(s) <= MAX_BARS,
        lambda s, axes: (f"Final {'loss' if not _classification(s) else 'accuracy'} by "
                         f"{_by(axes)}" + (f" and {axis_name(axes[1], False)}"
                                           if len(axes) > 1 else ""))),
    "loss_curves": SweepFigure(
        lambda s, axes: curves(s, axes[0], "train_loss"),
        lambda s, axes: True,
        lambda s, axes: f"Training loss by {_by(axes)}"),
    "accuracy_curves": SweepFigure(
        lambda s, axes: curves(s, axes[0], "test_acc" if any(
            recorded(r, "test_acc") for r in _ended_runs(s)) else "train_acc"),
        lambda s, axes: _classification(s),
        lambda s, axes: f"Accuracy over training by {_by(axes)} (dashed: chance)"),
    "grad_norm_steps": SweepFigure(
        lambda s, axes: curves(s, axes[0], "grad_global_norm"),
        _wants_grad_norm,
        lambda s, axes: f"Global gradient norm per step (before clipping) by {_by(axes)}"),
    "heatmap": SweepFigure(
        lambda s, axes: heatmap(s, axes[0], axes[1]),
        lambda s, axes: len(axes) > 1,
        lambda s, axes: (f"{_metric_text(default_metric(s))} over "
                         f"{_by(axes)} × {axis_name(axes[1], False)}")),
    "phase_diagram": SweepFigure(
        _theory("phase_diagram"), lambda s, axes: True,
        lambda s, axes: "Trainability phase diagram with the 6 ξ_c curve of mean-field theory"),
    "signal_theory": SweepFigure(
        _theory("signal_theory"), lambda s, axes: True,
        lambda s, axes: "Correlation and δ across layers at initialisation: measured vs theory"),
    "isometry": SweepFigure(
        _theory("isometry"), lambda s, axes: True,
        lambda s, axes: "Dynamical isometry: Jacobian singular values against depth"),
}


def sweep_figures(sweep: Sweep, axes: Sequence[str] | None = None):
    """Draw the registered sweep figures that apply, one at a time: yields (name,
    caption, figure) for each figure drawn (save and close it before asking for the
    next). ``axes`` defaults to the sweep's varying axes; none when no axis varies or no
    run ended."""
    axes = list(axes) if axes is not None else varying_axes(sweep.runs)
    if not axes or not _ended_runs(sweep):
        return
    for name, entry in SWEEP_FIGURES.items():
        if entry.applies(sweep, axes):
            fig = entry.draw(sweep, axes)
            if fig is not None:
                yield name, entry.caption(sweep, axes), fig


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
