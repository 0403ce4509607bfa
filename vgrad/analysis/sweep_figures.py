"""The figures of a whole sweep (a :class:`~vgrad.analysis.tables.Sweep`): lines and
bars named by the sweep's axes (``act=tanh``, ``depth=10``), the settings its runs share
said once in the suptitle (``sweep_lines`` says which runs make which line).

  ``profile``     per-layer gradient norm and delta norm against layer index, at
                  initialisation and at the end, one line per value of an axis, with
                  the mean-field prediction at step 0 where the theory applies
                  (``predictions``); a panel only for what was recorded; None for
                  recurrent nets of one recurrent layer (two points: ``time_profile`` is
                  their profile)
  ``time_profile``  recurrent nets: ||dL/dh_t|| against T - t, the steps back from the loss
  ``heatmap``     a final metric over two axes (median over seeds), diverged runs marked
  ``bars``        final accuracy (the loss, on a log axis, for a regression task) per value
                  of an axis and, grouped, per value of a second varying axis: median and
                  interquartile range over seeds
  ``curves``      a per-epoch metric per value of an axis (the activations book chapter,
                  Figs. 5.15, 5.17), or a per-step one (``grad_global_norm``, ``loss``),
                  or one layer of a per-layer one (``update_ratio``, ``layer=0``)

Accuracy panels draw chance, a regression task's loss panels the loss of predicting the
mean (``style.draw_baseline``). ``registry.SWEEP_FIGURES`` says when each applies.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from vgrad.analysis.naming import (
    STATE_GRAD,
    TIME_AXIS,
    axis_name,
    constants_label,
    label,
    metric_text,
    value_text,
)
from vgrad.analysis.predictions import baseline, theory_config, theory_prediction
from vgrad.analysis.recorded import (
    one_recurrent_layer,
    recorded,
    regression,
    time_rows,
)
from vgrad.analysis.style import (
    MAX_BANDS,
    OKABE_ITO,
    STYLES,
    band,
    caption,
    diverged_note,
    draw_baseline,
    figure,
    layer_ticks,
    legend_below,
    log_scale,
    note,
    palette,
    suptitle,
    wrap,
    zero_note,
)
from vgrad.analysis.sweep_lines import (
    SHAPE_AXES,
    Line,
    by_axes,
    category_lines,
    lines_note,
    not_recorded,
    ordered,
    pooled_note,
    recorded_lines,
    runs_of,
    second_axis,
    split,
)
from vgrad.analysis.tables import Run, Sweep, axis_column


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
        configs = {theory_config(r) for r in line.runs}
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
    every = runs_of(how.lines)
    if every and all(one_recurrent_layer(r) for r in every):
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
    fig, ax = figure(len(shown), 2, width=8.0, height=2.8, sharex=False)
    n_layers = max((len(r.metrics["layer_names"]) for r in every), default=1)
    rename, theory_notes, missing = {}, [], []
    for row, key in enumerate(shown):
        kept, note = recorded_lines(lines, key)
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
                drawn |= band(a, x, values, line.color, line.label, log=True,
                              band=len(lines) <= MAX_BANDS, style=line.style)[1]
            if theory and key == "delta_norm" and at == "init":
                rename, theory_notes = _draw_theory(a, lines, measured)
            when = "at step 0" if at == "init" else "(last 10% of steps)"
            a.set(title=f"{what} {when}", xlabel="layer (0 = next to the input)", ylabel=what)
            log_scale(a, drawn, what)
            layer_ticks(a, n_layers)
    extra = [(THEORY_HANDLE, "mean-field theory (δ at step 0)")] if rename else []
    legend_below(fig, ax, ncols=4, skip="(mean-field theory)", rename=rename, extra=extra)
    absent = [f"{k} was not recorded in these runs" for k in keys if k not in shown]
    suptitle(fig, f"Gradient profile across layers by {by_axes(hue, how.style_axis)}",
             constants_label(every), *theory_notes)
    caption(fig, only_deepest, THEORY_NOTE if rename else "", how.pooled,
            lines_note(lines, bands=len(lines) <= MAX_BANDS),
            diverged_note(runs_of(lines)), *missing, *absent, zero_note(fig))
    return fig


def time_profile(sweep: Sweep, hue: str) -> Figure | None:
    """Recurrent nets: the top recurrent layer's ||dL/dh_t|| against T - t, the steps
    back from the loss (lines of runs of different sequence lengths T line up at the
    loss, so that their vanishing rates compare directly), one line per value of ``hue``
    (bands over seeds), at the first step and late in training; None when no run
    recorded it."""
    how = split(sweep, hue)
    kept, missing = recorded_lines(how.lines, "time_delta_norm")
    lines = [line for line in kept if line is not None]
    if not lines:
        return None
    fig, ax = figure(1, 2, width=8.0, height=3.0, sharex=False)
    longest = 1
    for col, at in enumerate(("init", "end")):
        a, drawn = ax[0, col], False
        for line in lines:
            lengths = _by_length(line.runs)
            for length, runs in lengths.items():
                longest = max(longest, length)
                rows = np.concatenate([time_rows(r.metrics, at) for r in runs])
                text = line.label if len(lengths) == 1 else \
                    f"{line.label}, {label('data.length', length)}"
                drawn |= band(a, np.arange(length)[::-1], rows, line.color, text,
                              log=True, style=line.style)[1]
        log_scale(a, drawn, STATE_GRAD)
        when = "at step 0" if at == "init" else "(last 10% of steps)"
        a.set(title=f"mean {STATE_GRAD} {when}", xlabel=TIME_AXIS, ylabel=STATE_GRAD)
        layer_ticks(a, longest)
    legend_below(fig, ax, ncols=3)
    runs = runs_of(lines)
    suptitle(fig, f"Gradient through time by {by_axes(hue, how.style_axis)} "
                  "(top recurrent layer)", constants_label(runs))
    caption(fig, "T − t = 0: the last input step, after which the loss is read",
            how.pooled, lines_note(lines), diverged_note(runs), missing,
            zero_note(fig))
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
    """The final metric a sweep is judged by: test accuracy where there is a test set,
    else training accuracy; the loss (test, else training) for a regression task."""
    runs = sweep.runs
    ended = [r for r in sweep.runs_list if r.status != "failed"]
    kind = "loss" if ended and all(regression(r) for r in ended) else "acc"
    has_test = f"final_test_{kind}" in runs and runs[f"final_test_{kind}"].notna().any()
    return f"final_test_{kind}" if has_test else f"final_train_{kind}"


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
    xs, ys = ordered(ended["_x"]), ordered(ended["_y"])
    grid = ended.pivot_table(index="_y", columns="_x", values=metric, aggfunc="median",
                             dropna=False).reindex(index=ys, columns=xs)
    diverged = ended.pivot_table(index="_y", columns="_x", values="diverged", aggfunc="sum",
                                 dropna=False).reindex(index=ys, columns=xs)
    cells = category_lines(sweep, ended, ("_y", "_x"), (y, x))
    kept, missing = recorded_lines(list(cells.values()), metric)
    absent = {k for k, line in zip(cells, kept, strict=True) if line is None}
    width = min(max(6.4, 0.9 * len(xs) + 2.8), 10.0)  # a page's width at most
    fig, ax = figure(1, 1, width=width, height=min(0.5 * len(ys) + 1.9, 8.0))
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
    what = metric_text(metric)
    a.set(xlabel=axis_name(x), ylabel=axis_name(y), title=f"{what}, median over seeds")
    bar = fig.colorbar(image, ax=a, label=what)
    every = [sweep.run(n) for n in ordered(ended["run"])]
    suptitle(fig, f"Final {what} by {axis_name(x)} and {axis_name(y)}",
             constants_label(every))
    notes = [f"{axis} was not swept: one value" for axis, n in ((y, len(ys)), (x, len(xs)))
             if n == 1]
    found = baseline(every, metric)
    caption(fig, *notes, pooled_note(runs, (x, y)), missing,
            f"for comparison, {found[1]}" if found else "", ax=bar.ax)
    return fig


#: Values of a second axis that bars draw as grouped bars (more: pooled and named).
MAX_HUES = 8


def _span(values: pd.Series) -> str:
    low, high = int(values.min()), int(values.max())
    return f"{low}" if low == high else f"{low}–{high}"


def _bar_missing(cats: dict[tuple[str, ...], Line], metric: str, x: str,
                 hue: str | None) -> str:
    """The "not recorded in" note of a bar panel: a value of ``x`` whose every bar lacks
    ``metric`` is named once ("data.test_size=0.0"), other bars one by one."""
    kept, note = recorded_lines(list(cats.values()), metric)
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
    return not_recorded(names, metric) if names else ""


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
    every = [sweep.run(n) for n in ordered(ended["run"])]
    if metrics is None:
        metrics = (("final_train_loss", "final_test_loss")
                   if every and all(regression(r) for r in every)
                   else ("final_train_acc", "final_test_acc"))
    hue = second_axis(runs, x, MAX_HUES) if hue is None else (hue or None)
    ch = axis_column(runs, hue) if hue else None
    ended = ended.assign(_x=ended[cx].astype(str),
                         _h=ended[ch].astype(str) if ch else "")
    present = [m for m in metrics if m in ended and ended[m].notna().any()]
    xs, hs = ordered(ended["_x"]), ordered(ended["_h"])
    width = min(16.0, max(4.8, max(len(present), 1) * (len(xs) * (0.3 * len(hs) + 0.35)
                                                       + 1.2) + 0.6))
    fig, ax = figure(1, max(len(present), 1), width=width, height=3.0, sharex=False)
    by = axis_name(x) + (f" and {axis_name(hue)}" if hue else "")
    if not present:
        note(ax[0, 0], "no finite final metric: every run diverged or failed")
        suptitle(fig, f"Final metrics by {by}", constants_label(every))
        return fig
    log = all("loss" in m for m in present)
    colors = palette(len(hs)) if hue else [OKABE_ITO[0]]
    step = 0.8 / len(hs)
    groups = ended.groupby(["_x", "_h"], sort=False)
    columns, axes_names = (("_x", "_h"), (x, hue)) if hue else (("_x",), (x,))
    cats = category_lines(sweep, ended, columns, axes_names)
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
        chance = draw_baseline(a, every, m)
        if chance is not None:
            lows.append(chance)
        a.set_xticks(range(len(xs)), [value_text(x, v) for v in xs])
        a.set_xlim(-0.6, len(xs) - 0.4)
        if sum(len(value_text(x, v)) for v in xs) * 6 > 72 * width / max(len(present), 1):
            a.tick_params(axis="x", labelrotation=30)
        a.set(xlabel=axis_name(x), title=metric_text(m))
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
    legend_below(fig, ax, ncols=6)
    per = groups.agg(configs=("run", "nunique"), seeds=("run", "size"))
    pooled = pooled_note(runs, [a for a in (x, hue) if a])
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
    what = " and ".join(dict.fromkeys(metric_text(m).split(" ", 1)[1] for m in present))
    suptitle(fig, f"Final {what} by {by}", constants_label(every))
    caption(fig, count, pooled, *missing,
            diverged_note(every))
    return fig


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
    every = runs_of(how.lines)
    if not every:
        return None
    axis = _curve_axis(every, metric, layer)
    kept, missing = recorded_lines(how.lines, metric)
    lines = [line for line in kept if line is not None]
    what = metric_text(metric)
    if layer is not None:
        what += f" of {_layer_name(runs_of(lines), metric, layer)}"
    fig, ax = figure(1, 1, width=6.4, height=3.2)
    a = ax[0, 0]
    stacked = [_stack_ragged([_curve_values(r, metric, layer) for r in line.runs])
               for line in lines]
    log = ("norm" in metric or metric.endswith("ratio")
           or (metric in ("loss", "train_loss", "test_loss")
               and (all(map(regression, every))
                    or baseline(every, metric) is not None))  # (copy: a plateau)
           or _spans_decades(stacked))
    drawn, block = False, 1
    for line, values in zip(lines, stacked, strict=True):
        x = max((r.metrics[axis] for r in line.runs), key=len)
        b, d = band(a, x, values, line.color, line.label, log=log,
                    band=len(lines) <= MAX_BANDS, style=line.style)
        drawn, block = drawn or d, max(block, b)
    if not lines:
        why = " (no run has a test set)" if metric.startswith("test_") else ""
        note(a, f"{what} was not recorded in these runs{why}")
    elif log:
        log_scale(a, drawn, what)
    elif not drawn:
        note(a, f"no finite {what}: every run diverged")
    if lines:
        draw_baseline(a, runs_of(lines), metric)
    a.set(xlabel="epoch (0 = initialisation)" if axis == "epoch" else "step", ylabel=what,
          title=f"{what} by {by_axes(hue, how.style_axis)}")
    if axis == "epoch":
        layer_ticks(a)
    if drawn:
        handles, texts = a.get_legend_handles_labels()
        size = 7 if len(texts) > 6 else 8
        if len(texts) <= 3:  # a short legend finds room inside
            a.legend(handles, [wrap(t, 3.0, size) for t in texts], fontsize=size)
        else:  # a long one would hide lines: beside the axes, the figure made wider
            fig.set_figwidth(fig.get_figwidth() + 2.4)
            a.legend(handles, [wrap(t, 2.2, size) for t in texts], fontsize=size,
                     loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    runs = runs_of(lines)
    suptitle(fig, constants_label(runs or every))
    caption(fig, how.pooled, lines_note(lines, block, len(lines) <= MAX_BANDS),
            diverged_note(runs), missing, zero_note(fig))
    return fig
