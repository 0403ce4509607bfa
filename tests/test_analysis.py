"""Analysis: tables, figures and the report, on a real tiny sweep made here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from conftest import DIVERGENT_CLI, cli_main, script

from vgrad import store
from vgrad.analysis import figures, load_run, load_sweep, write_report

REPO = Path(__file__).resolve().parent.parent
SWEEP = ["-m", "act=tanh,relu", "depth=1,2", "seeds=2", "epochs=2", "data.n_samples=64",
         "batch_size=16", "progress=false"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """A real multirun: 2 activations x 2 depths x 2 seeds, 2 epochs of 4 steps."""
    out = tmp_path_factory.mktemp("sweep")
    assert cli_main(*SWEEP, f"hydra.sweep.dir={out}") == 0
    return out


def test_runs_table_has_a_row_per_run_and_seed_with_config_columns(sweep_dir):
    runs = load_sweep(sweep_dir).runs
    assert len(runs) == 8
    assert set(runs["act.name"]) == {"tanh", "relu"} and set(runs["depth"]) == {1, 2}
    assert sorted(runs["seed"].unique()) == [0, 1]
    assert (runs["status"] == "completed").all() and not runs["diverged"].any()
    assert runs.groupby(["act.name", "depth"]).size().eq(2).all()
    for _, row in runs.iterrows():  # values come from the run's own files
        summary = store.read_summary(Path(row["run_dir"]))
        seed = next(s for s in summary["per_seed"] if s["seed"] == row["seed"])
        assert row["final_train_acc"] == pytest.approx(seed["final"]["train_acc"])
        assert row["optim.lr"] == summary["config"]["optim"]["lr"]


def test_the_callback_wrote_the_runs_table(sweep_dir):
    import pandas as pd

    written = pd.read_csv(sweep_dir / "runs.csv")
    assert len(written) == 8 and {"act.name", "depth", "final_train_acc"} <= set(written)


def test_series_tables_equal_the_metrics_arrays(sweep_dir):
    sweep = load_sweep(sweep_dir)
    steps, epochs = sweep.steps(), sweep.epochs()
    for run in sweep.runs_list:
        m = store.read_metrics(run.path)
        S, T, L = m["grad_std"].shape
        rows = steps[steps["run"] == run.name]
        assert len(rows) == S * T * L
        for s, seed in enumerate(sorted(rows["seed"].unique())):
            for layer in range(L):
                sel = rows[(rows["seed"] == seed) & (rows["layer_index"] == layer)]
                np.testing.assert_array_equal(sel["step"], m["step"])
                np.testing.assert_array_equal(sel["grad_std"], m["grad_std"][s, :, layer])
                np.testing.assert_array_equal(sel["loss"], m["loss"][s])
        erows = epochs[epochs["run"] == run.name]
        assert len(erows) == S * len(m["epoch"]) * L
        out_layer = erows[erows["layer_index"] == L - 1]
        assert out_layer["act_sat_frac"].isna().all()  # hidden-layer statistic
        first = erows[(erows["seed"] == erows["seed"].min()) & (erows["layer_index"] == 0)]
        np.testing.assert_array_equal(first["weight_std"], m["weight_std"][0, :, 0])
        np.testing.assert_array_equal(first["act_dead_frac"], m["act_dead_frac"][0, :, 0])


def lines_of(fig) -> list[int]:
    return [len(ax.get_lines()) for ax in fig.axes if ax.get_visible()]


def labels_of(fig) -> str:
    return " ".join([ax.get_title() + ax.get_xlabel() + ax.get_ylabel() for ax in fig.axes]
                    + [fig._suptitle.get_text() if fig._suptitle else ""])


def test_run_figures_have_the_expected_panels_lines_and_labels(sweep_dir, tmp_path):
    sweep = load_sweep(sweep_dir)
    run = next(r for r in sweep.runs_list if r.config["depth"] == 2)  # L = 3 layers
    fig = figures.gradients(run)
    assert lines_of(fig) == [3, 3, 1]
    assert "std ∂L/∂W" in labels_of(fig) and "step" in labels_of(fig)
    assert fig.axes[1].get_yscale() == "log"
    assert lines_of(figures.weights(run)) == [3, 3]
    assert lines_of(figures.learning_speed(run)) == [3, 3]
    assert lines_of(figures.saturation(run)) == [2, 2]  # hidden layers only
    assert figures.signal(run) is None  # forward_signal is opt-in: not recorded here
    hist = figures.histograms(run)
    assert sum(len(ax.collections) for ax in hist.axes) >= 3
    plt.close("all")
    for name, make in figures.RUN_FIGURES.items():
        if name in ("signal", "time", "curvature", "gradient_noise", "attention"):
            continue  # not recorded here (opt-in; recurrent nets; attention): elsewhere
        png = figures.save(make(run), tmp_path / name)[0]
        assert png.stat().st_size > 5000 and png.with_suffix(".pdf").stat().st_size > 1000
    assert not plt.get_fignums()  # save() closes


def test_sweep_figures(sweep_dir, tmp_path):
    sweep = load_sweep(sweep_dir)
    profile = figures.profile(sweep, "act")
    # 2 activations x 2 depths (nets of different depths get their own lines), 4 panels
    assert lines_of(profile) == [4, 4, 4, 4]
    assert "layer (0 = next to the input)" in labels_of(profile)
    assert r"\delta_l" in labels_of(profile)
    bars = figures.bars(sweep, "act")
    assert len(bars.axes[0].patches) == 4  # train accuracy per act x depth (no test set)
    curves = figures.curves(sweep, "depth")  # depth by colour, act by line style
    assert lines_of(curves) == [4]
    assert "pooled" not in labels_of(curves)
    assert {line.get_linestyle() for line in curves.axes[0].get_lines()} == {"-", "--"}
    heat = figures.heatmap(sweep, "act", "depth")
    assert heat.axes[0].get_xlabel() == "act" and heat.axes[0].get_ylabel() == "depth"
    assert len(heat.axes[0].texts) == 4
    for fig in (profile, bars, heat):
        assert figures.save(fig, tmp_path / "f")[0].stat().st_size > 5000
    with pytest.raises(KeyError, match="no sweep axis 'colour'"):
        figures.bars(sweep, "colour")


def test_report_references_every_figure_and_the_runs_table(sweep_dir, tmp_path):
    index = write_report(sweep_dir, tmp_path / "report", jobs=1)
    page = index.read_text()
    images = sorted(p.relative_to(index.parent).as_posix()
                    for p in (index.parent / "figures").glob("*.png"))
    assert images and all(f'src="{img}"' in page for img in images)
    assert 'href="runs.csv"' in page and (index.parent / "runs.csv").is_file()
    assert "python -m vgrad.train -m" in page and "act=tanh,relu" in page
    assert page.count("<h3>Run ") == 4
    assert "heatmap" not in page or "act × depth" in page
    # What none of the runs recorded (opt-in probes) is said once, not under every run.
    assert page.count("Not recorded in any run shown: ") == 1
    assert "gradient noise (step probe gradient_noise)" in page
    assert page.count("gradient noise (step probe gradient_noise)") == 1


def test_scripts_run_from_the_command_line(sweep_dir, tmp_path):
    run = sweep_dir / "0"
    for cmd in (["scripts/plot_run.py", str(run), "--out", str(tmp_path / "run")],
                ["scripts/plot_sweep.py", str(sweep_dir), "--x", "act", "--y", "depth",
                 "--out", str(tmp_path / "sweep")],
                # (A run folder: the sweep's report is test_report_references_every_figure's.)
                ["scripts/report.py", str(run), "--out", str(tmp_path / "report")]):
        proc = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "sweep" / "heatmap_act_depth.png").is_file()
    assert (tmp_path / "report" / "index.html").is_file()
    # (A bad axis, in-process: the one-line error is the subject, not the process.)
    bad = script("scripts/plot_sweep.py", str(sweep_dir), "--x", "colour")
    assert bad.returncode == 2 and "no sweep axis 'colour'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_diverged_runs_are_marked_and_unfinished_runs_skipped_with_a_warning(
        sweep_dir, tmp_path, cli):
    root = tmp_path / "mixed"
    shutil.copytree(sweep_dir / "0", root / "done")
    code, _, err = cli(*DIVERGENT_CLI, f"hydra.run.dir={root / 'exploded'}")
    assert code == 0, err
    killed = root / "killed"
    shutil.copytree(sweep_dir / "1", killed)  # a run killed between two chunks
    summary = json.loads((killed / "summary.json").read_text())
    summary["status"] = "running"
    (killed / "summary.json").write_text(json.dumps(summary))
    with pytest.warns(UserWarning, match="killed.*did not end"):
        sweep = load_sweep(root)
    runs = sweep.runs
    assert sorted(runs["run"].unique()) == ["done", "exploded"]
    exploded = runs[runs["run"] == "exploded"].iloc[0]
    assert exploded["status"] == "diverged" and exploded["diverged"]
    assert exploded["diverged_at_step"] == 2
    fig = figures.heatmap(sweep, "act", "depth", "final_train_loss")
    assert any("diverged" in t.get_text() for t in fig.axes[0].texts)
    plt.close(fig)
    with pytest.warns(UserWarning, match="killed"):
        index = write_report(root, tmp_path / "report", jobs=1)
    assert "killed" in index.read_text()  # the page lists what it skipped


def test_missing_statistics_leave_the_panel_out_with_a_note(sweep_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(sweep_dir / "0", old)
    m, summary = store.read_metrics(old), store.read_summary(old)
    for key in ("delta_norm", "probe_bias_grad_norm", "grad_hist", "act_sat_frac", "loss"):
        m.pop(key)
        summary["arrays"].pop(key)  # not recorded, as a run without these probes says
    store.write_npz(old / "metrics.npz", m)
    store.write_json(old / "summary.json", summary)
    run = load_run(old)
    assert figures.histograms(run) is None and figures.saturation(run) is None
    speed = figures.learning_speed(run)
    assert any("not recorded" in t.get_text() for ax in speed.axes for t in ax.texts)
    grads = figures.gradients(run)
    assert any("loss was not recorded" in t.get_text() for t in grads.axes[2].texts)
    sweep = load_sweep(old)
    profile = figures.profile(sweep, "act")
    assert any("delta_norm was not recorded" in t.get_text()
               for ax in profile.axes for t in ax.texts)
    plt.close("all")
    page = write_report(old, tmp_path / "report", jobs=1).read_text()
    # Each missing figure names the probe that records it; figures that do not apply to
    # the net (through time: recurrent nets only) are not "missing".
    assert ("Not recorded in this run: histograms (epoch probe histograms), saturation "
            "(epoch probe activation_stats)") in page
    assert "time (" not in page


def test_runs_are_found_in_natural_order_also_where_sweeps_are_gathered(tmp_path):
    from vgrad.analysis.tables import find_runs

    for name in ("10", "2", "relu/0", "tanh/11", "tanh/3"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "summary.json").write_text("{}")
    found = [str(p.relative_to(tmp_path)) for p in find_runs(tmp_path)]
    assert found == ["2", "10", "relu/0", "tanh/3", "tanh/11"]
