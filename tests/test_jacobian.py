"""The Jacobian spectrum probe: exact cases (orthogonal linear nets), the mean-field
mean squared singular value, numpy's SVD, and the recorded arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, compose_cfg, run_to_end

from vgrad import jacobian, models, probes
from vgrad.layers import flat_params
from vgrad.step import perturbation_zeros

X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)


def spectrum(*overrides, seed=0):
    cfg = compose_cfg(*overrides)
    net, layout = models.build(cfg, 1), models.layout(cfg)
    variables = net.init({"params": jax.random.key(seed), "noise": jax.random.key(seed)}, X)
    jac = jacobian.deep_jacobian(net, variables, layout, X, perturbation_zeros(net))
    return jac, jacobian.singular_values(jac), variables


def test_orthogonal_linear_net_is_an_exact_isometry():
    jac, sv, variables = spectrum("act=linear", "init=orthogonal", "depth=10", "width=16")
    np.testing.assert_allclose(sv, 1.0, atol=1e-5)
    # J is the product of the kernels between the first and the last hidden layer.
    cfg = compose_cfg("depth=10", "width=16")
    kernels = flat_params(models.layout(cfg), variables["params"])
    product = np.eye(16)
    for i in range(1, 10):
        product = product @ np.asarray(kernels[f"dense_{i}.kernel"])
    np.testing.assert_allclose(jac[0], product.T, atol=1e-5)


def test_gaussian_linear_net_has_mean_squared_singular_value_one_at_sigma_w2_one():
    ms = [float(jnp.mean(spectrum("act=linear", "init=mean_field", "init.sigma_w2=1.0",
                                  "depth=10", "width=64", seed=s)[1] ** 2)) for s in range(3)]
    assert np.mean(ms) == pytest.approx(1.0, rel=0.15)
    # ... while its spectrum spreads: Gaussian kernels are no isometry.
    _, sv, _ = spectrum("act=linear", "init=mean_field", "depth=10", "width=64")
    assert float(sv[0, 0] / sv[0, -1]) > 100


def test_probe_singular_values_equal_numpy_svd():
    jac, sv, _ = spectrum("act=tanh", "init=glorot_normal", "depth=4", "width=8")
    for n in range(len(X)):
        np.testing.assert_allclose(sv[n], np.linalg.svd(np.asarray(jac[n], np.float64),
                                                        compute_uv=False), rtol=1e-4, atol=1e-6)
    view = probes.EpochView(None, *[jnp.nan] * 4, [], [], [], None, 0.1, jacobian_sv=sv)
    stats = probes.jacobian_spectrum(view, None)
    np.testing.assert_allclose(stats["jac_sv_max"], np.mean(sv[:, 0]), rtol=1e-6)
    np.testing.assert_allclose(stats["jac_sv_ms"], np.mean(np.asarray(sv) ** 2), rtol=1e-6)
    assert float(stats["jac_sv_hist"].sum()) == sv.size


@pytest.mark.parametrize("model", ["mlp", "resmlp"])
def test_recorded_when_asked_for(model):
    rec = run_to_end(compose_cfg(*TINY, f"model={model}", "depth=3", "width=6",
                                 "record.step_probes=[global_norms]",
                                 "record.epoch_probes=[evaluation,jacobian_spectrum]"))
    stats = rec.epoch_stats
    assert stats["jac_sv_hist"].shape == (1, 3, probes.SV_EDGES.size - 1)
    assert (stats["jac_sv_hist"].sum(axis=-1) == probes.JACOBIAN_EXAMPLES * 6).all()
    assert (stats["jac_sv_max"] >= stats["jac_sv_min"]).all()


def test_isometry_figure_draws_a_line_per_init_over_depth(tmp_path):
    import matplotlib.pyplot as plt
    from conftest import cli_main

    from vgrad.analysis import load_sweep
    from vgrad.analysis import theory_figures as tf

    out = tmp_path / "iso"
    assert cli_main("-m", "act=tanh", "init=mean_field", "init.distribution=orthogonal,normal",
                    "depth=2,4", "width=8", "epochs=1", "data.n_samples=64", "progress=false",
                    "record.step_probes=[global_norms]",
                    "record.epoch_probes=[evaluation,jacobian_spectrum]",
                    f"hydra.sweep.dir={out}") == 0
    fig = tf.isometry(load_sweep(out))
    top, ms, spectrum = fig.axes[:3]
    assert [len(line.get_xdata()) for line in top.get_lines()] == [2, 2]  # depths 2, 4
    assert len(spectrum.get_lines()) == 2
    # Orthogonal kernels of a linear-regime tanh net: s_max stays near 1 at depth 4.
    labels = [line.get_label() for line in top.get_lines()]
    orth = top.get_lines()[labels.index(next(lb for lb in labels if "orthogonal" in lb))]
    assert 0.5 < orth.get_ydata()[-1] < 1.5
    plt.close("all")
