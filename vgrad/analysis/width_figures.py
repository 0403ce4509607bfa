"""The finite-width fluctuations of the gradient at initialisation, across a sweep of
ReLU MLPs over width and depth (Hanin 2018, "Which neural net architectures give rise to
exploding and vanishing gradients?"; Hanin & Nica 2019, "Products of many large random
matrices and gradients in deep neural networks").

Mean-field theory keeps E||delta||^2 flat across a ReLU net with He kernels, but each
hidden layer of width n multiplies ||delta||^2 by an independent random factor whose log
has variance ~5/n (``vgrad.theory``, the finite-width section), so per seed

    r = ln(||delta_first||^2 / ||delta_output||^2)

is close to Gaussian with variance ~5 sum_l 1/n_l and mean ~-(5/2) sum_l 1/n_l: depth over
width, not depth alone, sets how far one initialisation's gradient strays from another's,
and the typical (median) ratio falls like exp(-(5/2) sum 1/n) while its mean stays 1.
Read from each run's step-0 ``delta_norm`` (the batch mean of per-example norms: with
``batch_size=1`` one example's, Hanin's fixed-input setting):

  ``finite_width`` (a sweep)  the seed-to-seed variance of r against depth, one line per
                  width, with the exact and the leading prediction; the same against
                  sum 1/n, where every width falls on one line; the median and the mean
                  of the ratio against sum 1/n; the distribution of r at the largest depth
  ``finite_width_table``      the numbers of each (width, depth) cell, measured and
                  predicted (the report shows it and writes it as ``finite_width.csv``)
  ``applies``                 whether a sweep holds runs the theory describes

A seed with a dead layer (no active unit: ratio exactly 0, probability 2^-n per layer) is
left out of r's statistics, as the theory's moments are conditioned on every layer being
alive, counted in the table (with the expected count), and kept as 0 in the mean ratio,
whose expectation includes it. A seed whose output delta is exactly 0 (a saturated
sigmoid) has no ratio and is counted apart.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from vgrad import theory
from vgrad.analysis.naming import axis_value, constants_label, label, varying_axes
from vgrad.analysis.predictions import run_theory_inputs
from vgrad.analysis.recorded import recorded
from vgrad.analysis.style import STYLES, caption, figure, palette, suptitle
from vgrad.analysis.tables import Run, Sweep

#: Axes that make a cell's shape (the figure's own axes; others split its lines).
SHAPE = ("width", "depth", "widths")
#: Multiples of the standard error drawn as error bars on the measured variance.
ERROR_BARS = 2.0
#: The mean ratio of N seeds is drawn faded where its predicted standard error exceeds
#: this: its tail is then rarer than 1/N and the sample mean is not yet E ratio.
MEAN_RESOLVED = 0.5
#: Bins of the distribution panel.
BINS = 40


def hidden_widths(run: Run) -> tuple[int, ...]:
    """The widths of a run's hidden layers, input side first (``widths`` or ``width`` x
    ``depth``)."""
    config = run.config
    if config.get("widths"):
        return tuple(int(n) for n in config["widths"])
    return (int(config["width"]),) * int(config["depth"])


def kernel_law(init: dict) -> str | None:
    """How a kernel initializer draws its entries: "gaussian" (i.i.d. normal, the
    theory's assumption), "iid" (i.i.d. but not Gaussian: a truncated normal, a uniform;
    the factor of the output layer changes at order 1/n with the fourth moment) or None
    (orthogonal: the factors are not those of the theory at all)."""
    name, law = init.get("name"), init.get("distribution")
    if name in ("orthogonal", "delta_orthogonal") or law == "orthogonal":
        return None
    if name == "nielsen" or (name in ("mean_field", "variance_scaling") and law == "normal"):
        return "gaussian"
    return "iid"


def why_not(run: Run) -> str | None:
    """Why the finite-width theory does not describe ``run``, or None if it does: a
    plain MLP without batch norm, ReLU, zero biases, fan-in-scaled zero-mean kernels
    with i.i.d. entries, and ``delta_norm`` recorded at step 0."""
    if run.status == "failed":
        return "failed"
    inputs = run_theory_inputs(run)
    if isinstance(inputs, str):
        return inputs
    act, _, sigma_b2 = inputs
    if (run.config.get("act") or {}).get("name") != "relu":
        return f"act={act.name} (the theory is ReLU's)"
    if sigma_b2 != 0:
        return f"σ_b² = {sigma_b2:g} (the theory needs zero biases)"
    if kernel_law(run.config.get("init") or {}) is None:
        return "orthogonal kernels (the theory needs i.i.d. entries)"
    if not recorded(run, "delta_norm"):
        return "delta_norm not recorded"
    if int(np.asarray(run.metrics["step"])[0]) != 0:
        return "step 0 not recorded"
    return None


def applies(sweep: Sweep) -> bool:
    """Whether ``sweep`` holds a run the theory describes (``why_not``) with at least
    two seeds (a variance needs two)."""
    return any(why_not(r) is None and len(r.rows()) > 1 for r in sweep.runs_list)


def log_ratios(run: Run) -> tuple[np.ndarray, np.ndarray, int]:
    """Per seed at step 0: r = ln(||delta_first||^2 / ||delta_output||^2) of the seeds
    with every layer alive, the ratio itself of every seed with an output delta (dead
    seeds 0), and how many seeds had none (an output delta exactly 0, or not finite)."""
    d = np.asarray(run.metrics["delta_norm"], np.float64)[:, 0, :]
    first, output = d[:, 0], d[:, -1]
    defined = np.isfinite(first) & np.isfinite(output) & (output > 0)
    ratio = (first[defined] / output[defined]) ** 2
    alive = ratio > 0
    return np.log(ratio[alive]), ratio, int(np.sum(~defined))


@dataclass
class Cell:
    """The seeds of one (widths, other varying axes) cell, pooled over its runs."""

    widths: tuple[int, ...]
    sigma_w2: float
    gaussian: bool
    others: str  # the cell's values of other varying axes ("" when none)
    runs: list[Run] = field(default_factory=list)
    r: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ratio: np.ndarray = field(default_factory=lambda: np.zeros(0))
    undefined: int = 0

    @property
    def depth(self) -> int:
        return len(self.widths)

    @property
    def width(self) -> int | str:
        """The width, or the widths as text for a net of unequal layers."""
        return self.widths[0] if len(set(self.widths)) == 1 else \
            "-".join(map(str, self.widths))

    @property
    def inverse_width(self) -> float:
        """sum_l 1/n_l over the hidden layers."""
        return float(sum(1.0 / n for n in self.widths))

    @property
    def dead(self) -> int:
        return int(np.sum(self.ratio == 0))


def cells(sweep: Sweep) -> tuple[list[Cell], list[tuple[str, str]]]:
    """The sweep's described runs pooled into cells (by hidden widths, sigma_w^2 and the
    values of other varying axes), narrowest first, then shallowest; and the runs left
    out, as (run, why)."""
    ended = sweep.runs[sweep.runs["status"] != "failed"] if len(sweep.runs) else sweep.runs
    others = [a for a in varying_axes(ended) if a not in SHAPE] if len(ended) else []
    found: dict[tuple, Cell] = {}
    left_out = []
    for run in sweep.runs_list:
        reason = why_not(run)
        if reason is not None:
            left_out.append((run.name, reason))
            continue
        sigma_w2 = float(run_theory_inputs(run)[1])
        text = ", ".join(label(a, axis_value(run, a), math=False) for a in others)
        widths = hidden_widths(run)
        cell = found.setdefault((widths, sigma_w2, text), Cell(
            widths, sigma_w2, kernel_law(run.config.get("init") or {}) == "gaussian", text))
        r, ratio, undefined = log_ratios(run)
        cell.runs.append(run)
        cell.r = np.concatenate([cell.r, r])
        cell.ratio = np.concatenate([cell.ratio, ratio])
        cell.undefined += undefined
    ordered = sorted(found.values(), key=lambda c: (c.others, min(c.widths), c.widths))
    return ordered, left_out


def variance_se(r: np.ndarray) -> float:
    """The standard error of the sample variance of ``r`` (from its fourth central
    moment: right for heavy tails too; NaN below 4 values)."""
    n = len(r)
    if n < 4:
        return float("nan")
    centred = r - r.mean()
    s2 = float(np.sum(centred ** 2) / (n - 1))
    m4 = float(np.mean(centred ** 4))
    return math.sqrt(max(m4 - (n - 3) / (n - 1) * s2 * s2, 0.0) / n)


def cell_row(cell: Cell) -> dict[str, object]:
    """One row of ``finite_width_table``."""
    exact = theory.relu_log_ratio(cell.widths, cell.sigma_w2)
    leading = theory.relu_log_ratio_leading(cell.widths, cell.sigma_w2)
    mean_exact, second = theory.relu_ratio_moments(cell.widths, cell.sigma_w2)
    n, defined = len(cell.r), len(cell.ratio)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (a cell without seeds)
        row = {
            "width": cell.width, "depth": cell.depth, "seeds": defined,
            "sum_inv_width": cell.inverse_width,
            "var_r": float(np.var(cell.r, ddof=1)) if n > 1 else float("nan"),
            "var_r_se": variance_se(cell.r),
            "var_r_exact": exact.variance, "var_r_leading": leading.variance,
            "mean_r": float(np.mean(cell.r)) if n else float("nan"),
            "mean_r_exact": exact.mean, "mean_r_leading": leading.mean,
            "median_r": float(np.median(cell.r)) if n else float("nan"),
            "median_r_exact": theory.relu_log_ratio_median(cell.widths, cell.sigma_w2),
            "median_ratio": float(np.median(cell.ratio)) if defined else float("nan"),
            "mean_ratio": float(np.mean(cell.ratio)) if defined else float("nan"),
            "mean_ratio_exact": mean_exact,
            "mean_ratio_se": math.sqrt(max(second - mean_exact ** 2, 0.0) / max(defined, 1)),
            "dead_seeds": cell.dead,
            "dead_expected": defined * theory.relu_dead_probability(cell.widths),
        }
    if cell.undefined:
        row["no_output_delta"] = cell.undefined
    if cell.others:
        row["others"] = cell.others
    if cell.sigma_w2 != 2.0:
        row["sigma_w2"] = cell.sigma_w2
    return row


def finite_width_table(sweep: Sweep) -> pd.DataFrame:
    """One row per (width, depth) cell of the runs the theory describes (pooled over
    their runs, e.g. blocks of seeds): the seeds; sum 1/n over the hidden layers; r's
    variance (and its standard error), mean and median over the seeds with no dead
    layer, beside the exact predictions (``theory.relu_log_ratio``; the median from the
    inverted characteristic function, ``theory.relu_log_ratio_median``) and the leading
    ones (5 sum 1/n, -(5/2) sum 1/n at He); the ratio's median and mean over every seed
    (dead ones as 0), the mean's expectation and the standard error a mean of that many
    seeds has (from the exact second moment); the seeds with a dead layer and how many
    were expected. Empty when none applies."""
    found, _ = cells(sweep)
    return pd.DataFrame([cell_row(c) for c in found if len(c.ratio)])


# --- the figure ------------------------------------------------------------------------------


def _straight(ax, x: np.ndarray, slope: float, color, style, width: float = 1.0,
              alpha: float = 1.0) -> None:
    """The line y = slope x through the origin over ``x``."""
    ax.plot(x, slope * x, color=color, linestyle=style, linewidth=width, alpha=alpha)


def finite_width(sweep: Sweep) -> Figure | None:
    """The finite-width fluctuations of r at initialisation (see the module docstring);
    None unless a run of the sweep is described by the theory (``applies``)."""
    if not applies(sweep):
        return None
    found, left_out = cells(sweep)
    found = [c for c in found if len(c.r) > 1]
    if not found:
        return None
    rows = {id(c): cell_row(c) for c in found}
    widths = list(dict.fromkeys(c.width for c in sorted(found, key=lambda c: min(c.widths))))
    colors = dict(zip(widths, palette(len(widths)), strict=True))
    groups = list(dict.fromkeys(c.others for c in found))
    styles = {g: STYLES[i % len(STYLES)] for i, g in enumerate(groups)}
    fig, ax = figure(2, 2, width=10.0, height=3.3, sharex=False)
    spread, collapse, typical, shape = ax[0, 0], ax[0, 1], ax[1, 0], ax[1, 1]
    lines: dict[tuple, list[Cell]] = {}
    for c in found:
        lines.setdefault((c.others, c.width), []).append(c)
    for (group, width), members in lines.items():
        members.sort(key=lambda c: c.depth)
        color, style = colors[width], styles[group]
        depth = np.array([c.depth for c in members], float)
        inverse = np.array([c.inverse_width for c in members])
        var = np.array([rows[id(c)]["var_r"] for c in members])
        se = np.array([rows[id(c)]["var_r_se"] for c in members])
        exact = np.array([rows[id(c)]["var_r_exact"] for c in members])
        leading = np.array([rows[id(c)]["var_r_leading"] for c in members])
        name = f"width {width}" + (f", {group}" if group else "")
        low = np.minimum(ERROR_BARS * se, var * (1 - 1e-3))  # (a log axis: keep > 0)
        for a, x in ((spread, depth), (collapse, inverse)):
            a.errorbar(x, var, yerr=[np.nan_to_num(low), np.nan_to_num(ERROR_BARS * se)],
                       color=color, marker="o", markersize=4, linestyle="none",
                       elinewidth=0.9, capsize=2, label=name, zorder=3)
        spread.plot(depth, exact, color=color, linestyle=style, linewidth=1.1)
        spread.plot(depth, leading, color=color, linestyle=(0, (2, 2)), linewidth=0.9,
                    alpha=0.7)
        # Exact variance = depth x v(n) = (n v(n)) sum 1/n for a uniform net: a straight
        # line through the origin, a little steeper than 5 the narrower the net.
        if isinstance(width, int):
            _straight(collapse, np.array([inverse.min(), inverse.max()]),
                      float(exact[0] / inverse[0]), color, style, 1.1, 0.9)
        median = np.array([rows[id(c)]["median_ratio"] for c in members])
        mean = np.array([rows[id(c)]["mean_ratio"] for c in members])
        scale = np.array([c.sigma_w2 / 2.0 for c in members]) ** depth  # E ratio
        resolved = np.array([rows[id(c)]["mean_ratio_se"] for c in members]) \
            <= MEAN_RESOLVED * scale
        typical.plot(inverse, median / scale, color=color, marker="o", markersize=4,
                     linestyle="none", zorder=3)
        typical.plot(inverse, np.exp([rows[id(c)]["median_r_exact"] for c in members]) / scale,
                     color=color, linestyle=style, linewidth=1.1)
        for keep, alpha in ((resolved, 1.0), (~resolved, 0.3)):
            typical.plot(inverse[keep], mean[keep] / scale[keep], color=color, marker="s",
                         markersize=4.5, markerfacecolor="white", linestyle="none",
                         alpha=alpha, zorder=3)
    top = max(c.inverse_width for c in found)
    bottom = min(c.inverse_width for c in found)
    x = np.geomspace(bottom, top, 50)
    _straight(collapse, x, 5.0, "0.15", (0, (5, 3)), 1.2)
    typical.plot(x, np.exp(-2.5 * x), color="0.15", linestyle=(0, (5, 3)), linewidth=1.2)
    typical.axhline(1.0, color="0.45", linestyle=":", linewidth=1.0)
    _distribution(shape, found, colors)
    one_scale = all(c.sigma_w2 == 2.0 for c in found)
    spread.set(xscale="log", yscale="log", xlabel="depth (hidden layers)",
               ylabel="Var r over seeds",
               title="Var r against depth: one line per width")
    spread.set_xticks(sorted({c.depth for c in found}))
    spread.set_xticklabels([str(d) for d in sorted({c.depth for c in found})])
    spread.minorticks_off()
    collapse.set(xscale="log", yscale="log", xlabel="Σ 1/n over the hidden layers",
                 ylabel="Var r over seeds", title="Var r against Σ 1/n: the widths collapse")
    typical.set(xscale="log", yscale="log", xlabel="Σ 1/n over the hidden layers",
                ylabel="ratio" if one_scale else "ratio / (σ_w²/2)^depth",
                title="Median (●) and mean (□) of ‖δ_first‖² / ‖δ_output‖²")
    handles = [
        Line2D([], [], color="0.2", marker="o", markersize=4, linestyle="none",
               label=f"measured (Var r: ±{ERROR_BARS:g} SE; bottom: the median ratio)"),
        Line2D([], [], color="0.2", linewidth=1.1,
               label="exact: binomial mixture of ln χ², summed over layers"),
        Line2D([], [], color="0.15", linestyle=(0, (5, 3)), linewidth=1.2,
               label="leading order: 5 Σ 1/n, exp(−(5/2) Σ 1/n)"),
        Line2D([], [], color="0.2", marker="s", markerfacecolor="white", markersize=4.5,
               linestyle="none", label="mean ratio (faded: not resolved by the seeds)"),
        Line2D([], [], color="0.45", linestyle=":", label="E ratio = 1 (He)"),
        *[Line2D([], [], color=colors[w], linewidth=2.5, label=f"width {w}")
          for w in widths],
        *[Line2D([], [], color="0.3", linestyle=styles[g], label=g) for g in groups if g],
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=7.5)
    seeds = sorted({len(c.ratio) for c in found})
    runs = [r for c in found for r in c.runs]
    batches = sorted({int(r.config.get("batch_size", 1)) for r in runs})
    suptitle(fig, "Finite-width fluctuations of the gradient at initialisation: "
             "r = ln(‖δ_first‖² / ‖δ_output‖²) per seed, by width and depth",
             constants_label(runs, [*SHAPE, "seed", "seeds"], math=False)
             + (", batch 1 (one fixed input)" if batches == [1] else ""))
    caption(fig, *_notes(found, rows, left_out, seeds))
    return fig


def _distribution(ax, found: Sequence[Cell], colors: dict) -> None:
    """r at the largest depth, one histogram per width, beside its exact density
    (``theory.relu_log_ratio_density``)."""
    deepest = max(c.depth for c in found)
    chosen = [c for c in found if c.depth == deepest]
    pooled = np.concatenate([c.r for c in chosen])
    low, high = np.quantile(pooled, [0.002, 0.998])
    edges = np.linspace(low, high, BINS + 1)
    grid = np.linspace(low, high, 300)
    for c in chosen:
        # (a density of every seed: those outside the bins count in the normalisation)
        ax.hist(c.r, bins=edges, weights=np.full(len(c.r), 1 / (len(c.r) * (edges[1] - edges[0]))),
                histtype="step", color=colors[c.width], linewidth=1.2)
        ax.plot(grid, theory.relu_log_ratio_density(grid, c.widths, c.sigma_w2),
                color=colors[c.width], linestyle=(0, (2, 1.5)), linewidth=1.0)
    ax.set(xlabel="r = ln(‖δ_first‖² / ‖δ_output‖²)", ylabel="density",
           title=f"Distribution of r at depth {deepest}")


def _notes(found: Sequence[Cell], rows: dict, left_out: list[tuple[str, str]],
           seeds: list[int]) -> list[str]:
    pooled = max(len(c.runs) for c in found)
    count = (f"{seeds[0]} seeds" if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]} seeds")
    batches = sorted({int(r.config.get("batch_size", 1)) for c in found for r in c.runs})
    notes = [f"a point: one (width, depth) cell, {count} at step 0 (before any update)"
             + (f", pooled over up to {pooled} runs (blocks of seeds)" if pooled > 1 else "")
             + "; r over the seeds with no dead layer; Var r with ±"
             f"{ERROR_BARS:g} standard errors",
             "lines: the exact prediction, ln X = ln((σ_w²/n) χ²_K) per hidden layer with K ~ "
             "Binomial(n, 1/2) active units, summed over the layers (vgrad.theory."
             "relu_log_ratio; its median and density by inverting its characteristic "
             "function: dashed at bottom right); dashed: the leading order, Var r = "
             "5 Σ 1/n and median r = −(5/2) Σ 1/n (Hanin 2018; Hanin & Nica 2019)",
             "mean ratio faded where the standard error of a mean over this many seeds "
             f"(from E ratio² = Π(1 + 5/n)) exceeds {MEAN_RESOLVED:g}: the mean is then "
             "carried by seeds rarer than one in the sample, and the sample mean falls "
             "below E ratio = 1"]
    if batches != [1]:
        notes.append(f"batch of {'/'.join(map(str, batches))} examples: delta_norm is a mean "
                     "of per-example norms, while the theory is for one input (batch_size=1)")
    dead = [c for c in found if c.dead]
    expected = sum(float(rows[id(c)]["dead_expected"]) for c in found)
    if dead:
        notes.append("seeds with a dead layer (ratio 0: out of r, 0 in the mean ratio): "
                     + ", ".join(f"{c.dead} at width {c.width} depth {c.depth}" for c in dead)
                     + f" ({expected:.2g} expected in all)")
    else:
        notes.append(f"no seed had a dead layer ({expected:.2g} expected in all)")
    undefined = sum(c.undefined for c in found)
    if undefined:
        notes.append(f"{undefined} seeds had an output delta of exactly 0 (a saturated "
                     "output) and no ratio")
    if not all(c.gaussian for c in found):
        notes.append("kernels not Gaussian in some runs (a truncated normal or uniform): "
                     "the theory's factors are the Gaussian ones; the output layer's "
                     "changes at order 1/n with the kernels' fourth moment")
    runs = [r for c in found for r in c.runs]
    if any(r.config.get("loss") != "bce" for r in runs):
        notes.append("several output units: δ_output depends on the output kernel through "
                     "the loss, which the theory ignores (exact for one output unit, bce)")
    if left_out:
        names = "; ".join(f"{name} ({why})" for name, why in left_out[:4])
        more = f" and {len(left_out) - 4} more" if len(left_out) > 4 else ""
        notes.append(f"left out, not described by the theory: {names}{more}")
    return notes
