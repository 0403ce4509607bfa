"""Every recorded number means what the README says, at the edges too: batch norm's
deltas, overflowing norms, divergence, NaN logits, float64, and saved parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DIVERGENT_CLI, LIGHT, TINY, compose_cfg, run_dirs, run_to_end, step_once
from test_instruments import ACTS, numpy_backprop

from vgrad import layers, losses, models, optim, probes, program, store
from vgrad.step import StepOut, init_state, make_eval_fn


def bn_step(bn: str):
    """One step of a 2-3-3-1 tanh net with batch norm, with both kinds of deltas."""
    overrides = ("act=tanh", f"bn={bn}", "bias_init=normal")
    layout, state, _, out, x, y = step_once(*overrides, batch=12, seed=3, own_deltas=True)
    return compose_cfg("depth=2", "width=3", *overrides), layout, state, out, x, y


def reference_losses(params, x, y, bn: str, eps: float, extra: list) -> jnp.ndarray:
    """Per-example BCE of the same net written out by hand (batch statistics in train
    mode), with ``extra[l]`` added to layer l's pre-activation: an independent reference
    for autodiff."""
    a = x
    for i in range(2):
        z = a @ params[f"dense_{i}"]["kernel"] + params[f"dense_{i}"]["bias"] + extra[i]

        def norm(u, i=i):
            mean, var = u.mean(0), u.var(0)
            p = params[f"bn_{i}"]
            return (u - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]

        a = jnp.tanh(norm(z) if bn == "pre" else z)
        if bn == "post":
            a = norm(a)
    logit = a @ params["dense_2"]["kernel"] + params["dense_2"]["bias"] + extra[2]
    return losses.bce(logit, y)


@pytest.mark.parametrize("bn", ["pre", "post"])
def test_batch_norm_deltas_against_autodiff(bn):
    cfg, layout, state, out, x, y = bn_step(bn)
    zeros = [jnp.zeros((len(x), 3)), jnp.zeros((len(x), 3)), jnp.zeros((len(x), 1))]
    jac = jax.jacrev(lambda e: reference_losses(state.params, x, y, bn, cfg.bn_eps, e))(zeros)
    index = np.arange(len(x))
    for layer in range(3):
        coupled = np.asarray(jac[layer]).sum(axis=0)  # sum_m dl_m/dz_n
        own = np.asarray(jac[layer])[index, index]  # dl_n/dz_n
        np.testing.assert_allclose(out.deltas[f"delta_{layer}"], coupled, rtol=2e-4,
                                   atol=1e-6)
        np.testing.assert_allclose(out.own_deltas[f"delta_{layer}"], own, rtol=2e-4,
                                   atol=1e-6)
    stats = {**probes.delta_norm(out, layout), **probes.delta_norm_own(out, layout)}
    for layer in range(3):
        j = np.asarray(jac[layer], np.float64)
        np.testing.assert_allclose(stats["delta_norm"][layer],
                                   np.linalg.norm(j.sum(0), axis=1).mean(), rtol=2e-4)
        np.testing.assert_allclose(stats["delta_norm_own"][layer],
                                   np.linalg.norm(j[index, index], axis=1).mean(), rtol=2e-4)
    # Batch norm couples the examples: the two differ in the hidden layers.
    assert not np.allclose(stats["delta_norm"][:2], stats["delta_norm_own"][:2], rtol=0.05)


def test_without_batch_norm_the_two_deltas_agree():
    _, layout, _, out, _, _ = bn_step("none")
    stats = {**probes.delta_norm(out, layout), **probes.delta_norm_own(out, layout)}
    np.testing.assert_allclose(stats["delta_norm"], stats["delta_norm_own"], rtol=1e-5)


def test_delta_norm_own_is_recorded_when_asked_for():
    rec = run_to_end(compose_cfg(*TINY, "bn=pre",
                                 "record.step_probes=[delta_norm,delta_norm_own]"))
    assert rec.step_stats["delta_norm_own"].shape == rec.step_stats["delta_norm"].shape
    assert np.isfinite(rec.step_stats["delta_norm_own"]).all()


def test_norms_of_huge_finite_gradients_are_finite_and_exact():
    rng = np.random.default_rng(0)
    kernels = [rng.normal(size=(1, 3, 4)) * 1e30, rng.normal(size=(1, 4, 2)) * 1e-30]
    layout = layers.Layout((
        layers.Segment(("dense_0",), (("dense_0",),), ("delta_0",), False),
        layers.Segment(("dense_1",), (("dense_1",),), ("delta_1",), False)), ())
    grads = {f"dense_{i}": {"kernel": jnp.asarray(k[0], jnp.float32),
                            "bias": jnp.asarray(k[0, 0] * 0.5, jnp.float32)}
             for i, k in enumerate(kernels)}
    deltas = {"delta_0": jnp.asarray(rng.normal(size=(5, 4)) * 3e29, jnp.float32),
              "delta_1": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)}
    out = StepOut(jnp.float32(1.0), grads, deltas, grads, grads, grads)
    stats = {**probes.kernel_grad_stats(out, layout), **probes.global_norms(out, layout),
             **probes.bias_grad_norm(out, layout), **probes.delta_norm(out, layout),
             **probes.update_stats(out, layout)}
    ref = [np.asarray(grads[f"dense_{i}"]["kernel"], np.float64) for i in range(2)]
    for layer, g in enumerate(ref):
        np.testing.assert_allclose(stats["grad_norm"][layer], np.linalg.norm(g), rtol=1e-5)
        np.testing.assert_allclose(stats["grad_std"][layer], g.std(), rtol=1e-4)
        np.testing.assert_allclose(stats["grad_mean"][layer], g.mean(), rtol=1e-3,
                                   atol=1e-6 * np.abs(g).max())
    flat = np.concatenate([np.ravel(np.asarray(x, np.float64))
                           for x in jax.tree.leaves(grads)])
    np.testing.assert_allclose(stats["grad_global_norm"], np.linalg.norm(flat), rtol=1e-5)
    d0 = np.asarray(deltas["delta_0"], np.float64)
    np.testing.assert_allclose(stats["delta_norm"][0], np.linalg.norm(d0, axis=1).mean(),
                               rtol=1e-5)
    for key in ("grad_norm", "grad_std", "grad_global_norm", "bias_grad_norm", "delta_norm",
                "update_norm"):
        assert np.isfinite(stats[key]).all(), key
    assert stats["grad_norm"][0] > 1e30 and stats["grad_norm"][1] < 1e-29


@pytest.mark.parametrize("jit", [True, False])
def test_statistics_of_entries_near_the_largest_float32_are_exact(jit):
    """Entries above 2^126 (a step before an overflow): the scale's reciprocal would be
    subnormal, which XLA's CPU code flushes to zero: every statistic read 0."""
    rng = np.random.default_rng(1)
    kernel = (rng.uniform(0.5, 1.0, size=(2, 2)) * rng.choice([-1, 1], size=(2, 2))
              * 1.5e38).astype(np.float32)
    layout = layers.Layout((
        layers.Segment(("dense_0",), (("dense_0",),), ("delta_0",), False),), ())
    grads = {"dense_0": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(kernel[0] / 2)}}
    deltas = {"delta_0": jnp.asarray(kernel)}
    out = StepOut(jnp.float32(1.0), grads, deltas, grads, grads, grads)

    def stats(o):
        return {**probes.kernel_grad_stats(o, layout), **probes.global_norms(o, layout),
                **probes.bias_grad_norm(o, layout), **probes.delta_norm(o, layout),
                **probes.update_stats(o, layout)}

    got = jax.jit(stats)(out) if jit else stats(out)
    g = kernel.astype(np.float64)
    b = g[0] / 2
    want = {"grad_norm": np.linalg.norm(g), "grad_std": g.std(), "grad_mean": g.mean(),
            "grad_absmean": np.abs(g).mean(), "grad_maxabs": np.abs(g).max(),
            "bias_grad_norm": np.linalg.norm(b),
            "grad_global_norm": np.sqrt((g ** 2).sum() + (b ** 2).sum()),
            "delta_norm": np.linalg.norm(g, axis=1).mean(),
            "update_norm": np.sqrt((g ** 2).sum() + (b ** 2).sum())}
    for key, value in want.items():
        np.testing.assert_allclose(np.asarray(got[key]).ravel(), value, rtol=1e-5,
                                   atol=1e-6 * np.abs(g).max(), err_msg=key)


