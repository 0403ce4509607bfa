"""Figures of gradient noise (the ``gradient_noise`` step probe) and curvature across a
sweep (the ``hessian`` epoch probe).

  ``gradient_noise`` (a run)  layer x step heatmaps of ||delta_l|| (the gradient's size),
                  the gradient signal-to-noise ratio and the spread of the per-example
                  gradient norms (90th / 10th percentile); the whole net's noise scale
                  B_simple against the batch size; the norm, inner-product and
                  orthogonality tests against their threshold 1; with the ``alpha``
                  probe, Cockpit's local step size
  ``noise_and_sharpness`` (a sweep)  B_simple, GSNR (whole net) and the sharpness
                  lambda_max against a swept axis (depth, activation, ...), at
                  initialisation and late in training, one line per value of a second
                  axis

Heatmaps show the median over seeds; lines, the median over seeds and pooled runs with
the interquartile range as whiskers.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from vgrad.analysis.naming import axis_name, constants_label, label, value_text
from vgrad.analysis.recorded import recorded
from vgrad.analysis.style import (
    OKABE_ITO,
    band,
    caption,
    diverged_note,
    figure,
    log_scale,
    note,
    palette,
    seed_note,
    suptitle,
)
from vgrad.analysis.sweep_lines import ordered, pooled_note, second_axis
from vgrad.analysis.tables import Run, Sweep, axis_column

#: The share of the last recorded steps "late in training" pools (as ``time_rows``).
LATE = 0.1


def _median_log10(values: np.ndarray) -> np.ndarray:
    """log10 of the median over seeds of [S, T, L] values, NaN where none is positive."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        v = np.asarray(values, np.float64)
        v = np.where(np.isfinite(v) & (v > 0), v, np.nan)
        return np.log10(np.nanmedian(v, axis=0))


