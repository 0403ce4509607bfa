"""Two numbers corrected after an audit: the Jacobian probe's smallest singular value is
NaN below what the run's floating point resolves, and the recurrent spectral radius is
the largest eigenvalue modulus itself (not Gelfand's ||W^k||^(1/k) at k = 1,024)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compose_cfg, run_to_end

from vgrad import data, jacobian, models, probes
from vgrad.step import perturbation_zeros


def _spectrum_stats(sv) -> dict[str, float]:
    view = probes.EpochView(None, *[jnp.nan] * 4, [], [], [], None, 0.1, jacobian_sv=sv)
    return {k: float(v) for k, v in probes.jacobian_spectrum(view, None).items()
            if k != "jac_sv_hist"}


def test_smallest_singular_value_below_the_floor_is_nan():
    floor = probes.SV_FLOOR * np.finfo(np.float32).eps  # x s_max
    resolved = jnp.asarray([[5.0, 1.0, 1e-3], [4.0, 2.0, 3e-3]], jnp.float32)
    stats = _spectrum_stats(resolved)
    assert stats["jac_sv_min"] == pytest.approx(2e-3)
    assert stats["jac_sv_unresolved"] == 0.0
    # One input's smallest value lies below 10 eps s_max: the mean is not known.
    noisy = jnp.asarray([[5.0, 1.0, 1e-3], [4.0, 2.0, 0.5 * floor * 4.0]], jnp.float32)
    stats = _spectrum_stats(noisy)
    assert np.isnan(stats["jac_sv_min"])
    assert stats["jac_sv_unresolved"] == pytest.approx(1 / 6)
    assert stats["jac_sv_max"] == pytest.approx(4.5)
    # Exact zeros (dead ReLUs) are below any floor too.
    assert np.isnan(_spectrum_stats(jnp.asarray([[2.0, 0.0]], jnp.float32))["jac_sv_min"])


def test_the_floor_follows_the_runs_dtype():
    with jax.enable_x64(True):
        stats = _spectrum_stats(jnp.asarray([[5.0, 1e-9]], jnp.float64))
    assert stats["jac_sv_min"] == pytest.approx(1e-9)  # resolved in float64 (floor 1e-14)
    assert np.isnan(_spectrum_stats(jnp.asarray([[5.0, 1e-9]], jnp.float32))["jac_sv_min"])


def _isometry_net(depth: int, width: int, dist: str):
    cfg = compose_cfg("+experiment=isometry", f"depth={depth}", f"width={width}",
                      f"init.distribution={dist}")
    x = jnp.asarray(data.load(cfg.data).x_train[:2], jnp.float32)
    return models.build(cfg, 10), models.layout(cfg), x


def _singular_values(net, layout, variables, x):
    return np.asarray(jacobian.singular_values(jacobian.deep_jacobian(
        net, variables, layout, x, perturbation_zeros(net))), np.float64)


def test_float32_singular_values_above_the_floor_match_float64_and_below_do_not():
    """The floor's justification, on a deep Gaussian tanh net (the isometry preset's,
    narrower): float32 agrees with the same net computed in float64 above the floor and
    is noise below it (the true smallest value lies tens of decades lower)."""
    net, layout, x = _isometry_net(32, 64, "normal")
    variables = net.init({"params": jax.random.key(0), "noise": jax.random.key(0)}, x)
    s32 = _singular_values(net, layout, variables, x)
    with jax.enable_x64(True):
        net64 = net.clone(dtype=jnp.float64)
        s64 = _singular_values(net64, layout, jax.tree.map(
            lambda a: a.astype(jnp.float64), variables), x.astype(jnp.float64))
    floor = probes.SV_FLOOR * np.finfo(np.float32).eps * s32[:, :1]
    above = s32 > floor
    assert above.sum() > 10 and (~above).sum() > 10  # the spectrum straddles the floor
    np.testing.assert_allclose(s32[above], s64[above], rtol=0.02)
    # Below: the float32 values are not the float64 ones (off by orders of magnitude).
    assert np.max(np.abs(np.log10(s32[~above] / np.maximum(s64[~above], 1e-300)))) > 2
    assert np.isnan(_spectrum_stats(jnp.asarray(s32, jnp.float32))["jac_sv_min"])


def test_a_deep_gaussian_run_records_nan_and_the_unresolved_fraction():
    cfg = compose_cfg("+experiment=isometry", "depth=24", "width=32", "seeds=1",
                      "init.distribution=normal", "record.every=1000")
    stats = run_to_end(cfg).epoch_stats
    assert np.isnan(stats["jac_sv_min"]).all()
    assert (stats["jac_sv_unresolved"] > 0.1).all() and (stats["jac_sv_unresolved"] < 1).all()
    assert np.isfinite(stats["jac_sv_max"]).all()
    assert "jac_sv_unresolved" in probes.epoch_outputs(["jacobian_spectrum"])


def _non_normal(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if seed == 0:  # eigenvalues 0.2 .. 0.95 with ill-conditioned eigenvectors
        v = rng.normal(size=(n, n))
        return (v @ np.diag(np.linspace(0.2, 0.95, n)) @ np.linalg.inv(v)).astype(np.float32)
    # a Gaussian kernel plus a strictly upper-triangular part (far from normal)
    w = rng.normal(size=(n, n)) * 0.9 / np.sqrt(n)
    return (w + np.triu(rng.normal(size=(n, n)), 1) * 0.5 / np.sqrt(n)).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spectral_radius_equals_numpys_eigenvalues_for_non_normal_kernels(seed):
    w = _non_normal(48, seed)
    assert np.linalg.norm(w @ w.T - w.T @ w) > 0.1  # not normal
    truth = np.abs(np.linalg.eigvals(w.astype(np.float64))).max()
    radius = float(jax.jit(probes.spectral_radius)(jnp.asarray(w)))
    np.testing.assert_allclose(radius, truth, rtol=1e-5)
    # As the loop computes it: jitted, vmapped over members.
    batch = jnp.stack([jnp.asarray(w), jnp.asarray(w.T)])
    np.testing.assert_allclose(jax.jit(jax.vmap(probes.spectral_radius))(batch), truth,
                               rtol=1e-5)
    # Gelfand's formula at k = 1,024 (vgrad's former estimate) reads it too high...
    assert float(probes.gelfand_radius(jnp.asarray(w), 10)) / truth - 1 > 2e-4
    # ... and at k = 2^20 (the fallback where there is no eigensolver) within 1e-5.
    np.testing.assert_allclose(float(probes.gelfand_radius(jnp.asarray(w))), truth, rtol=1e-5)


def test_recurrent_probe_reports_the_radius_of_a_non_normal_kernel():
    width = 24
    w = _non_normal(width, 1)
    view = probes.EpochView(params={"rnn_0": {"cell": {"hh": {"kernel": jnp.asarray(w)}}}},
                            **dict.fromkeys(probes.EpochView._fields[1:]))
    layout = models.layout(compose_cfg("data=adding", "loss=regression", "depth=1",
                                       "model=rnn", f"width={width}"))
    stats = probes.recurrent_spectrum(view, layout)
    truth = np.abs(np.linalg.eigvals(w.astype(np.float64))).max()
    np.testing.assert_allclose(float(stats["rec_radius"][0]), truth, rtol=1e-5)
