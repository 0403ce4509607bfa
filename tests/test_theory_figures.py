"""The phase diagram and the signal-theory figure on a real tiny sweep: what they draw
is the theory recomputed here, and they decline sweeps the theory does not describe."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from conftest import cli_main, compose_cfg

from vgrad import data, theory
from vgrad.analysis import load_sweep, write_report
from vgrad.analysis import theory_figures as tf

SWEEP = ["-m", "act=tanh", "init=mean_field", "init.sigma_w2=1.0,4.0", "bias_init=mean_field",
         "depth=2,3", "width=16", "data=digits", "data.scale=standard", "loss=ce",
         "epochs=1", "record.probe_size=32", "progress=false",
         "record.epoch_probes=[evaluation,forward_signal]"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("phase")
    assert cli_main(*SWEEP, f"hydra.sweep.dir={out}") == 0
    return out


def test_phase_diagram_draws_the_measured_grid_and_the_theory_boundary(sweep_dir):
    sweep = load_sweep(sweep_dir)
    assert tf.why_not(sweep) is None
    fig = tf.phase_diagram(sweep, points=5)
    ax = fig.axes[0]
    mesh = ax.collections[0]
    assert mesh.get_array().shape == (2, 2)  # depths x sigma_w^2
    runs = sweep.runs
    acc = runs[(runs["init.sigma_w2"] == 4.0) & (runs["depth"] == 3)]["final_train_acc"]
    assert mesh.get_array()[1, 1] == pytest.approx(float(acc.median()))
    curve, boundary = ax.get_lines()
    tanh = theory.activation(compose_cfg("act=tanh").act)
    x = curve.get_xdata()
    np.testing.assert_allclose(x, np.linspace(1.0, 4.0, 5))
    np.testing.assert_allclose(curve.get_ydata()[-1],
                               6 * theory.correlation_depth_scale(tanh, 4.0, 0.05), rtol=1e-6)
    assert boundary.get_xdata()[0] == pytest.approx(1.76, abs=0.01)
    plt.close("all")


def test_signal_theory_draws_the_iterated_maps_beside_the_measurements(sweep_dir):
    sweep = load_sweep(sweep_dir)
    fig = tf.signal_theory(sweep, depth=3)
    c_axis, d_axis = fig.axes[:2]
    lines = c_axis.get_lines()
    assert len(lines) == 4  # measured and theory, for sigma_w^2 = 1 and 4
    cfg = compose_cfg("data=digits", "data.scale=standard", "act=tanh")
    probe = data.load(cfg.data).x_train[:32]
    tanh = theory.activation(cfg.act)
    _, c_pred = theory.signal_profiles(tanh, 3, 4.0, 0.05, probe)
    theory_lines = [ln for ln in lines if ln.get_marker() == "o"]
    np.testing.assert_allclose(theory_lines[-1].get_ydata(), c_pred, rtol=1e-9)
    assert d_axis.get_yscale() == "log"
    plt.close("all")


def test_report_includes_the_theory_figures(sweep_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tf, "CURVE_POINTS", 5)  # 25 points of 6 xi_c take ~30 s
    # (The theory figures are the sweep's: one run's figures are enough beside them.)
    page = write_report(sweep_dir, tmp_path / "report", jobs=1, runs=["0"]).read_text()
    assert "phase diagram" in page and "measured vs theory" in page


def test_sweeps_the_theory_does_not_describe_get_no_theory_figures(tmp_path):
    out = tmp_path / "plain"
    assert cli_main("-m", "act=tanh", "init=normal", "depth=1,2", "width=4", "epochs=1",
                    "data.n_samples=64", "progress=false", f"hydra.sweep.dir={out}") == 0
    sweep = load_sweep(out)
    assert "init=normal" in tf.why_not(sweep)
    assert tf.phase_diagram(sweep) is None and tf.signal_theory(sweep) is None