def test_clip_never_fires_without_clipping_even_at_a_divergence():
    rec = run_to_end(compose_cfg(*DIVERGENT_CLI))
    step = int(rec.diverged_at[0])
    fired = rec.step_stats["clip_fired"][0]
    assert fired[step] == 0 and np.nansum(fired) == 0


def test_snapshots_after_a_divergence_are_nan_like_the_metrics():
    rec = run_to_end(compose_cfg(*DIVERGENT_CLI, *LIGHT, "record.full_grads_every=1"))
    step = int(rec.diverged_at[0])
    for key, value in rec.snapshots.items():
        after = value[0, rec.snapshot_step > step]
        assert np.isnan(after).all(), key
        assert np.isfinite(value[0, rec.snapshot_step < step]).all(), key


def test_accuracy_of_non_finite_logits_is_nan():
    cfg = compose_cfg("depth=1", "width=3")
    net = models.build(cfg, 1)
    params = net.init(jax.random.key(0), jnp.zeros((1, 2)))["params"]
    x = jnp.ones((4, 2))
    y = jnp.array([0, 1, 0, 1])
    eval_batch = make_eval_fn(net, "bce")
    _, correct = eval_batch(params, {}, x, y)
    assert np.isfinite(correct).all()
    broken = jax.tree.map(lambda p: p.at[0].set(jnp.nan) if p.ndim == 2 else p, params)
    _, correct = eval_batch(broken, {}, x, y)
    assert np.isnan(correct).all()
    rec = run_to_end(compose_cfg(*TINY, "act=relu", "init.std=1e30"))  # inf - inf: NaN
    assert np.isnan(rec.epoch_stats["train_acc"][0, 0])  # no accuracy from NaN logits


