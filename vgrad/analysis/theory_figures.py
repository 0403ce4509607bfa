"""Sweep figures that put signal-propagation theory beside the measurements.

- :func:`phase_diagram`: the trainability phase diagram of Schoenholz, Gilmer, Ganguli &
  Sohl-Dickstein 2017 ("Deep information propagation"): final training accuracy over
  (sigma_w^2, depth), with the 6 xi_c curve and the order-to-chaos boundary
  (chi_1 = 1) from ``vgrad.theory``;
- :func:`signal_theory`: measured against predicted c^l and delta_l profiles at
  initialisation for three sigma_w^2 of a sweep (ordered, nearest the boundary, chaotic);
- :func:`isometry`: the Jacobian's singular values against depth (dynamical isometry).

The theory's numbers come from ``predictions`` (this module only draws them).

The first two need runs the theory describes: plain MLPs without batch norm, an elementwise
activation, ``init=mean_field`` (or another fan-in-scaled initializer) and a zero-mean
Gaussian or zero bias; otherwise they return None and say why in ``why_not``.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
from matplotlib.figure import Figure

from vgrad.analysis.naming import metric_text
from vgrad.analysis.predictions import (
    phase_boundary,
    run_theory_inputs,
    signal_prediction,
    training_inputs,
)
from vgrad.analysis.style import OKABE_ITO, band, figure, suptitle
from vgrad.analysis.tables import Run, Sweep

#: sigma_w^2 points of the 6 xi_c curve (tanh: ~0.05 s each; an activation with kinks,
#: whose correlation map keeps the 800 x 800 reference grid, ~1 s in the chaotic phase).
CURVE_POINTS = 25


def _config(run: Run):
    """A run's whole config as an OmegaConf node (for titles and the data)."""
    from omegaconf import OmegaConf

    return OmegaConf.create(run.config)


def why_not(sweep: Sweep) -> str | None:
    """Why the theory figures cannot be drawn for this sweep, or None if they can."""
    runs = [r for r in sweep.runs_list if r.status != "failed"]
    if not runs:
        return "no run ended"
    described = [run_theory_inputs(r) for r in runs]
    reasons = [i for i in described if isinstance(i, str)]
    if reasons:
        return reasons[0]
    if len({(json.dumps(r.config.get("act"), sort_keys=True, default=str), i[2])
            for r, i in zip(runs, described, strict=True)}) > 1:
        return "the runs differ in activation or σ_b²"
    return None


def phase_diagram(sweep: Sweep, metric: str = "final_train_acc",
                  points: int | None = None) -> Figure | None:
    """Median ``metric`` over seeds in each (sigma_w^2, depth) cell, with the theory's
    6 xi_c curve at ``points`` values of sigma_w^2 (default ``CURVE_POINTS``; each one in
    the chaotic phase costs a root-finding over 2-D Gaussian integrals) and the
    critical sigma_w^2; None unless the sweep varies both and the theory applies
    (``why_not``)."""
    runs = sweep.runs
    if why_not(sweep) is not None or "depth" not in runs:
        return None
    ended_runs = [r for r in sweep.runs_list if r.status != "failed"]
    inputs = [run_theory_inputs(r) for r in ended_runs]
    sw = {r.name: i[1] for r, i in zip(ended_runs, inputs, strict=True)}
    ended = runs[runs["status"] != "failed"].assign(sigma_w2=lambda d: d["run"].map(sw))
    if ended["sigma_w2"].nunique() < 2 or ended["depth"].nunique() < 2:
        return None
    grid = ended.pivot_table(index="depth", columns="sigma_w2", values=metric,
                             aggfunc="median").sort_index().sort_index(axis=1)
    xs, ys = grid.columns.to_numpy(float), grid.index.to_numpy(float)

    def edges(v: np.ndarray) -> np.ndarray:
        mid = (v[1:] + v[:-1]) / 2
        return np.concatenate([[v[0] - (mid[0] - v[0])], mid, [v[-1] + (v[-1] - mid[-1])]])

    fig, ax = figure(1, 1, width=6.4, height=4.6)
    a = ax[0, 0]
    mesh = a.pcolormesh(edges(xs), edges(ys), grid.to_numpy(float), cmap="viridis",
                        vmin=0.0, vmax=1.0, shading="flat")
    a.grid(False)
    act, _, sigma_b2 = inputs[0]
    cfg = _config(ended_runs[0])
    act_json = json.dumps(dict(cfg.act), sort_keys=True, default=str)
    curve_x, curve_y, critical = phase_boundary(act_json, float(sigma_b2), float(xs.min()),
                                                float(xs.max()), points or CURVE_POINTS)
    a.plot(curve_x, np.where(np.isfinite(curve_y), curve_y, np.nan), color="white",
           linewidth=2.0, label="6 ξ_c (mean-field theory)")
    if critical is not None and xs.min() <= critical <= xs.max():
        a.axvline(critical, color="white", linestyle="--", linewidth=1.2,
                  label=f"order-to-chaos boundary χ₁ = 1 (σ_w² = {critical:.3g})")
    a.set(xlim=(edges(xs)[0], edges(xs)[-1]), ylim=(edges(ys)[0], edges(ys)[-1]),
          xlabel="σ_w² (kernel variance × fan-in)", ylabel="depth (hidden layers)")
    handles, labels = a.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8,
               facecolor="0.35", labelcolor="white")
    what = metric_text(metric)
    seeds = int(ended.groupby("run").size().min())
    fig.colorbar(mesh, ax=a, label=what + (" (median over seeds)" if seeds > 1 else ""))
    per_cell = f"median of {seeds} seeds per cell" if seeds > 1 else "one seed per cell"
    suptitle(fig, f"Trainability phase diagram: {cfg.act.name}, σ_b² = {sigma_b2:g}, "
             f"width {cfg.width}, {cfg.data.name}, {cfg.optim.name} lr {cfg.optim.lr:g}, "
             f"{cfg.epochs} epochs",
             f"{what}, {per_cell}; nets "
             "train below about 6 ξ_c (Schoenholz et al. 2017)")
    return fig


