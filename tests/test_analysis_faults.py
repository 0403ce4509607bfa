"""The analysis where vgrad's science is: exploded, all-zero, corrupt and oddly named
runs; and figures that say what they pool."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from conftest import LIGHT, TINY, script, texts_of

from vgrad import store
from vgrad.analysis import figures, load_run, load_sweep, write_report

# The run figures a default MLP run records: "signal", "curvature" and "gradient_noise"
# need the opt-in forward_signal, hessian and gradient_noise probes, "time" a recurrent
# model, "attention" a model with attention layers.
DEFAULT_FIGURES = [kind for kind in figures.RUN_FIGURES
                   if kind not in ("signal", "time", "curvature", "gradient_noise",
                                   "attention")]
#: The probes the sweep figures (profile, bars, heatmap) draw, and no more: compiling is
#: these tests' cost.
SWEEP_PROBES = ["record.step_probes=[global_norms,kernel_grad_stats,delta_norm]",
                "record.epoch_probes=[evaluation]"]


def scripts_work(sweep: Path, out: Path, x: str) -> str:
    """Run the three scripts on a sweep; return the report page."""
    for cmd in (["scripts/report.py", str(sweep), "--out", str(out / "report"), "--jobs", "1"],
                ["scripts/plot_sweep.py", str(sweep), "--x", x, "--out", str(out / "sweep")],
                ["scripts/plot_run.py", str(next(sweep.glob("*/summary.json")).parent),
                 "--out", str(out / "run")]):
        proc = script(*cmd)  # in-process: what they draw is the subject here
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
    return (out / "report" / "index.html").read_text()


@pytest.fixture(scope="module")
def exploded(tmp_path_factory):
    """Mixed (some seeds diverge) and all-diverged sweeps."""
    from conftest import cli_main

    root = tmp_path_factory.mktemp("exploded")
    code = cli_main("-m", "act=relu", "optim=sgd", "optim.lr=1e6,1e7", "seeds=3", *TINY,
                    f"hydra.sweep.dir={root / 'mixed'}")
    assert code == 0
    code = cli_main("-m", "act=relu", "init.std=1e30,1e31", *TINY,
                    f"hydra.sweep.dir={root / 'all'}")
    assert code == 0
    return root


@pytest.mark.slow
def test_exploded_sweeps_get_their_figures_and_pages(exploded, tmp_path):
    for name, x in (("mixed", "optim.lr"), ("all", "init.std")):
        sweep = load_sweep(exploded / name)
        assert sweep.runs["diverged"].any()
        if name == "all":  # the scripts, as a user runs them
            page = scripts_work(exploded / name, tmp_path / name, x)
        else:
            page = write_report(exploded / name, tmp_path / name / "report", jobs=1).read_text()
        assert "diverged" in page
        # Every figure of every run and of the sweep is drawn (not blank).
        pngs = list((tmp_path / name / "report" / "figures").glob("*.png"))
        n_runs = len(sweep.runs_list)
        assert len([p for p in pngs if p.name.startswith("run_")]) == (
            n_runs * len(DEFAULT_FIGURES))
        assert all(p.stat().st_size > 1000 for p in pngs)
    all_diverged = load_sweep(exploded / "all")
    assert all_diverged.runs["diverged"].all()
    assert "Every seed of every run diverged" in (tmp_path / "all" / "report" /
                                                   "index.html").read_text()
    profile = figures.profile(all_diverged, "init.std")
    assert "seeds diverged" in texts_of(profile)
    # plot_sweep keeps dotted axis names whole
    assert (tmp_path / "all" / "sweep" / "profile_init.std.png").is_file()
    plt.close("all")


def test_all_zero_gradients_are_drawn_as_a_note(cli, tmp_path):
    code, _, err = cli("-m", "act=relu", "init.std=0", "seeds=2", *TINY,
                       f"hydra.sweep.dir={tmp_path / 'zero'}")
    assert code == 0, err
    sweep = load_sweep(tmp_path / "zero")
    run = sweep.runs_list[0]
    assert np.nanmax(run.metrics["grad_norm"][:, :, :-1]) == 0  # only the output layer moves
    fig = figures.gradients(run)
    assert figures.save(fig, tmp_path / "g")[0].is_file()
    profile = figures.profile(sweep, "act")
    figures.save(profile, tmp_path / "p")
    hist = figures.histograms(run)
    assert "below 1e-12" in texts_of(hist) or "dead" in texts_of(hist)
    plt.close("all")
    write_report(tmp_path / "zero", tmp_path / "report", jobs=1)


def test_dotted_and_quoted_folder_names_get_their_own_figures(cli, tmp_path):
    sweep = tmp_path / "sweep"
    code, _, err = cli("-m", "optim.lr=0.001,0.01", *TINY, f"hydra.sweep.dir={sweep}",
                       "hydra.sweep.subdir=lr${optim.lr}")
    assert code == 0, err
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name != ".vgrad")
    assert runs == ["lr0.001", "lr0.01"]  # (.vgrad/: the sweep's command history)
    odd = sweep / "it's \"dq\" star*q?"
    shutil.copytree(sweep / "lr0.01", odd)
    summary = json.loads((odd / store.SUMMARY).read_text())
    summary["config"]["optim"]["lr"] = 0.1  # a third value, for the figures
    (odd / store.SUMMARY).write_text(json.dumps(summary))
    page = write_report(sweep, tmp_path / "report", jobs=1).read_text()
    sources = [part.split('"')[0] for part in page.split('<img src="')[1:]]
    per_run = [s for s in sources if "/run_" in s]
    assert len(per_run) == 3 * len(DEFAULT_FIGURES)
    assert len(set(per_run)) == len(per_run)  # every run's figures are its own
    for src in sources:
        from urllib.parse import unquote

        assert (tmp_path / "report" / unquote(src)).is_file()
    assert "it&#x27;s &quot;dq&quot; star*q?" in page  # the name, escaped


def test_a_corrupt_run_is_skipped_with_a_warning_naming_the_file(cli, tmp_path):
    code, _, err = cli("-m", "act=tanh,relu,sigmoid", *TINY, *LIGHT,
                       f"hydra.sweep.dir={tmp_path}")
    assert code == 0, err
    (tmp_path / "0" / store.METRICS).write_bytes(b"")  # zero bytes
    (tmp_path / "1" / store.SUMMARY).write_text(json.dumps({"hello": 1}))  # not a summary
    with pytest.warns(UserWarning) as caught:
        sweep = load_sweep(tmp_path)
    messages = " ".join(str(w.message) for w in caught)
    assert str(tmp_path / "0" / store.METRICS) in messages
    assert str(tmp_path / "1" / store.SUMMARY) in messages
    assert list(sweep.runs["run"].unique()) == ["2"]
    for cmd in (["scripts/plot_run.py", str(tmp_path / "0")],
                ["scripts/report.py", str(tmp_path), "--out", str(tmp_path / "report"),
                 "--jobs", "1"]):
        proc = script(*cmd)
        assert "Traceback" not in proc.stderr
        lines = [line for line in proc.stderr.splitlines() if "error" in line]
        assert proc.returncode == (2 if "plot_run" in cmd[0] else 0), proc.stderr
        assert len(lines) <= 1
    with pytest.raises(ValueError, match="metrics.npz"):
        load_run(tmp_path / "0")


def test_sweep_figures_name_what_they_pool(cli, tmp_path):
    code, _, err = cli("-m", "act=tanh,relu", "depth=1,2", "optim.lr=0.001,0.01", *TINY,
                       *SWEEP_PROBES, f"hydra.sweep.dir={tmp_path}")
    assert code == 0, err
    sweep = load_sweep(tmp_path)
    profile = figures.profile(sweep, "act")  # act: colour, depth: style, lr: pooled
    assert "pooled over optim.lr (0.001, 0.01)" in texts_of(profile)
    labels = [t.get_text() for legend in profile.legends for t in legend.get_texts()]
    assert "act=tanh, depth=1" in labels and len(set(labels)) == len(labels)
    bars = figures.bars(sweep, "act")
    text = " ".join(texts_of(bars).split())  # depth: grouped bars; lr: pooled, and said
    assert "configurations (pooled over optim.lr (0.001, 0.01))" in text
    assert {"depth=1", "depth=2"} <= {t.get_text() for g in bars.legends for t in g.get_texts()}
    assert "median" in texts_of(bars)
    assert bars.axes[0].get_ylim()[1] <= 1.05  # accuracy bars stay within their range
    heat = figures.heatmap(sweep, "act", "depth")
    assert "pooled over optim.lr" in texts_of(heat)
    assert [t.get_text() for t in heat.axes[0].get_xticklabels()] == ["tanh", "relu"]
    colors = [line.get_color() for line in profile.axes[0].get_lines()]
    assert len({c for c in colors}) == 2  # one colour per activation, never repeated
    plt.close("all")


def test_histograms_pool_seeds_and_say_so(cli, tmp_path):
    code, _, err = cli(*TINY, "seeds=3", f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    run = load_run(tmp_path)
    pooled = figures.histograms(run)
    assert "pooled over 3 seed(s)" in texts_of(pooled)
    one = figures.histograms(run, seed=1)
    assert "seed index 1" in texts_of(one)
    plt.close("all")


def test_many_layers_get_a_colour_bar_not_a_legend(cli, tmp_path):
    code, _, err = cli(*TINY, "depth=20", "width=3", "act=tanh", f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    fig = figures.gradients(load_run(tmp_path))
    assert not fig.legends and any(ax.get_label() == "<colorbar>" for ax in fig.axes)
    plt.close("all")