def _layer_heatmap(fig: Figure, ax, step: np.ndarray, values: np.ndarray,
                   names: list[str], what: str, cmap: str = "viridis") -> None:
    """log10 of the median over seeds of values [S, T, L] as a layer x step image."""
    image = _median_log10(values)  # [T, L]
    if not np.isfinite(image).any():
        note(ax, f"{what}: no finite positive value to draw")
        return
    # (colours span the 1st to 99th percentile: one outlying cell does not wash out the
    # rest; the colour bar's pointed ends mark values beyond)
    low, high = np.nanpercentile(image, [1, 99])
    drawn = ax.imshow(image.T, aspect="auto", origin="lower", cmap=cmap,
                      extent=(step[0], step[-1] + 1, -0.5, len(names) - 0.5),
                      interpolation="nearest", vmin=low, vmax=max(high, low + 1e-6))
    fig.colorbar(drawn, ax=ax, label=f"log10 {what}",
                 extend="both" if np.nanmin(image) < low or np.nanmax(image) > high
                 else "neither")
    ticks = range(len(names)) if len(names) <= 12 else range(0, len(names),
                                                              -(-len(names) // 12))
    ax.set_yticks(list(ticks), [names[i] for i in ticks], fontsize=7)
    ax.grid(False)


def gradient_noise(run: Run, varying: Sequence[str] | None = None) -> Figure | None:
    """How the batch's examples disagree about the gradient, layer by layer and step by
    step (the ``gradient_noise`` probe; ``vgrad.noise``)."""
    from vgrad.analysis.run_figures import _run_title

    m = run.metrics
    if "gsnr" not in m:
        return None
    names, step, S = [str(n) for n in m["layer_names"]], m["step"], m["gsnr"].shape[0]
    deltas, local = "delta_norm" in m, "alpha" in m
    fig, ax = figure(4 + deltas + local, height=2.1)
    row = 0
    if deltas:
        _layer_heatmap(fig, ax[0, 0], step, m["delta_norm"], names, "‖δ_l‖")
        ax[0, 0].set(title="Backpropagated signal: batch mean of ‖δ_l‖ per layer",
                     ylabel="layer")
        row = 1
    _layer_heatmap(fig, ax[row, 0], step, m["gsnr"], names, "GSNR", cmap="magma")
    ax[row, 0].set(title="Gradient signal-to-noise ratio (mean over the layer's parameters)",
                   ylabel="layer")
    q = np.asarray(m["pe_norm_q"], np.float64)  # [S, T, L, quantile]: 0, .1, .5, .9, 1
    with np.errstate(all="ignore"):
        spread = q[..., 3] / q[..., 1]
    _layer_heatmap(fig, ax[row + 1, 0], step, spread, names, "p90 / p10", cmap="cividis")
    ax[row + 1, 0].set(title="Spread of the per-example gradient norms (p90 / p10)",
                       ylabel="layer")
    a = ax[row + 2, 0]
    _, drawn = band(a, step, m["noise_scale_net"], OKABE_ITO[0], "B_simple = tr Σ / |G|²",
                    log=True)
    batch = run.config.get("batch_size")
    if batch:
        a.axhline(float(batch), color="0.3", linestyle="--", linewidth=1,
                  label=f"batch size B = {batch}")
    log_scale(a, drawn, "noise scale")
    a.legend(fontsize=7, loc="best")
    a.set(title="Gradient noise scale (whole net): above B, larger batches still help",
          ylabel="examples")
    a = ax[row + 3, 0]
    drawn = False
    for i, (key, text) in enumerate((("norm_test", "norm test θ"),
                                     ("inner_test", "inner-product test θ"),
                                     ("ortho_test", "orthogonality test ν"))):
        drawn |= band(a, step, m[f"{key}_net"], OKABE_ITO[i + 1], text, log=True)[1]
    a.axhline(1.0, color="0.3", linestyle="--", linewidth=1, label="1")
    log_scale(a, drawn, "test")
    a.legend(fontsize=7, loc="best", ncols=2)
    a.set(title="Smallest θ (ν) the batch passes each test with (whole net)", ylabel="θ")
    if local:  # (the alpha probe)
        a = ax[row + 4, 0]
        band(a, step, m["alpha"], OKABE_ITO[5], "α of the step before")
        for level, text in ((0.0, "0: to the minimum"), (1.0, "1: to the far side")):
            a.axhline(level, color="0.5", linewidth=0.8, linestyle=":", label=text)
        a.legend(fontsize=7, loc="best", ncols=3)
        a.set(title="Local step size α (Cockpit): where each step lands on a fitted parabola",
              ylabel="α")
    ax[-1, 0].set_xlabel("step")
    _run_title(fig, "Gradient noise", run, varying)
    caption(fig, "heatmaps: median over seeds" if S > 1 else "heatmaps: one seed",
            seed_note(S), "B_simple: a gap where the batch's estimate of |G|² is negative "
            "(the noise swamps the mean gradient)", diverged_note([run]))
    return fig


# --- across a sweep ----------------------------------------------------------------------

#: (array, title, ylabel, kind): kind "step" reads the first and the late recorded steps,
#: "epoch" the first and the last epoch.
_PANELS = (("noise_scale_net", "Gradient noise scale B_simple (whole net)", "examples",
            "step"),
           ("gsnr_net", "Gradient signal-to-noise ratio (whole net)", "GSNR", "step"),
           ("hess_max", "Sharpness λ_max of the Hessian", "λ_max", "epoch"))


def _per_seed(run: Run, key: str, kind: str, late: bool) -> np.ndarray:
    """One value per seed: at initialisation, or late in training (the median over the
    last ``LATE`` of the recorded steps, or the last epoch)."""
    m = run.metrics
    v = np.asarray(m[key], np.float64)  # [S, T]
    v = np.where(np.isfinite(v), v, np.nan)
    if not late:
        return v[:, 0]
    if kind == "epoch":
        return v[:, -1]
    tail = max(1, int(round(LATE * v.shape[1])))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if key == "noise_scale_net":  # McCandlish et al.: the ratio of smoothed estimates
            return (np.nanmean(m["noise_trace_net"][:, -tail:], axis=1)
                    / np.nanmean(m["noise_grad_sq_net"][:, -tail:], axis=1))
        return np.nanmedian(v[:, -tail:], axis=1)


def _positions(values: list[str]) -> tuple[np.ndarray, bool]:
    """Where each value of the x axis goes: at its number (log scale when positive and
    spanning 4x or more) or, for categories, at 0, 1, 2, ..."""
    try:
        numbers = np.array([float(v) for v in values])
    except ValueError:
        return np.arange(len(values), dtype=float), False
    log = bool((numbers > 0).all() and numbers.max() >= 4 * numbers.min())
    return numbers, log


def noise_and_sharpness(sweep: Sweep, x: str) -> Figure | None:
    """B_simple, GSNR and lambda_max against ``x`` (one panel each, those recorded), at
    initialisation (solid) and late in training (dashed), one colour per value of a
    second varying axis; a point is the median over the seeds of the runs it pools,
    its whiskers the interquartile range."""
    runs = sweep.runs
    ended = runs[runs["status"] != "failed"].drop_duplicates("run")
    every = [sweep.run(n) for n in ordered(ended["run"])]
    panels = [p for p in _PANELS if any(recorded(r, p[0]) for r in every)]
    if not panels:
        return None
    cx = axis_column(runs, x)
    hue = second_axis(runs, x, 8)
    ch = axis_column(runs, hue) if hue else None
    xs = ordered(ended[cx])
    hs = ordered(ended[ch]) if ch else [""]
    pos, log_x = _positions(xs)
    colors = palette(len(hs)) if ch else [OKABE_ITO[0]]
    fig, ax = figure(1, len(panels), width=min(16.0, 4.2 * len(panels) + 0.8), height=3.2,
                     sharex=False)
    missing = []
    for col, (key, title, ylabel, kind) in enumerate(panels):
        a = ax[0, col]
        drawn = False
        for j, h in enumerate(hs):
            for late, style, when in ((False, "-", "initialisation"),
                                      (True, "--", "late in training")):
                mid, low, high, at = [], [], [], []
                for i, xv in enumerate(xs):
                    chosen = ended[(ended[cx].astype(str) == xv)
                                   & ((ended[ch].astype(str) == h) if ch else True)]
                    values = [v for n in chosen["run"] for r in [sweep.run(n)]
                              if recorded(r, key) for v in _per_seed(r, key, kind, late)]
                    values = np.array([v for v in values if np.isfinite(v)])
                    if values.size:
                        lo, me, hi = np.percentile(values, [25, 50, 75])
                        at.append(pos[i])
                        mid.append(me)
                        low.append(me - lo)
                        high.append(hi - me)
                if at:
                    text = (f"{label(hue, h)}, " if ch else "") + when
                    a.errorbar(at, mid, yerr=[low, high], color=colors[j], linestyle=style,
                               marker="o" if not late else "s", markersize=3.5, capsize=2,
                               linewidth=1.2, label=text)
                    drawn = True
        if not drawn:
            note(a, f"{key}: no finite value")
            continue
        if (_all(every, key, kind) > 0).all():
            a.set_yscale("log")
        else:  # (B_simple where noise swamps the mean gradient: |G|^2's estimate < 0)
            a.set_yscale("symlog", linthresh=1.0)
            a.axhline(0.0, color="0.5", linewidth=0.8, linestyle=":")
        if log_x:
            a.set_xscale("log", base=2)
        a.set_xticks(pos, [value_text(x, v) for v in xs])
        a.xaxis.set_minor_locator(NullLocator())
        a.set(title=title, xlabel=axis_name(x), ylabel=ylabel)
        lacking = [r.name for r in every if not recorded(r, key)]
        if lacking:
            missing.append(f"{key} not recorded in {len(lacking)} of {len(every)} runs")
    handles, labels = ax[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", fontsize=7,
                   ncols=min(4, len(labels)))
    by = axis_name(x) + (f" and {axis_name(hue)}" if hue else "")
    suptitle(fig, f"Gradient noise and sharpness by {by}",
             constants_label(every, [a for a in (x, hue) if a]))
    caption(fig, "solid: at initialisation (first recorded step; epoch 0 for λ_max); "
            f"dashed: late in training (the last {LATE:.0%} of recorded steps: the median "
            "for GSNR, the ratio of the mean tr Σ and |G|² estimates for B_simple, as "
            "McCandlish et al. smooth them; the last epoch for λ_max)",
            "a point: the median over the seeds of the runs it pools; whiskers: "
            "interquartile range", pooled_note(runs, [a for a in (x, hue) if a]),
            *missing, diverged_note(every))
    return fig


def _all(runs: list[Run], key: str, kind: str) -> np.ndarray:
    """Every finite value ``noise_and_sharpness`` draws of ``key``."""
    values = np.concatenate([_per_seed(r, key, kind, late) for r in runs if recorded(r, key)
                             for late in (False, True)])
    return values[np.isfinite(values)]


def applies(sweep: Sweep) -> bool:
    """Whether any ended run of ``sweep`` recorded what ``noise_and_sharpness`` draws."""
    return any(recorded(r, key) for r in sweep.runs_list if r.status != "failed"
               for key, *_ in _PANELS)

