"""Clipping contracts, optimizers as optax defines them, Nielsen's L2, schedules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import compose_cfg

from vgrad import optim


def tree(seed: int, scale: float = 1.0):
    k = jax.random.split(jax.random.key(seed), 4)
    return {"dense_0": {"kernel": scale * jax.random.normal(k[0], (6, 5)),
                        "bias": scale * jax.random.normal(k[1], (5,))},
            "dense_1": {"kernel": scale * jax.random.normal(k[2], (5, 1)),
                        "bias": scale * jax.random.normal(k[3], (1,))}}


def transforms(*overrides: str, n_train: int = 100, steps: int = 10) -> optim.Transforms:
    cfg = compose_cfg(*overrides)
    return optim.make(cfg.clip, cfg.optim, n_train, steps)


def clip(tx: optim.Transforms, grads, params):
    return tx.clip.update(grads, tx.clip.init(params), params)[0]


def test_value_clipping_keeps_every_entry_in_range_and_is_idempotent():
    tx = transforms("clip=value", "clip.max=0.5")
    params, grads = tree(0), tree(1, scale=3.0)
    once = clip(tx, grads, params)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(once)) <= 0.5
    jax.tree.map(np.testing.assert_array_equal, clip(tx, once, params), once)
    small = tree(2, scale=1e-3)
    jax.tree.map(np.testing.assert_array_equal, clip(tx, small, params), small)


@pytest.mark.parametrize("max_norm", [0.1, 1e3])
def test_global_norm_clipping_leaves_min_of_norm_and_threshold(max_norm):
    tx = transforms("clip=global_norm", f"clip.max={max_norm}")
    params, grads = tree(0), tree(1, scale=3.0)
    norm = float(optax.tree.norm(grads))
    clipped = clip(tx, grads, params)
    np.testing.assert_allclose(optax.tree.norm(clipped), min(norm, max_norm), rtol=1e-6)
    np.testing.assert_allclose(optax.tree.norm(clip(tx, clipped, params)),
                               min(norm, max_norm), rtol=1e-6)


def test_agc_bounds_each_units_gradient_by_its_weights():
    tx = transforms("clip=agc", "clip.clipping=0.05")
    params, grads = tree(0), tree(1, scale=10.0)
    clipped = clip(tx, grads, params)
    for name in params:
        w, g = params[name]["kernel"], clipped[name]["kernel"]
        unit_g = np.linalg.norm(g, axis=0)  # a unit is a column of a Dense kernel
        unit_w = np.maximum(np.linalg.norm(w, axis=0), 1e-3)
        assert (unit_g <= 0.05 * unit_w * (1 + 1e-5)).all()


def test_sgd_momentum_and_nesterov_are_optaxs():
    params, g1, g2 = tree(0), tree(1), tree(2)
    for nesterov in (False, True):
        ours = transforms("optim=sgd", "optim.lr=0.1", "optim.momentum=0.9",
                          f"optim.nesterov={nesterov}").update
        ref = optax.sgd(0.1, 0.9, nesterov=nesterov)
        s1, s2 = ours.init(params), ref.init(params)
        for g in (g1, g2):
            u1, s1 = ours.update(g, s1, params)
            u2, s2 = ref.update(g, s2, params)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u1, u2)


def test_rmsprop_and_adam_follow_keras_defaults():
    params, g = tree(0), tree(1)
    for overrides, ref in [(["optim=rmsprop"], optax.rmsprop(1e-3, decay=0.9, eps=1e-7)),
                           (["optim=adam"], optax.adam(1e-3, 0.9, 0.999, 1e-7))]:
        ours = transforms(*overrides).update
        u1, _ = ours.update(g, ours.init(params), params)
        u2, _ = ref.update(g, ref.init(params), params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u1, u2)


def test_nielsen_l2_adds_lambda_over_n_times_w_to_kernels_only():
    lr, lam, n = 0.1, 5.0, 50_000
    tx = transforms("optim=sgd", f"optim.lr={lr}", f"optim.l2={lam}", n_train=n).update
    params, g = tree(0), tree(1)
    updates, _ = tx.update(g, tx.init(params), params)
    for name in params:
        np.testing.assert_allclose(updates[name]["kernel"],
                                   -lr * (g[name]["kernel"] + lam / n * params[name]["kernel"]),
                                   rtol=1e-5)
        np.testing.assert_allclose(updates[name]["bias"], -lr * g[name]["bias"], rtol=1e-6)


def test_adamw_decays_kernels_not_biases():
    tx = transforms("optim=adamw", "optim.weight_decay=0.5").update
    params = tree(0)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    for name in params:
        np.testing.assert_allclose(updates[name]["kernel"], -1e-3 * 0.5 * params[name]["kernel"],
                                   rtol=1e-5)
        np.testing.assert_array_equal(updates[name]["bias"], 0.0)


def test_cosine_schedule_decays_the_learning_rate_to_zero():
    tx = transforms("optim=sgd", "optim.lr=0.1", "optim.schedule=cosine", steps=4).update
    params, g = tree(0), tree(1)
    state = tx.init(params)
    sizes = []
    for _ in range(5):
        u, state = tx.update(g, state, params)
        sizes.append(float(optax.tree.norm(u)))
    assert sizes[0] == pytest.approx(0.1 * float(optax.tree.norm(g)), rel=1e-5)
    assert sizes[0] > sizes[1] > sizes[2] > sizes[3] > sizes[4] == pytest.approx(0.0, abs=1e-7)
