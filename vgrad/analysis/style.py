"""How every figure looks, and the drawing helpers the figure modules share (matplotlib,
Agg backend: files only).

- The look: ``STYLE`` (rc settings) and ``figure`` (panels in a constrained layout);
  categories in the Okabe-Ito palette, then a longer one, never repeated within a
  figure (``palette``); layers on the sequential, colour-blind-safe viridis scale, input
  side dark (``layer_colors``; a colour bar instead of a legend from 13 layers on:
  ``layer_legend``); line styles for a second axis (``STYLES``).
- Text that fits: ``wrap`` breaks text as matplotlib measures it; ``suptitle`` is short
  (what, by which axes, the shared settings); ``caption`` puts what a reader needs to
  read the figure right below the axes, inside the figure (which grows): every text of
  a figure lies within its bounds; ``note`` stands in for a panel; ``legend_below``.
- Seeds: ``band`` draws [seeds, steps] values as a centre line and a band: with several
  seeds the mean (the geometric mean on log axes) and min to max; from ``MANY_SEEDS``
  seeds on the median and interquartile range; long step axes averaged over blocks of
  steps; what is not finite left out; values exactly zero marked with ▼ at the bottom
  of a log axis (``zero_note`` names them); ``seed_note`` and ``diverged_note`` say all
  that in the caption, and ``log_scale`` notes a log panel with nothing positive left.
- ``draw_baseline``: the score of not learning (``predictions.baseline``), dashed.
- ``save``: PNG and PDF, each file written whole, never through a symbolic link.
"""

from __future__ import annotations

import functools
import io
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from matplotlib.typing import ColorType  # noqa: E402

from vgrad import store  # noqa: E402
from vgrad.analysis.predictions import baseline  # noqa: E402
from vgrad.analysis.tables import Run  # noqa: E402

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


def figure(rows: int, cols: int = 1, width: float = 6.4, height: float = 2.3,
           sharex: bool = True) -> tuple[Figure, np.ndarray]:
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows, cols, figsize=(width, height * rows), sharex=sharex,
                                 squeeze=False, layout="constrained")
    return fig, axes


def note(ax: Axes, text: str, clear: bool = True) -> None:
    """Write ``text`` in the middle of ``ax`` (clearing its ticks when it is empty),
    wrapped to the width of the axes."""
    width = ax.get_position().width * ax.figure.get_figwidth()
    ax.text(0.5, 0.5, wrap(text, 0.9 * width, 9), ha="center", va="center",
            transform=ax.transAxes, fontsize=9, color="0.4")
    if clear:
        ax.set_xticks([])
        ax.set_yticks([])


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


def wrap(text: str, width_in: float, size: float) -> str:
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


def suptitle(fig: Figure, *lines: str) -> None:
    """A short title over the figure (lines wrapped to its width; the figure grows by
    the lines after the first)."""
    text = wrap("\n".join(line for line in lines if line), fig.get_figwidth() - 0.3,
                TITLE_SIZE)
    if not text:
        return
    fig.suptitle(text, fontsize=TITLE_SIZE)
    _grow(fig, _lines_height(text.count("\n"), TITLE_SIZE))


def caption(fig: Figure, *lines: str, ax: Axes | None = None) -> None:
    """Notes below the figure, inside its bounds: the figure grows by their height and
    the layout keeps clear of them; a legend below the panels (``legend_below``) moves
    into the same strip, above the notes. The text belongs to ``ax`` (default: the first
    axes) so that it travels with the figure's texts; call once per figure, last."""
    lines = [line for line in lines if line]
    if not lines or not fig.axes:
        return
    width, height = fig.get_size_inches()
    text = wrap("\n".join(lines), width - 0.3, CAPTION_SIZE)
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


def _mark_zeros(ax: Axes, x: np.ndarray, zero: np.ndarray, color: ColorType, label: str,
                drawn: bool) -> None:
    """Mark with ZERO_MARK, at the bottom of a log axis, the points ``x[zero]`` where a
    line's value is exactly zero (no place on a log axis), and remember the line's label
    for the caption (``zero_note``)."""
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


def zero_note(fig: Figure) -> str:
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


def band(ax: Axes, x: np.ndarray | Sequence[float], values: np.ndarray, color: ColorType,
         label: str, log: bool = False, band: bool = True, style: str = "-") -> tuple[int, bool]:
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


def log_scale(ax: Axes, drawn: bool, what: str) -> None:
    """A log y axis, or a note when nothing positive and finite was drawn on it."""
    if drawn:
        ax.set_yscale("log")
    else:
        note(ax, f"{what}: no positive finite value to draw (every value is zero, "
                 "vanished below float range, or not finite after a divergence)",
             clear=False)
        ax.set_yticks([])


def layer_ticks(ax: Axes, n: int | None = None) -> None:
    """Integer ticks at regular steps (1, 2, 5, 10 ...) on a layer or time axis."""
    ax.xaxis.set_major_locator(MaxNLocator(nbins=min(n or 10, 10), integer=True,
                                           steps=[1, 2, 5, 10]))


def seed_note(n_seeds: int, block: int = 1, bands: bool = True) -> str:
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


def diverged_note(runs: Sequence[Run]) -> str:
    """'k of n seeds diverged (...)' for the runs of a figure, or ''."""
    steps = [s["diverged_at_step"] for r in runs for s in r.summary.get("per_seed", [])]
    bad = [s for s in steps if s is not None]
    if not bad:
        return ""
    return (f"{len(bad)} of {len(steps)} seeds diverged (at step {min(bad)}"
            f"{f'–{max(bad)}' if max(bad) > min(bad) else ''}; their lines stop there)")


def layer_legend(fig: Figure, ax: Axes, colors: list, names: list[str]) -> None:
    """A legend of the layers below the figure, or a colour bar when there are many."""
    if len(names) <= MAX_LEGEND_LAYERS:
        legend_below(fig, ax, ncols=6)
        return
    norm = matplotlib.colors.Normalize(0, len(names) - 1)
    cmap = matplotlib.colors.LinearSegmentedColormap.from_list("layers", colors)
    bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=fig.axes,
                       label="layer (0: input side)", shrink=0.8)
    bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def legend_below(fig: Figure, ax: Axes | np.ndarray, ncols: int = 6, skip: str = "",
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
    texts = [wrap(t, fig.get_figwidth() - 1.0, size) for t in texts]
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


def draw_baseline(ax: Axes, runs: Sequence[Run], metric: str) -> float | None:
    """A dashed grey line at ``baseline(runs, metric)`` across ``ax`` (a line collection,
    so that it is not one of the data lines); its value, or None when there is none."""
    found = baseline(runs, metric)
    if found is None:
        return None
    value, text = found
    ax.hlines(value, 0, 1, transform=ax.get_yaxis_transform(), colors="0.35",
              linestyles=(0, (4, 3)), linewidth=1.0, label=text, zorder=1)
    return value


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
