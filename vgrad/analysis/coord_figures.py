"""The coordinate check of a sweep over width (the ``coord_check`` epoch probe and preset).

  ``coord_check`` (a sweep)  per training step a panel, log2 width on x, one line per
                  layer (the last: the logits), log scale on y: the mean |z - z_0| of each
                  layer's pre-activation on the fixed probe batch since initialisation,
                  the median over seeds; a row of panels per value of the other swept
                  axes (parametrization x optimizer). The figure of Yang et al. 2022
                  ("Tensor Programs V", Figure 5) and of microsoft/mup's
                  ``plot_coord_data``: under muP every line is flat, under the standard
                  parametrization with Adam a hidden layer's change grows about linearly
                  with width and the logits' faster, which is what makes the best learning
                  rate drift with width.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from vgrad.analysis.naming import axis_name, constants_label, label, varying_axes
from vgrad.analysis.recorded import recorded
from vgrad.analysis.style import (
    caption,
    diverged_note,
    figure,
    layer_colors,
    legend_below,
    log_scale,
    note,
    suptitle,
)
from vgrad.analysis.sweep_lines import ordered, pooled_note
from vgrad.analysis.tables import Run, Sweep, axis_column

#: The array drawn, and the most step panels a row shows (evenly spaced beyond).
METRIC = "coord_change_l1"
MAX_STEPS = 5


def _ended(sweep: Sweep):
    runs = sweep.runs
    return runs[runs["status"] != "failed"].drop_duplicates("run")


def applies(sweep: Sweep) -> bool:
    """Whether the sweep varies ``width`` and its runs recorded the coordinate check."""
    ended = _ended(sweep)
    return ("width" in varying_axes(ended)
            and any(recorded(r, METRIC) for r in sweep.runs_list if r.status != "failed"))


def _steps(epochs: int) -> list[int]:
    """The epochs drawn (1 ... epochs; at most ``MAX_STEPS``, evenly spaced)."""
    if epochs <= MAX_STEPS:
        return list(range(1, epochs + 1))
    return sorted({int(round(e)) for e in np.linspace(1, epochs, MAX_STEPS)})


def _medians(runs: Sequence[Run], epoch: int) -> np.ndarray:
    """The median over the runs' seeds of ``METRIC`` at ``epoch``, [layers]."""
    v = np.concatenate([np.asarray(r.metrics[METRIC], np.float64)[:, epoch] for r in runs])
    v = np.where(np.isfinite(v), v, np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(v, axis=0)


def coord_check(sweep: Sweep, rows: Sequence[str] | None = None) -> Figure | None:
    """The coordinate-check figure (see the module docstring); ``rows``: the swept axes
    whose values make the rows (default: every varying axis but width and seed)."""
    ended = _ended(sweep)
    chosen = ended[[recorded(sweep.run(n), METRIC) for n in ended["run"]]]
    if chosen.empty:
        return None
    runs = sweep.runs
    wcol = axis_column(runs, "width")
    if rows is None:
        rows = [a for a in varying_axes(chosen) if a not in ("width", "seed")]
    cols = [axis_column(runs, a) for a in rows]
    keys = list(dict.fromkeys(tuple(str(v) for v in row)
                              for row in chosen[cols].itertuples(index=False))) or [()]
    widths = sorted({int(w) for w in chosen[wcol]})
    every = [sweep.run(n) for n in chosen["run"]]
    epochs = min(np.asarray(r.metrics[METRIC]).shape[1] for r in every) - 1
    if epochs < 1:
        return None
    steps = _steps(epochs)
    # An epoch is one step when the training set is one batch (the preset's setting).
    unit = ("step" if all(r.summary.get("steps_per_epoch") == 1 for r in every)
            else "epoch")
    fig, ax = figure(len(keys), len(steps), width=min(16.0, 3.0 * len(steps) + 0.8),
                     height=2.6, sharex=False)
    most_layers, left_out = 0, []
    for i, key in enumerate(keys):
        mask = np.ones(len(chosen), bool)
        for col, value in zip(cols, key, strict=True):
            mask &= chosen[col].astype(str).to_numpy() == value
        here = [(int(w), sweep.run(n)) for w, n in zip(chosen.loc[mask, wcol],
                                                        chosen.loc[mask, "run"], strict=True)]
        # The row's layers are its first run's; a run of another depth in the row (an
        # axis pooled) is left out and named.
        names = [str(n) for n in here[0][1].metrics.get("layer_names", [])]
        n_layers = np.asarray(here[0][1].metrics[METRIC]).shape[-1]
        left_out += [r.name for _, r in here if np.asarray(r.metrics[METRIC]).shape[-1]
                     != n_layers]
        by_width = {w: [r for v, r in here if v == w
                        and np.asarray(r.metrics[METRIC]).shape[-1] == n_layers]
                    for w in widths}
        if n_layers > most_layers:
            most_layers, legend_row = n_layers, i
        colors = layer_colors(n_layers)
        title = ", ".join(label(a, v) for a, v in zip(rows, key, strict=True))
        for j, step in enumerate(steps):
            a = ax[i, j]
            x = [w for w in widths if by_width[w]]
            if not x:
                note(a, "no run")
                continue
            y = np.stack([_medians(by_width[w], step) for w in x])  # [widths, layers]
            for layer in range(n_layers):
                name = names[layer] if layer < len(names) else f"layer {layer}"
                if layer == n_layers - 1:
                    name += " (logits)"
                a.plot(x, y[:, layer], color=colors[layer], marker="o", markersize=3,
                       label=name)
            a.set_xscale("log", base=2)
            a.xaxis.set_major_locator(FixedLocator(x))
            a.xaxis.set_minor_locator(NullLocator())
            a.set_xticklabels([str(w) for w in x], fontsize=7)
            log_scale(a, bool(np.nanmax(y, initial=0) > 0), "change")
            a.set(title=f"{unit} {step}" if i == 0 else None,
                  xlabel="width" if i == len(keys) - 1 else None,
                  ylabel=(f"{title}\nmean |z − z₀|" if title else "mean |z − z₀|")
                  if j == 0 else None)
    legend_below(fig, ax[legend_row, 0], ncols=min(most_layers, 6))
    suptitle(fig, "Coordinate check: how far each layer's pre-activation has moved since "
             "initialisation, against width",
             constants_label(every, ["width", *rows]))
    caption(fig, f"a panel per {unit}" + (" (one fixed batch)" if unit == "step" else "")
            + "; a line per layer (input side first, the last is the logits): the median "
            "over seeds of the mean |z − z₀| over the probe batch and units",
            "flat lines: every layer learns at the same rate at every width (μP, Yang et "
            "al. 2022); rising lines: that layer's update blows up as the net widens",
            f"rows: {', '.join(axis_name(a, math=False) for a in rows)}" if rows else "",
            pooled_note(runs, ["width", *rows]), diverged_note(every),
            f"left out (another depth in their row): {', '.join(left_out)}" if left_out
            else "")
    return fig


__all__ = ["METRIC", "applies", "coord_check", "ordered"]
