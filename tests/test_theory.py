"""Mean-field theory, and vgrad's measured delta norms against it at initialisation."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import compose_cfg, run_to_end, texts_of
from scipy.optimize import brentq

from vgrad import data, theory


def act(name: str) -> theory.Activation:
    return theory.activation(compose_cfg(f"act={name}").act)


def test_relu_chi_is_half_sigma_w_squared_whatever_the_variance():
    relu = act("relu")
    for q in (0.01, 1.0, 30.0):
        assert theory.chi(relu, q, 2.0) == pytest.approx(1.0, abs=1e-6)  # He: critical
        assert theory.chi(relu, q, 1.0) == pytest.approx(0.5, abs=1e-6)
    # The ReLU length map is linear: q' = sigma_w^2 q / 2 + sigma_b^2.
    assert theory.length_map(relu, 3.0, 1.5, 0.1) == pytest.approx(1.5 * 3.0 / 2 + 0.1, rel=1e-5)


def test_tanh_order_to_chaos_boundary_matches_the_published_phase_diagram():
    tanh = act("tanh")
    # Poole et al. 2016 / Schoenholz et al. 2017: at sigma_b^2 = 0.05 the critical line
    # chi_1 = 1 crosses sigma_w^2 = 1.76.
    critical = brentq(lambda s2: theory.chi(tanh, theory.q_star(tanh, s2, 0.05), s2) - 1,
                      1.0, 3.0)
    assert critical == pytest.approx(1.76, abs=0.01)
    # Without biases, sigma_w^2 = 1 is critical (q* = 0, tanh'(0) = 1); the length map
    # creeps to q* = 0 there (q_l ~ 1 / l), below it quickly.
    assert theory.chi(tanh, 1e-9, 1.0) == pytest.approx(1.0, abs=1e-6)
    assert theory.q_star(tanh, 1.0, 0.0) < 0.01
    assert theory.q_star(tanh, 0.5, 0.0) < 1e-9
    assert theory.gradient_depth_scale(tanh, 1.2, 0.05) > theory.gradient_depth_scale(
        tanh, 3.0, 0.05)  # deeper into chaos, gradients explode over fewer layers


def test_inputs_at_input_q_for_q_star_start_every_layer_at_the_fixed_point():
    # The isometry preset's tanh nets: critical (chi_1 = 1) with a small q*.
    cfg = compose_cfg("+experiment=isometry")
    tanh = theory.activation(cfg.act)
    sigma_w2, sigma_b2 = theory.sigma_w2_of(cfg.init), theory.sigma_b2_of(cfg.bias_init)
    q = theory.q_star(tanh, sigma_w2, sigma_b2)
    assert theory.chi(tanh, q, sigma_w2) == pytest.approx(1.0, abs=1e-5)
    input_q = theory.input_q_for(q, sigma_w2, sigma_b2)
    np.testing.assert_allclose(theory.variances(tanh, 20, sigma_w2, sigma_b2, input_q), q,
                               rtol=1e-6)
    assert cfg.data.input_q == pytest.approx(input_q, rel=1e-4)  # the preset starts there
    with pytest.raises(ValueError, match="not above"):
        theory.input_q_for(0.01, 1.0, 0.05)


def test_sigma_w2_of_initializers():
    assert theory.sigma_w2_of(compose_cfg("init=he_normal").init) == 2.0
    assert theory.sigma_w2_of(compose_cfg("init=variance_scaling", "init.scale=1.5").init) == 1.5
    with pytest.raises(ValueError, match="glorot_uniform"):
        theory.sigma_w2_of(compose_cfg("init=glorot_uniform").init)
    assert theory.sigma_b2_of(compose_cfg("bias_init=normal", "bias_init.std=0.2").bias_init) \
        == pytest.approx(0.04)


WIDE = ["data=digits", "data.scale=standard", "loss=ce", "depth=6", "width=512",
        "batch_size=256", "epochs=1", "seeds=2", "init=variance_scaling",
        "record.step_probes=[delta_norm]", "record.epoch_probes=[]", "progress=false"]


@pytest.mark.parametrize("name,sigma_w2,sigma_b", [("relu", 1.0, 0.0), ("relu", 2.0, 0.0),
                                                   ("tanh", 1.5, 0.0), ("tanh", 3.0, 0.3)])
def test_measured_delta_profile_at_initialisation_follows_mean_field_theory(
        name, sigma_w2, sigma_b):
    overrides = [*WIDE, f"act={name}", f"init.scale={sigma_w2}"]
    if sigma_b:
        overrides += ["bias_init=normal", f"bias_init.std={sigma_b}"]
    cfg = compose_cfg(*overrides)
    rec = run_to_end(cfg)
    measured = rec.step_stats["delta_norm"][:, 0]  # step 0: the initial parameters
    measured = measured / measured[:, -1:]
    ds = data.load(cfg.data)
    predicted = theory.mean_delta_profile(act(name), cfg.depth, theory.sigma_w2_of(cfg.init),
                                          theory.sigma_b2_of(cfg.bias_init), ds.x_train)
    # Width 512 and a 256-example batch: within 6% of the infinite-width prediction,
    # also where gradients change by orders of magnitude across the net.
    np.testing.assert_allclose(measured, np.broadcast_to(predicted, measured.shape),
                               rtol=0.06)
    # The cruder prediction from the mean input is visibly worse where q_0 matters.
    crude = theory.delta_profile(act(name), cfg.depth, theory.sigma_w2_of(cfg.init),
                                 theory.sigma_b2_of(cfg.bias_init),
                                 float(np.mean(ds.x_train ** 2)))
    assert np.abs(np.log(measured.mean(0) / predicted)).max() <= \
        np.abs(np.log(measured.mean(0) / crude)).max() + 1e-3


def test_the_profile_figure_draws_the_theory_where_it_applies_and_says_where_not(
        cli, tmp_path):
    from conftest import TINY

    from vgrad import store
    from vgrad.analysis import figures, load_sweep

    args = ["depth=3", "width=16", "seeds=2", *TINY]
    code, _, err = cli("-m", "act=tanh,sigmoid", "init=he_normal", *args,
                       f"hydra.sweep.dir={tmp_path / 'he'}")
    assert code == 0, err
    fig = figures.profile(load_sweep(tmp_path / "he"), "act")
    delta_init = next(a for a in fig.axes
                      if a.get_title().startswith(r"mean $\Vert\delta_l\Vert$ at step 0"))
    drawn = {line.get_label(): line.get_ydata() for line in delta_init.get_lines()
             if line.get_marker() == "o"}
    assert set(drawn) == {"act=tanh (mean-field theory)", "act=sigmoid (mean-field theory)"}
    for name in ("tanh", "sigmoid"):
        run = next(d for d in (tmp_path / "he").iterdir()
                   if (d / store.SUMMARY).is_file()
                   and store.read_summary(d)["config"]["act"]["name"] == name)
        cfg = compose_cfg(f"act={name}", "init=he_normal", *args)
        ratio = theory.mean_delta_profile(act(name), 3, 2.0, 0.0, data.load(cfg.data).x_train)
        out = np.median(store.read_metrics(run)["delta_norm"][:, 0, -1])
        np.testing.assert_allclose(drawn[f"act={name} (mean-field theory)"], out * ratio,
                                   rtol=1e-6)
    legend = [t.get_text() for g in fig.legends for t in g.get_texts()]
    assert sum("χ₁ = " in t for t in legend) == 2  # each line's chi_1, in the legend
    assert "mean-field theory" in fig._suptitle.get_text()
    assert "shrinks e-fold" in " ".join(texts_of(fig).split())  # sigmoid, sigma_w^2 = 2

    code, _, err = cli("-m", "act=tanh,relu", "init=normal", *args,
                       f"hydra.sweep.dir={tmp_path / 'normal'}")
    assert code == 0, err
    fig = figures.profile(load_sweep(tmp_path / "normal"), "act")
    assert not [line for a in fig.axes for line in a.get_lines() if line.get_marker() == "o"]
    assert "no mean-field prediction: init=normal" in fig._suptitle.get_text()


def test_correlation_map_fixed_point_and_slope_in_both_phases():
    tanh = act("tanh")
    # Ordered (chi_1 < 1): inputs become perfectly correlated, and the map's slope at
    # c* = 1 is chi_1 (Schoenholz et al. 2017, eq. 5).
    q = theory.q_star(tanh, 1.0, 0.05)
    assert theory.chi(tanh, q, 1.0) < 1
    assert theory.c_star(tanh, 1.0, 0.05) == pytest.approx(1.0, abs=1e-6)
    assert theory.chi_c(tanh, 1.0, 0.05) == pytest.approx(theory.chi(tanh, q, 1.0), rel=1e-9)
    # Chaotic (chi_1 > 1): a fixed point below 1 that attracts (chi_c < 1), with a finite
    # correlation depth scale.
    q = theory.q_star(tanh, 4.0, 0.05)
    assert theory.chi(tanh, q, 4.0) > 1
    c = theory.c_star(tanh, 4.0, 0.05)
    assert 0 < c < 0.5
    assert theory.correlation_map(tanh, c, q, 4.0, 0.05) == pytest.approx(c, abs=1e-6)
    assert theory.chi_c(tanh, 4.0, 0.05) < 1
    assert 0 < theory.correlation_depth_scale(tanh, 4.0, 0.05) < float("inf")


@pytest.mark.parametrize("name", ["tanh", "swish"])
def test_correlation_map_matches_a_monte_carlo_estimate(name):
    phi = act(name)
    q, c, sigma_w2, sigma_b2 = 1.3, 0.5, 2.0, 0.05
    z1, z2 = np.random.default_rng(0).standard_normal((2, 2_000_000))
    u1 = np.sqrt(q) * z1
    u2 = np.sqrt(q) * (c * z1 + np.sqrt(1 - c * c) * z2)
    monte_carlo = (sigma_w2 * np.mean(phi.phi(u1) * phi.phi(u2)) + sigma_b2) / q
    assert theory.correlation_map(phi, c, q, sigma_w2, sigma_b2) == pytest.approx(
        monte_carlo, abs=3e-3)


def test_critical_sigma_w2_is_the_published_boundary_and_xi_c_diverges_there():
    tanh = act("tanh")
    critical = theory.critical_sigma_w2(tanh, 0.05)
    assert critical == pytest.approx(1.76, abs=0.01)
    # xi_c grows without bound towards the boundary from both sides.
    near = [theory.correlation_depth_scale(tanh, critical + d, 0.05) for d in (-0.05, 0.05)]
    far = [theory.correlation_depth_scale(tanh, critical + d, 0.05) for d in (-0.5, 1.0)]
    assert min(near) > 5 * max(far)


@pytest.mark.parametrize("sigma_w2", [1.2, 3.0])  # ordered, chaotic
def test_measured_signal_of_a_wide_tanh_net_follows_the_length_and_correlation_maps(sigma_w2):
    import jax
    import jax.numpy as jnp

    from vgrad import models, probes

    cfg = compose_cfg("act=tanh", "init=mean_field", f"init.sigma_w2={sigma_w2}",
                      "bias_init=mean_field", "depth=8", "width=512", "data=digits",
                      "data.scale=standard", "loss=ce")
    x = jnp.asarray(data.load(cfg.data).x_train[:64])
    net, layout = models.build(cfg, 10), models.layout(cfg)

    @jax.jit  # one program for every draw: op by op, the draws took seconds
    def measure(seed):
        variables = net.init({"params": jax.random.key(seed), "noise": jax.random.key(seed)}, x)
        _, sown = net.apply(variables, x, capture=True, mutable=["intermediates"])
        view = probes.EpochView(variables["params"], *[jnp.nan] * 4, [], [], [], None, 0.1,
                                signals=layout.signals(sown["intermediates"]))
        return probes.forward_signal(view, layout)

    # Draws of the weights: at width 512 one draw's c^l scatters by 4-10% around the
    # infinite-width iterate; the mean of 12 is within ~3% (standard error).
    measured = [measure(seed) for seed in range(12)]
    q = np.mean([m["signal_q"] for m in measured], axis=0)[:-1]  # hidden layers (the
    c = np.mean([m["signal_c"] for m in measured], axis=0)[:-1]  # output has 10 units)
    q_pred, c_pred = theory.signal_profiles(act("tanh"), 8, sigma_w2, 0.05, np.asarray(x))
    np.testing.assert_allclose(q, q_pred[:-1], rtol=0.05)
    np.testing.assert_allclose(c, c_pred[:-1], rtol=0.08)
