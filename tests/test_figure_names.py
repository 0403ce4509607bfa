"""Figures name what they show: run figures by the sweep's varying axes (math names),
bars draw a second swept axis instead of pooling it, the profile keeps its legend and
draws only what was recorded, regression sweeps show losses with their baseline, and
every text lies inside its figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from conftest import TINY, cli_main, texts_of
from matplotlib.collections import LineCollection

from vgrad.analysis import figures, load_sweep

#: Enough probes for every default run figure, and no more (compiling is the cost).
PROBES = ["record.step_probes=[global_norms,kernel_grad_stats,bias_grad_norm,delta_norm,"
          "update_stats]",
          "record.epoch_probes=[evaluation,weight_stats,activation_stats,histograms]"]


def train(root: Path, *overrides: str, tiny: tuple[str, ...] = tuple(TINY)) -> Path:
    assert cli_main("-m", *overrides, *tiny, f"hydra.sweep.dir={root}") == 0
    return root


@pytest.fixture(scope="module")
def two_axes(tmp_path_factory) -> Path:
    """act x depth, two seeds: four configurations."""
    return train(tmp_path_factory.mktemp("two_axes"), "act=tanh,relu", "depth=2,3",
                 "seeds=2", *PROBES)


@pytest.fixture(scope="module")
def residual(tmp_path_factory) -> Path:
    """Two residual nets that differ only in the branch scale (alpha = 1, ReZero)."""
    return train(tmp_path_factory.mktemp("residual"), "model=resmlp",
                 "model.alpha=one,rezero", "depth=3", *PROBES)


@pytest.fixture(scope="module")
def delta_only(tmp_path_factory) -> Path:
    """A small phase-diagram sweep that records delta but no kernel gradients."""
    return train(tmp_path_factory.mktemp("delta_only"), "init=mean_field",
                 "bias_init=mean_field", "init.sigma_w2=1.0,2.0", "act=tanh", "depth=3",
                 "width=8", "record.step_probes=[global_norms,delta_norm]",
                 "record.epoch_probes=[evaluation]")


@pytest.fixture(scope="module")
def adding(tmp_path_factory) -> Path:
    """Recurrent nets of one layer on the adding problem (a regression task)."""
    return train(tmp_path_factory.mktemp("adding"), "model=rnn", "act=tanh,relu",
                 "data=adding", "loss=regression", "data.length=5", "data.n_train=64",
                 "data.n_test=16", "depth=1", "width=4", "seeds=2",
                 "record.step_probes=[global_norms,delta_norm,time_delta_norm]",
                 "record.epoch_probes=[evaluation]", tiny=("epochs=2", "progress=false"))


def drawn_texts(fig) -> list:
    """Every text a figure draws: titles, labels, notes, legends, the tick labels of
    ticks in view (matplotlib keeps spare ticks outside it), of visible axes."""
    out = [fig._suptitle] if fig._suptitle else []
    out += list(fig.texts)
    for legend in fig.legends:
        out += [*legend.get_texts(), legend.get_title()]
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        out += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label,
                ax.xaxis.offsetText, ax.yaxis.offsetText, *ax.texts]
        if ax.get_legend():
            out += [*ax.get_legend().get_texts(), ax.get_legend().get_title()]
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            slack = 1e-9 * abs(high - low)
            out += [label for tick in axis.get_major_ticks() + axis.get_minor_ticks()
                    if low - slack <= tick.get_loc() <= high + slack
                    for label in (tick.label1, tick.label2)]
    return [t for t in out if t.get_visible() and t.get_text().strip()]


def assert_inside(fig, what: str) -> None:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    for text in drawn_texts(fig):
        box = text.get_window_extent(renderer)
        assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= width + 1 \
            and box.y1 <= height + 1, (what, text.get_text(), box.extents, (width, height))


def run_figures(sweep, varying):
    for run in sweep.runs_list:
        for kind, make in figures.RUN_FIGURES.items():
            fig = make(run, varying=varying)
            if fig is not None:
                yield run, kind, fig


def test_run_figures_name_the_run_by_every_varying_axis(two_axes):
    sweep = load_sweep(two_axes)
    axes = figures.varying_axes(sweep.runs)
    assert axes == ["act", "depth"]
    titles: dict[str, set[str]] = {}
    for run, kind, fig in run_figures(sweep, axes):
        title = fig._suptitle.get_text()
        for axis in axes:
            assert figures.label(axis, figures.axis_value(run, axis)) in title, (kind, title)
        titles.setdefault(kind, set()).add(title.split("\n")[0])
        plt.close(fig)
    assert titles and all(len(t) == len(sweep.runs_list) for t in titles.values()), titles
    # the page names the run the same way, in plain text
    run = sweep.runs_list[0]
    assert figures.run_label(run, axes, math=False) == \
        f"act={run.config['act']['name']}, depth={run.config['depth']}"


def test_runs_differing_only_in_alpha_are_titled_apart_also_without_a_sweep(residual):
    sweep = load_sweep(residual)
    assert figures.varying_axes(sweep.runs) == ["model.alpha"]
    titles = [figures.gradients(run)._suptitle.get_text() for run in sweep.runs_list]
    assert len(set(titles)) == 2
    assert any(r"$\alpha$=ReZero" in t for t in titles)
    assert any(r"$\alpha$=1" in t for t in titles)
    named = [figures.gradients(run, varying=["model.alpha"])._suptitle.get_text()
             for run in sweep.runs_list]
    assert [t.split("\n")[0] for t in named] == [
        r"Kernel gradients — $\alpha$=1", r"Kernel gradients — $\alpha$=ReZero"]
    plt.close("all")


def test_bars_over_two_axes_draw_both(two_axes):
    sweep = load_sweep(two_axes)
    fig = figures.bars(sweep, "act")
    a = fig.axes[0]
    assert len(a.patches) == 4  # one bar per configuration: act x depth
    ticks = [t.get_text() for t in a.get_xticklabels()]
    legend = [t.get_text() for g in fig.legends for t in g.get_texts()]
    assert ticks == ["tanh", "relu"] and {"depth=2", "depth=3"} <= set(legend)
    text = texts_of(fig)
    assert "pooled" not in text and "seeds of one configuration" in text
    assert a.get_ylim()[1] <= 1.05
    chance = [c for c in a.collections if c.get_label().startswith("chance")]
    assert len(chance) == 1 and chance[0].get_label() == "chance: 1/2 = 0.5"
    short = fig._suptitle.get_text()
    assert short.startswith("Final accuracy by act and depth") and "median" not in short
    plt.close(fig)
    one = figures.bars(sweep, "act", hue="")  # asked to pool depth: says so
    assert len(one.axes[0].patches) == 2
    assert "configurations (pooled over depth (2, 3))" in " ".join(texts_of(one).split())
    plt.close(one)


def test_profile_has_a_legend_and_only_recorded_panels(delta_only):
    sweep = load_sweep(delta_only)
    fig = figures.profile(sweep, "init.sigma_w2")
    assert len(fig.axes) == 2  # delta at step 0 and late: no empty gradient panels
    delta = r"mean $\Vert\delta_l\Vert$"
    assert [a.get_title() for a in fig.axes] == [f"{delta} at step 0",
                                                 f"{delta} (last 10% of steps)"]
    legend = [t.get_text() for g in fig.legends for t in g.get_texts()]
    assert any(t.startswith(r"$\sigma_w^2$=1.0: χ₁ = ") for t in legend), legend
    assert any(t.startswith(r"$\sigma_w^2$=2.0: χ₁ = ") for t in legend), legend
    assert "χ₁ =" not in fig._suptitle.get_text()  # in the legend, not the title
    assert "grad_norm was not recorded in these runs" in texts_of(fig)
    for a in fig.axes:
        ticks = a.get_xticks()
        assert np.allclose(ticks, np.round(ticks)) and len(set(np.diff(ticks))) == 1
    assert_inside(fig, "profile")
    plt.close(fig)


def test_exactly_zero_gradients_are_marked_not_silently_missing(residual):
    sweep = load_sweep(residual)
    fig = figures.profile(sweep, "model.alpha")
    grad_init = fig.axes[0]
    assert grad_init.get_title() == r"$\Vert\partial L/\partial W_l\Vert$ at step 0"
    assert grad_init.collections  # the zero markers
    assert r"exactly 0 there, which a log axis cannot draw: $\alpha$=ReZero" in \
        texts_of(fig)
    plt.close(fig)


def test_a_regression_sweep_shows_losses_with_their_baseline(adding):
    sweep = load_sweep(adding)
    bars = figures.bars(sweep, "act")
    text = texts_of(bars)
    assert "accuracy" not in text
    a = bars.axes[0]
    assert a.get_title() == "train loss" and a.get_yscale() == "log"
    assert a.get_ylabel() == "loss"
    baseline = [c for c in a.collections if isinstance(c, LineCollection)
                and c.get_label().startswith("predicting the mean")]
    assert len(baseline) == 1 and "Var(target)" in baseline[0].get_label()
    value = baseline[0].get_segments()[0][0][1]
    assert 0.1 < value < 0.3  # 1/6 for the adding problem, from 64 targets
    assert figures.default_metric(sweep) == "final_test_loss"
    curves = figures.curves(sweep, "act")
    assert curves.axes[0].get_yscale() == "log"
    assert any("Var(target)" in t.get_text() for t in curves.axes[0].get_legend().get_texts())
    # a depth-1 recurrent net has no profile across layers: its profile is through time
    assert figures.profile(sweep, "act") is None
    time = figures.time_profile(sweep, "act")
    assert time.axes[0].get_xlabel() == figures.TIME_AXIS
    names = [name for name, _, fig in figures.sweep_figures(sweep)]
    assert "profile" not in names and "accuracy_curves" not in names
    assert {"time_profile", "bars", "loss_curves", "grad_norm_steps"} <= set(names)
    run = sweep.runs_list[0]
    assert figures.through_time(run).axes[0].get_xlabel() == figures.TIME_AXIS
    plt.close("all")


def test_no_text_outside_any_figure(two_axes, adding):
    for root in (two_axes, adding):
        sweep = load_sweep(root)
        axes = figures.varying_axes(sweep.runs)
        for name, caption, fig in figures.sweep_figures(sweep, axes):
            assert caption
            assert_inside(fig, name)
            plt.close(fig)
        for run, kind, fig in run_figures(sweep, axes):
            assert_inside(fig, f"{run.name} {kind}")
            plt.close(fig)


def test_registry_and_per_layer_curves(two_axes):
    sweep = load_sweep(two_axes)
    drawn = {name: caption for name, caption, fig in figures.sweep_figures(sweep)}
    plt.close("all")
    assert list(drawn) == [n for n in figures.SWEEP_FIGURES if n in drawn]  # registry order
    assert {"profile", "bars", "loss_curves", "accuracy_curves", "heatmap"} <= set(drawn)
    assert drawn["profile"] == "Gradient profile across layers by act"
    with pytest.raises(ValueError, match=r"'update_ratio' has axes \['seed', 'step', "
                                         r"'layer'\]: one value per layer; pass layer=") as e:
        figures.curves(sweep, "act", "update_ratio")
    assert "\n" not in str(e.value)
    fig = figures.curves(sweep, "act", "update_ratio", layer=0)
    a = fig.axes[0]
    assert a.get_yscale() == "log"
    assert a.get_title().startswith("update ratio ‖ΔW‖ / ‖W‖ of dense_0")
    assert len(a.get_lines()) == 4  # act (colour) x depth (line style)
    named = figures.curves(sweep, "act", "update_ratio", layer="dense_1")
    assert named.axes[0].get_title().startswith("update ratio ‖ΔW‖ / ‖W‖ of dense_1")
    with pytest.raises(ValueError, match="no layer 'nope'"):
        figures.curves(sweep, "act", "update_ratio", layer="nope")
    plt.close("all")
