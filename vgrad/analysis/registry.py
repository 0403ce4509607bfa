"""The figure registries: which figures there are, what each is called, and when a
sweep's figure applies. The report (``vgrad-report``), ``vgrad-plot-run`` and
``vgrad-plot-sweep`` all read them; nothing else lists the figures.

- ``RUN_FIGURES``: name -> the run figure's function (``run_figures``);
  ``unrecorded`` says which probe records a figure a run lacks.
- ``SWEEP_FIGURES``: name -> ``SweepFigure`` (how to draw it over a sweep's varying
  axes, whether it applies, its caption on a page, and, for those ``vgrad-plot-sweep``
  draws, its file name and which of the command's axes it takes), in the order a report
  shows them: the figures of ``sweep_figures`` and ``theory_figures``.
  ``sweep_figures(sweep)`` draws those that apply, for the report;
  ``command_figures`` lists those the command draws for its ``--x``/``--y``/``--hue``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from vgrad.analysis import (
    coord_figures,
    noise_figures,
    theory_figures,
    transformer_figures,
    width_figures,
)
from vgrad.analysis.naming import axis_name, metric_text, varying_axes
from vgrad.analysis.recorded import one_recurrent_layer, recorded, recurrent, regression
from vgrad.analysis.run_figures import (
    curvature,
    gradients,
    histograms,
    learning_speed,
    saturation,
    signal,
    through_time,
    weights,
)
from vgrad.analysis.sweep_figures import (
    bars,
    curves,
    default_metric,
    heatmap,
    profile,
    time_profile,
)
from vgrad.analysis.tables import Run, Sweep

#: The figures of one run: name -> function(run, varying=None) -> Figure | None (None:
#: the run did not record what the figure draws).
RUN_FIGURES: dict[str, Callable[..., Figure | None]] = {
    "gradients": gradients, "weights": weights, "learning_speed": learning_speed,
    "histograms": histograms, "saturation": saturation, "signal": signal,
    "time": through_time, "curvature": curvature,
    "gradient_noise": noise_figures.gradient_noise,
    "attention": transformer_figures.attention}

#: The probe (``record.step_probes`` or ``record.epoch_probes``) that records what each
#: run figure draws, for the note of a run that did not.
RUN_FIGURE_PROBES = {
    "gradients": "step probe kernel_grad_stats", "weights": "epoch probe weight_stats",
    "learning_speed": "step probe bias_grad_norm or epoch probe probe_bias_grad_norm",
    "histograms": "epoch probe histograms", "saturation": "epoch probe activation_stats",
    "signal": "epoch probe forward_signal", "time": "step probe time_delta_norm",
    "curvature": "epoch probe hessian", "gradient_noise": "step probe gradient_noise",
    "attention": "epoch probe attention_entropy"}


def unrecorded(run: Run, kind: str) -> str | None:
    """What to tell a reader of ``run`` about its missing figure ``kind``: which probe
    records it, or None where the figure does not apply (through time: recurrent nets
    only; attention: models with attention layers)."""
    if kind == "time" and not recurrent(run):
        return None
    if kind == "attention" and not transformer_figures.block_layers(run):
        return None
    return f"{kind.replace('_', ' ')} ({RUN_FIGURE_PROBES[kind]})"


def _ended(sweep: Sweep) -> pd.DataFrame:
    runs = sweep.runs
    return runs[runs["status"] != "failed"] if len(runs) else runs


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


@dataclass(frozen=True)
class Command:
    """How ``vgrad-plot-sweep`` draws a registered sweep figure: the command's axes it
    takes, in order (``"x"``, ``"y"``, ``"hue"``; ``--hue`` defaults to ``--x``), the
    command's options it passes on as keywords (``"metric"``), and the name of its files:
    ``stem`` and those axes, joined by ``_`` (``profile_act``, ``heatmap_act_depth``)."""

    stem: str
    axes: tuple[str, ...]
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class SweepFigure:
    """A figure of a whole sweep, as the report and the command line draw it.
    ``axes``: the sweep's varying axes (``varying_axes``); the first is the figure's
    hue, the second (if any) its line style, group or heatmap row."""

    #: ``draw(sweep, axes, **options)``: the figure, or None when the runs lack what it
    #: needs (options: those of ``command``).
    draw: Callable[..., Figure | None]
    #: ``applies(sweep, axes)``: whether the figure says something about this sweep.
    applies: Callable[[Sweep, Sequence[str]], bool]
    #: ``caption(sweep, axes)``: the figure's caption on a page (plain text).
    caption: Callable[[Sweep, Sequence[str]], str]
    #: How ``vgrad-plot-sweep`` draws it (``command_figures``); None: it does not.
    command: Command | None = None


def _not_depth(axes: Sequence[str]) -> str:
    """The first axis but depth (which the block profile draws as its panels)."""
    return next((a for a in axes if a != "depth"), axes[0])


def _by(axes: Sequence[str]) -> str:
    return axis_name(axes[0], math=False)


#: Bars a figure of the registry draws at most (a larger sweep: its heatmap).
MAX_BARS = 40


#: The sweep figures, in the order a report shows them: name -> SweepFigure.
SWEEP_FIGURES: dict[str, SweepFigure] = {
    "profile": SweepFigure(
        lambda s, axes: profile(s, axes[0]),
        lambda s, axes: not all(one_recurrent_layer(r) for r in _ended_runs(s)),
        lambda s, axes: f"Gradient profile across layers by {_by(axes)}",
        Command("profile", ("hue",))),
    "time_profile": SweepFigure(
        lambda s, axes: time_profile(s, axes[0]),
        lambda s, axes: any("time_delta_norm" in r.metrics for r in _ended_runs(s)),
        lambda s, axes: f"Gradient through time by {_by(axes)} (‖∂L/∂h_t‖ against T − t)",
        Command("time", ("hue",))),
    "block_profile": SweepFigure(
        lambda s, axes: transformer_figures.block_profile(s, _not_depth(axes)),
        lambda s, axes: transformer_figures.applies(s),
        lambda s, axes: (f"Gradient of each block's MLP output kernel at initialisation by "
                         f"{axis_name(_not_depth(axes), math=False)} (Xiong et al. 2020)"),
        Command("blocks", ("hue",))),
    "finite_width": SweepFigure(
        lambda s, axes: width_figures.finite_width(s),
        lambda s, axes: width_figures.applies(s),
        lambda s, axes: ("Finite-width fluctuations of the gradient at initialisation: the "
                         "spread and the median of r = ln(‖δ_first‖²/‖δ_output‖²) over seeds "
                         "against depth and Σ 1/width (Hanin 2018; Hanin & Nica 2019)"),
        Command("finite_width", ())),
    "coord_check": SweepFigure(
        lambda s, axes: coord_figures.coord_check(s),
        lambda s, axes: coord_figures.applies(s),
        lambda s, axes: ("Coordinate check: each layer's change since initialisation against "
                         "width, a panel per step (Yang et al. 2022, Tensor Programs V)"),
        Command("coord_check", ())),
    "bars": SweepFigure(
        lambda s, axes: bars(s, axes[0]),
        lambda s, axes: _configs(s) <= MAX_BARS,
        lambda s, axes: (f"Final {'loss' if not _classification(s) else 'accuracy'} by "
                         f"{_by(axes)}" + (f" and {axis_name(axes[1], False)}"
                                           if len(axes) > 1 else "")),
        Command("bars", ("x",))),
    "loss_curves": SweepFigure(
        lambda s, axes: curves(s, axes[0], "train_loss"),
        lambda s, axes: True,
        lambda s, axes: f"Training loss by {_by(axes)}",
        Command("curves", ("hue",))),
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
        lambda s, axes, metric=None: heatmap(s, axes[0], axes[1], metric),
        lambda s, axes: len(axes) > 1,
        lambda s, axes: (f"{metric_text(default_metric(s))} over "
                         f"{_by(axes)} × {axis_name(axes[1], False)}"),
        Command("heatmap", ("x", "y"), options=("metric",))),
    "noise_and_sharpness": SweepFigure(
        lambda s, axes: noise_figures.noise_and_sharpness(s, axes[0]),
        lambda s, axes: noise_figures.applies(s),
        lambda s, axes: (f"Gradient noise scale, GSNR and sharpness by {_by(axes)}, at "
                         "initialisation and late in training"),
        Command("noise", ("x",))),
    "phase_diagram": SweepFigure(
        lambda s, axes: theory_figures.phase_diagram(s), lambda s, axes: True,
        lambda s, axes: "Trainability phase diagram with the 6 ξ_c curve of mean-field theory"),
    "signal_theory": SweepFigure(
        lambda s, axes: theory_figures.signal_theory(s), lambda s, axes: True,
        lambda s, axes: "Correlation and δ across layers at initialisation: measured vs theory"),
    "isometry": SweepFigure(
        lambda s, axes: theory_figures.isometry(s), lambda s, axes: True,
        lambda s, axes: "Dynamical isometry: Jacobian singular values against depth"),
}


def sweep_figures(sweep: Sweep, axes: Sequence[str] | None = None
                  ) -> Iterator[tuple[str, str, Figure]]:
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


def command_figures(sweep: Sweep, x: str, y: str | None = None, hue: str | None = None,
                    metric: str | None = None) -> dict[str, Callable[[], Figure | None]]:
    """The figures ``vgrad-plot-sweep`` draws for its axes ``--x``, ``--y``, ``--hue``
    (default ``x``) and ``--metric``: file name (no suffix) -> a function drawing the
    figure (None: the runs lack what it needs), in the registry's order, for every
    registered figure with a ``command`` whose axes were given (the heatmap only with
    ``y``). Nothing is drawn until a function is called."""
    given = {"x": x, "y": y, "hue": hue or x}
    options = {"metric": metric}
    made: dict[str, Callable[[], Figure | None]] = {}
    for entry in SWEEP_FIGURES.values():
        command = entry.command
        if command is None or not all(given[a] for a in command.axes):
            continue
        axes = [given[a] for a in command.axes]
        made["_".join([command.stem, *axes])] = functools.partial(
            entry.draw, sweep, axes, **{o: options[o] for o in command.options})
    return made