def _three(values: list[float], critical: float | None) -> list[float]:
    """The smallest, the one nearest ``critical`` and the largest of ``values``."""
    values = sorted(set(values))
    middle = (min(values, key=lambda v: abs(v - critical)) if critical is not None
              else values[len(values) // 2])
    return list(dict.fromkeys([values[0], middle, values[-1]]))


def signal_theory(sweep: Sweep, depth: int | None = None) -> Figure | None:
    """Measured (lines, median over seeds) against predicted (open circles) correlation
    c^l and delta_l / delta_output across layers at initialisation, for three sigma_w^2
    of the sweep at one depth (default: the depth nearest the sweep's median)."""
    if why_not(sweep) is not None:
        return None
    runs = [r for r in sweep.runs_list if r.status != "failed"
            and "signal_c" in r.metrics and "delta_norm" in r.metrics]
    if not runs:
        return None
    depths = sorted({int(r.config["depth"]) for r in runs})
    depth = depth if depth in depths else min(depths, key=lambda d: abs(d - np.median(depths)))
    at_depth = [r for r in runs if int(r.config["depth"]) == depth]
    inputs = {r.name: run_theory_inputs(r) for r in at_depth}
    act, _, sigma_b2 = inputs[at_depth[0].name]
    cfg = _config(at_depth[0])
    act_json = json.dumps(dict(cfg.act), sort_keys=True, default=str)
    _, _, critical = phase_boundary(act_json, float(sigma_b2), 0.5, 8.0, 2)
    chosen = _three([inputs[r.name][1] for r in at_depth], critical)
    x = training_inputs(cfg)
    probe = x[: int(cfg.record.probe_size)]
    fig, ax = figure(2, sharex=True)
    layers = np.arange(depth + 1)
    for color, sigma_w2 in zip(OKABE_ITO, chosen, strict=False):
        group = [r for r in at_depth if inputs[r.name][1] == sigma_w2]
        c = np.concatenate([r.metrics["signal_c"][:, 0, :] for r in group])
        d = np.concatenate([r.metrics["delta_norm"][:, 0, :] for r in group])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            d = d / d[:, -1:]
        phase = ("ordered" if critical is not None and sigma_w2 < critical - 1e-9 else
                 "chaotic" if critical is not None and sigma_w2 > critical + 1e-9 else "")
        label = f"σ_w² = {sigma_w2:g}" + (f" ({phase})" if phase else "")
        band(ax[0, 0], layers, c, color, label)
        band(ax[1, 0], layers, d, color, label, log=True)
        c_pred, d_pred = signal_prediction(act, depth, sigma_w2, float(sigma_b2), x, probe)
        for a, pred in ((ax[0, 0], c_pred), (ax[1, 0], d_pred)):
            a.plot(layers, pred, color=color, linestyle=":", marker="o", markersize=3.5,
                   markerfacecolor="white", label=f"{label}, theory")
    ax[1, 0].set_yscale("log")
    ax[0, 0].set(title="Correlation between different inputs $c^l$ at initialisation",
                 ylabel="$c^l$")
    ax[1, 0].set(title=r"$\Vert\delta_l\Vert / \Vert\delta_{\mathrm{output}}\Vert$ at step 0",
                 ylabel="ratio",
                 xlabel="layer (0 = next to the input; the last is the output layer)")
    handles, labels = ax[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
    suptitle(fig, f"Measured (lines) vs mean-field theory (open circles): {cfg.act.name}, "
             f"depth {depth}, σ_b² = {sigma_b2:g}, width {cfg.width}",
             "theory: the length and correlation maps iterated for every probe input "
             "and pair; δ from χ per layer")
    return fig


def isometry(sweep: Sweep, hue: str = "init.distribution") -> Figure | None:
    """Dynamical isometry (Pennington, Schoenholz & Ganguli 2017): the largest singular
    value and the mean squared singular value of the deep part's Jacobian at
    initialisation against depth, one line per value of ``hue`` (and activation), and
    the spectrum of the deepest nets. None unless the runs recorded the
    ``jacobian_spectrum`` probe and vary depth."""
    from vgrad.probes import SV_EDGES

    runs = [r for r in sweep.runs_list if r.status != "failed" and "jac_sv_max" in r.metrics]
    if len({int(r.config["depth"]) for r in runs}) < 2:
        return None

    def key(r: Run) -> str:
        node = r.config.get("init", {})
        value = node.get(hue.split(".", 1)[1]) if hue.startswith("init.") else None
        scale = (f", σ_w² = {node['sigma_w2']}" if "sigma_w2" in node else
                 f", gain {node['gain']}" if "gain" in node else "")
        return f"{r.config['act']['name']}, {node.get('name')}" + (
            f" {value}" if value is not None else "") + scale

    lines: dict[str, list[Run]] = {}
    for r in runs:
        lines.setdefault(key(r), []).append(r)
    fig, ax = figure(3, sharex=False)
    centres = 10 ** ((SV_EDGES[1:] + SV_EDGES[:-1]) / 2)
    for color, (label, group) in zip(OKABE_ITO, sorted(lines.items()), strict=False):
        group = sorted(group, key=lambda r: int(r.config["depth"]))
        depths = [int(r.config["depth"]) for r in group]
        top = np.array([np.median(r.metrics["jac_sv_max"][:, 0]) for r in group])
        ms = np.array([np.median(r.metrics["jac_sv_ms"][:, 0]) for r in group])
        ax[0, 0].plot(depths, top, color=color, marker="o", label=label)
        ax[1, 0].plot(depths, ms, color=color, marker="o", label=label)
        deepest = group[-1].metrics["jac_sv_hist"][:, 0].sum(axis=0)
        density = deepest / max(deepest.sum(), 1) / np.diff(SV_EDGES)
        ax[2, 0].step(centres, density, where="mid", color=color,
                      label=f"{label}, depth {depths[-1]}")
    for a in ax[:2, 0]:
        a.set_xscale("log", base=2)
        values = np.concatenate([line.get_ydata() for line in a.get_lines()])
        values = values[np.isfinite(values) & (values > 0)]
        if values.size and values.max() > 10 * values.min():
            a.set_yscale("log")
        elif values.size:  # (a log axis over a few percent labels every tick 1e0)
            a.ticklabel_format(axis="y", style="plain", useOffset=False)
            a.set_ylim(min(0.95 * values.min(), values.min() - 0.05),
                       max(1.05 * values.max(), values.max() + 0.05))
        a.set_xlabel("depth (hidden layers)")
    ax[0, 0].set(title="Largest singular value of J = ∂h_last/∂h_0 at initialisation",
                 ylabel="max s")
    ax[1, 0].set(title="Mean squared singular value (χ₁^depth: 1 at criticality)",
                 ylabel="mean s²")
    ax[2, 0].set(xscale="log", title="Spectrum of the deepest nets (all probe inputs)",
                 xlabel="singular value s", ylabel="density per decade")
    handles, labels = ax[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
    suptitle(fig, "Dynamical isometry: singular values of the input-output Jacobian",
             "median over seeds; orthogonal kernels at criticality keep s near 1 "
             "(Pennington et al. 2017)")
    return fig
