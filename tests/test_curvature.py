"""The Hessian probe (vgrad.curvature) against a dense Hessian and numpy's eigensolver,
on nets small enough to form it, and in a real run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pytest
from conftest import TINY, compose_cfg
from jax.flatten_util import ravel_pytree

from vgrad import curvature, losses, models, runner, store
from vgrad.analysis import figures, load_run


def _net_and_loss(*overrides: str, n: int = 64):
    """A small MLP (<= 200 parameters), its parameters and its mean BCE loss on a batch."""
    cfg = compose_cfg("depth=3", "width=7", "act=tanh", "init=he_normal", "bias_init=normal",
                      "bias_init.std=0.3", *overrides)
    net, layout = models.build(cfg, 1), models.layout(cfg)
    x = jax.random.normal(jax.random.key(0), (n, 2))
    y = (x[:, 0] * x[:, 1] > 0).astype(jnp.int32)
    params = net.init({"params": jax.random.key(1), "noise": jax.random.key(1)}, x)["params"]

    def loss(p):
        return losses.LOSSES["bce"](net.apply({"params": p}, x), y).mean()

    return layout, params, loss


def _dense(loss, params) -> tuple[np.ndarray, np.ndarray]:
    flat, unravel = ravel_pytree(params)
    hessian = np.asarray(jax.hessian(lambda f: loss(unravel(f)))(flat), np.float64)
    return hessian, flat


@pytest.fixture(scope="module")
def measured():
    layout, params, loss = _net_and_loss()
    out = jax.jit(lambda p: {
        **curvature.curvature(loss, p, layout, jax.random.key(2)),
        "hess_max_layer": curvature.block_maxima(loss, p, layout, jax.random.key(3))})(params)
    hessian, flat = _dense(loss, params)
    ids = np.asarray(ravel_pytree(curvature.layer_ids(layout, params))[0])
    return layout, {k: np.asarray(v, np.float64) for k, v in out.items()}, hessian, ids


def test_extreme_eigenvalues_match_a_dense_eigensolver(measured):
    _, out, hessian, ids = measured
    assert hessian.shape[0] <= 200
    eig = np.linalg.eigvalsh(hessian)
    assert eig[0] < 0 < eig[-1]  # (both signs: the test would see a sign slip)
    np.testing.assert_allclose(out["hess_max"], eig[-1], rtol=1e-2)
    np.testing.assert_allclose(out["hess_min"], eig[0], rtol=1e-2)


def test_each_layers_block_and_the_top_eigenvectors_mass_match_the_dense_hessian(measured):
    layout, out, hessian, ids = measured
    blocks = [np.linalg.eigvalsh(hessian[np.ix_(ids == i, ids == i)])[-1]
              for i in range(len(layout.names))]
    assert sorted(np.bincount(ids)) == sorted([21, 56, 56, 8])  # (2-7-7-7-1: 8 < 40 steps)
    np.testing.assert_allclose(out["hess_max_layer"], blocks, rtol=1e-2)
    top = np.linalg.eigh(hessian)[1][:, -1]
    mass = [float(np.sum(top[ids == i] ** 2)) for i in range(len(layout.names))]
    np.testing.assert_allclose(out["hess_evec_mass"], mass, atol=1e-3)
    np.testing.assert_allclose(out["hess_evec_mass"].sum(), 1.0, atol=1e-4)


def test_hutchinsons_trace_lies_within_its_standard_error_of_the_exact_trace(measured):
    _, out, hessian, _ = measured
    assert out["hess_trace_se"] > 0
    # (3 standard errors: a 0.3% chance of a false alarm for a correct estimator)
    assert abs(out["hess_trace"] - np.trace(hessian)) < 3 * out["hess_trace_se"]


def test_a_layer_of_fewer_parameters_than_steps_exhausts_cleanly():
    """A 2 x 2 symmetric matrix: 40 Lanczos steps on 2 dimensions give its eigenvalues,
    not spurious values outside them."""
    matrix = jnp.array([[2.0, 1.0], [1.0, -3.0]])
    theta, _ = curvature.lanczos(lambda v: matrix @ v, jnp.array([1.0, 0.3]), 40)
    np.testing.assert_allclose([theta[0], theta[-1]], np.linalg.eigvalsh(matrix), rtol=1e-5)


def test_the_spectral_density_integrates_to_one_where_the_dense_eigenvalues_are():
    """Stochastic Lanczos quadrature on a 141-parameter net: the bins' masses sum to 1,
    and their distribution function follows that of the dense Hessian's eigenvalues
    (each 1/P) to within the randomness of two start vectors."""
    layout, params, loss = _net_and_loss()
    out = jax.jit(lambda p: curvature.density(loss, p, jax.random.key(4)))(params)
    mass, rho = np.asarray(out["hess_density"], np.float64), float(out["hess_density_scale"])
    eig = np.linalg.eigvalsh(_dense(loss, params)[0])
    assert mass.shape == (curvature.DENSITY_EDGES.size - 1,) and (mass >= 0).all()
    np.testing.assert_allclose(mass.sum(), 1.0, atol=1e-5)
    np.testing.assert_allclose(rho, np.abs(eig).max(), rtol=1e-2)  # (the extremes converge)
    edges = curvature.DENSITY_EDGES[1:].astype(np.float64) * rho
    dense_cdf = np.searchsorted(np.sort(eig), edges, side="right") / eig.size
    assert np.max(np.abs(np.cumsum(mass) - dense_cdf)) < 0.15
    # The mass lies within the spectrum (plus the smoothing): none beyond its ends.
    centres = (curvature.DENSITY_EDGES[1:] + curvature.DENSITY_EDGES[:-1]) / 2 * rho
    outside = (centres < eig[0] - 0.02 * rho) | (centres > eig[-1] + 0.02 * rho)
    assert mass[outside].sum() < 1e-4


def test_the_probe_records_the_hessian_of_the_probe_batch_at_every_epoch(cli, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli(*TINY, "depth=2", "width=4", "seeds=2", "record.probe_size=64",
                       "optim=sgd", "optim.lr=0.1", "optim.momentum=0.5",
                       "record.epoch_probes=[evaluation,hessian,hessian_blocks,"
                       "hessian_density]",
                       "record.params=[initial,final]", f"hydra.run.dir={run}")
    assert code == 0, err
    m, summary = store.read_metrics(run), store.read_summary(run)
    for key in ("hess_max", "hess_min", "hess_trace", "hess_trace_se"):
        assert m[key].shape == (2, 3)
    assert m["hess_evec_mass"].shape == m["hess_max_layer"].shape == (2, 3, 3)
    assert summary["arrays"]["hess_max_layer"] == ["seed", "epoch", "layer"]
    assert m["hess_density"].shape == (2, 3, curvature.DENSITY_EDGES.size - 1)
    assert summary["arrays"]["hess_density"] == ["seed", "epoch", "density_bin"]
    np.testing.assert_allclose(m["hess_density"].sum(axis=-1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(m["density_edges"], curvature.DENSITY_EDGES)
    # At epoch 0 the largest eigenvalue is the dense Hessian's at the saved initial
    # parameters, on the probe batch (the first 64 training examples).
    # The curvature figure draws it beside heavy-ball's stability limit 2 (1 + beta) / eta.
    fig = figures.curvature(load_run(run))
    limits = [line for line in fig.axes[0].get_lines() if "stability limit" in line.get_label()]
    assert len(limits) == 1 and limits[0].get_ydata()[0] == pytest.approx(2 * 1.5 / 0.1)
    plt.close("all")
    cfg = compose_cfg(*TINY, "depth=2", "width=4")
    ds = runner.prepare(cfg, tmp_path / "unused").data
    saved = np.load(run / "params.npz")
    net = models.build(cfg, 1)
    x, y = jnp.asarray(ds.x_train[:64]), jnp.asarray(ds.y_train[:64])
    for seed in range(2):
        params = {f"dense_{i}": {leaf: jnp.asarray(saved[f"initial.dense_{i}.{leaf}"][seed])
                                 for leaf in ("kernel", "bias")} for i in range(3)}
        hessian, _ = _dense(lambda p: losses.LOSSES["bce"](
            net.apply({"params": p}, x), y).mean(), params)
        np.testing.assert_allclose(m["hess_max"][seed, 0], np.linalg.eigvalsh(hessian)[-1],
                                   rtol=1e-3)
