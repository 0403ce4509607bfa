"""Sweep figures name the runs that did not record what a panel draws (never drop them
silently), curves says when a metric was not recorded, and figures.save never writes
through a symbolic link."""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from conftest import TINY, cli_main, texts_of

from vgrad import store
from vgrad.analysis import figures, load_sweep, style

#: The probes the sweep figures here draw, and no more (compiling is the tests' cost).
PROBES = ["record.step_probes=[global_norms,kernel_grad_stats,delta_norm]",
          "record.epoch_probes=[evaluation]"]



def legend_labels(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def drop(run_dir: Path, *keys: str) -> None:
    """Make ``run_dir`` a run that never recorded ``keys`` (its arrays and summary)."""
    metrics = store.read_metrics(run_dir)
    summary = store.read_summary(run_dir)
    for key in keys:
        metrics.pop(key)
        summary["arrays"].pop(key)
    store.write_npz(run_dir / store.METRICS, metrics)
    store.write_json(run_dir / store.SUMMARY, summary)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """tanh and relu nets, without and with a test set (four tiny runs, trained once)."""
    root = tmp_path_factory.mktemp("notes")
    code = cli_main("-m", "act=tanh,relu", "data.test_size=0.0,0.25", *PROBES, *TINY,
                    f"hydra.sweep.dir={root / 'sweep'}")
    assert code == 0
    return root / "sweep"


def runs_where(sweep_dir: Path, test_size: float) -> dict[str, Path]:
    """The run folders of one test size, by activation."""
    out = {}
    for path in sorted(p for p in sweep_dir.iterdir() if (p / store.SUMMARY).is_file()):
        config = store.read_summary(path)["config"]
        if config["data"]["test_size"] == test_size:
            out[config["act"]["name"]] = path
    return out


def only(sweep_dir: Path, test_size: float):
    """The sweep of ``sweep_dir`` cut to the runs of one test size."""
    sweep = load_sweep(sweep_dir)
    keep = {p.name for p in runs_where(sweep_dir, test_size).values()}
    sweep.runs_list = [r for r in sweep.runs_list if r.name in keep]
    return sweep


@pytest.fixture(scope="module")
def lacking(trained, tmp_path_factory) -> Path:
    """A sweep by act (no test set) where the relu run did not record delta_norm and
    one of two tanh runs (a copy, 'tanh_b') did not either."""
    root = tmp_path_factory.mktemp("lacking")
    runs = runs_where(trained, 0.0)
    shutil.copytree(runs["tanh"], root / "tanh_a")
    shutil.copytree(runs["tanh"], root / "tanh_b")
    shutil.copytree(runs["relu"], root / "relu")
    drop(root / "relu", "delta_norm")
    drop(root / "tanh_b", "delta_norm")
    return root


def test_profile_names_the_lines_and_runs_that_did_not_record_a_panel(lacking):
    sweep = load_sweep(lacking)
    fig = figures.profile(sweep, "act")
    text = texts_of(fig)
    assert "not recorded in: act=relu; act=tanh [run tanh_b] (delta_norm)" in text
    # relu is still drawn where it was recorded, and keeps its legend entry
    assert set(legend_labels(fig)) == {"act=tanh", "act=relu"}
    grad_init, _, delta_init, _ = fig.axes[:4]
    assert len(grad_init.get_lines()) == 2
    assert len([line for line in delta_init.get_lines()
                if "theory" not in line.get_label()]) == 1
    plt.close("all")


def test_no_note_when_every_run_or_no_run_recorded_it(trained, lacking, tmp_path):
    sweep = load_sweep(trained)
    assert "not recorded" not in texts_of(figures.profile(sweep, "act"))
    for name in ("tanh_a", "tanh_b", "relu"):
        shutil.copytree(lacking / name, tmp_path / name)
    drop(tmp_path / "tanh_a", "delta_norm")
    fig = figures.profile(load_sweep(tmp_path), "act")
    assert "delta_norm was not recorded in these runs" in texts_of(fig)  # as before
    assert "not recorded in:" not in texts_of(fig)
    plt.close("all")


def test_curves_says_a_test_metric_was_not_recorded_and_names_the_runs_without(trained):
    fig = figures.curves(only(trained, 0.0), "act", "test_acc")  # no run has a test set
    assert "test accuracy was not recorded in these runs (no run has a test set)" in " ".join(
        texts_of(fig).split())
    assert "diverged" not in texts_of(fig)
    # both: the lines of the runs without a test set are named (act: line style)
    sweep = load_sweep(trained)
    fig = figures.curves(sweep, "data.test_size", "test_acc")
    assert "not recorded in: data.test_size=0.0, act=tanh; data.test_size=0.0, act=relu " \
           "(test_acc)" in texts_of(fig)
    assert [line.get_label() for line in fig.axes[0].get_lines()] == [
        "data.test_size=0.25, act=tanh", "data.test_size=0.25, act=relu"]
    train = figures.curves(sweep, "data.test_size")  # the training loss: every run has it
    assert "not recorded" not in texts_of(train) and len(train.axes[0].get_lines()) == 4
    plt.close("all")


def test_bars_and_heatmap_name_the_categories_without_a_test_set(trained):
    sweep = load_sweep(trained)
    bars = figures.bars(sweep, "data.test_size")
    assert "not recorded in: data.test_size=0.0 (final_test_acc)" in texts_of(bars)
    heat = figures.heatmap(sweep, "data.test_size", "act", "final_test_acc")
    assert "not recorded in: act=tanh, data.test_size=0.0; act=relu, data.test_size=0.0 " \
           "(final_test_acc)" in texts_of(heat)
    assert sum(t.get_text() == "not\nrecorded" for t in heat.axes[0].texts) == 2
    plt.close("all")


def test_curves_draws_a_per_step_metric_and_refuses_unknown_ones(trained):
    sweep = only(trained, 0.0)
    fig = figures.curves(sweep, "act", "grad_global_norm")
    a = fig.axes[0]
    assert a.get_xlabel() == "step" and a.get_yscale() == "log"
    assert [line.get_label() for line in a.get_lines()] == ["act=tanh", "act=relu"]
    plt.close("all")
    with pytest.raises(ValueError, match=r"no run recorded a metric 'nope'.*train_loss"
                                         r".*grad_global_norm"):
        figures.curves(sweep, "act", "nope")
    with pytest.raises(ValueError, match=r"'grad_norm' has axes \['seed', 'step', "
                                         r"'layer'\].*grad_global_norm"):
        figures.curves(sweep, "act", "grad_norm")
    assert not plt.get_fignums()


def test_save_refuses_a_link_and_leaves_its_target_alone(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "fig.png").symlink_to(target)
    with pytest.raises(store.LinkRefused, match="fig.png"):
        figures.save(fig, tmp_path / "out" / "fig")
    assert target.read_text() == "keep me"
    assert (tmp_path / "out" / "fig.png").is_symlink()
    assert not (tmp_path / "out" / "fig.pdf").exists()  # refused before writing anything
    assert not plt.get_fignums()  # closed all the same
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png, pdf = figures.save(fig, tmp_path / "ok.v2")
    assert png.name == "ok.v2.png" and png.read_bytes().startswith(b"\x89PNG")
    assert pdf.read_bytes().startswith(b"%PDF")
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_seed_at_exactly_zero_pulls_the_centre_down_on_a_log_axis():
    """rnn_time's T = 200 line jumped up by decades where one of 3 seeds underflowed to 0:
    the zero was dropped and the geometric mean taken over the other two."""
    import numpy as np

    x = np.arange(6)
    values = np.array([[1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8],
                       [1e-3, 1e-4, 1e-5, 0.0, 0.0, 1e-8],
                       [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8]])
    fig, ax = plt.subplots()
    style.band(ax, x, values, "C0", "three seeds", log=True)
    center = ax.get_lines()[0].get_ydata()
    np.testing.assert_allclose(center[[0, 1, 2, 5]], [1e-3, 1e-4, 1e-5, 1e-8], rtol=1e-12)
    assert np.isnan(center[3:5]).all()  # a geometric mean with a zero is zero: no point
    marks = [c.get_offsets() for c in ax.collections if hasattr(c, "get_offsets")
             and len(c.get_offsets()) and np.all(c.get_offsets()[:, 1] == 0.02)]
    assert len(marks) == 1  # the zero marks, at the bottom of the axes
    np.testing.assert_array_equal(marks[0][:, 0], [3, 4])
    assert "three seeds" in style.zero_note(fig)

    five = np.vstack([values, values[[0, 2]]])  # 5 seeds, one zero: the median is drawn
    fig, ax = plt.subplots()
    style.band(ax, x, five, "C0", "five seeds", log=True)
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(),
                               [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8], rtol=1e-12)
    assert style.zero_note(fig) == ""
    plt.close("all")