@pytest.mark.parametrize("dtype,tolerance", [("float64", 1e-10), ("float32", 1e-4)])
def test_float64_runs_match_a_float64_numpy_reference(cli, tmp_path, dtype, tolerance):
    code, _, err = cli(*TINY, *LIGHT, "act=tanh", "batch_size=16", "record.full_grads_every=1",
                       f"dtype={dtype}", f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    summary = store.read_summary(tmp_path)
    assert summary["config"]["dtype"] == dtype
    params = store.read_npz(tmp_path / store.PARAMS)
    grads = store.read_npz(tmp_path / store.GRADS)
    assert grads["dense_0.kernel"].dtype == np.dtype(dtype)
    initial = {f"dense_{i}": {k: params[f"initial.dense_{i}.{k}"][0] for k in ("kernel", "bias")}
               for i in range(5)}
    cfg = compose_cfg(*TINY)
    ds = __import__("vgrad.data", fromlist=["load"]).load(cfg.data)
    batch = program.batch_indices(0, 0, len(ds.x_train), 16)[0]  # step 0's examples
    _, kernel_grads = numpy_backprop(initial, ds.x_train[batch].astype(np.float64),
                                     ds.y_train[batch], *ACTS["tanh"])
    worst = max(np.abs(grads[f"dense_{i}.kernel"][0, 0] - kernel_grads[i]).max()
                / np.abs(kernel_grads[i]).max() for i in range(5))
    assert worst < tolerance
    if dtype == "float32":
        assert worst > 1e-10  # float32 rounding shows: the float64 bound is not met


def test_float64_starts_from_the_float32_weights_and_ends_elsewhere(cli, tmp_path):
    for dtype in ("float32", "float64"):
        code, _, err = cli(*TINY, *LIGHT, f"dtype={dtype}", f"hydra.run.dir={tmp_path / dtype}")
        assert code == 0, err
    p32, p64 = (store.read_npz(tmp_path / d / store.PARAMS) for d in ("float32", "float64"))
    np.testing.assert_array_equal(p64["initial.dense_0.kernel"],
                                  p32["initial.dense_0.kernel"].astype(np.float64))
    assert not np.array_equal(p64["final.dense_0.kernel"],
                              p32["final.dense_0.kernel"].astype(np.float64))


def test_saved_parameters_are_the_runs_own(cli, tmp_path):
    code, _, err = cli(*TINY, "seeds=2", "bn=pre", "record.step_probes=[global_norms]",
                       "record.epoch_probes=[weight_stats]", f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    params = store.read_npz(tmp_path / store.PARAMS)
    metrics = store.read_metrics(tmp_path)
    assert params["initial.dense_0.kernel"].shape == (2, 2, 5)
    assert {"initial.bn_0.scale", "final.bn_0.mean", "final.dense_4.bias"} <= set(params)
    for layer in range(5):  # the recorded weight statistics are those of these kernels
        for when, epoch in (("initial", 0), ("final", -1)):
            kernel = params[f"{when}.dense_{layer}.kernel"].astype(np.float64)
            np.testing.assert_allclose(metrics["weight_mean"][:, epoch, layer],
                                       kernel.mean(axis=(1, 2)), rtol=1e-4, atol=1e-7)
    # ... and the initial ones are what the model's initialiser draws for the seed.
    cfg = compose_cfg(*TINY)
    net = models.build(cfg, 1)
    drawn = init_state(net, optim.make(cfg.clip, cfg.optim, 1, 1),
                       program.seed_keys(jnp.int32(1)).init, jnp.zeros((32, 2)), 5)
    np.testing.assert_array_equal(params["initial.dense_2.kernel"][1],
                                  drawn.params["dense_2"]["kernel"])


def test_no_parameters_are_saved_when_none_are_asked_for(cli, tmp_path):
    code, _, err = cli(*TINY, "record.params=[]", f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    assert not (tmp_path / store.PARAMS).exists()
    assert run_dirs(tmp_path) == [tmp_path]
