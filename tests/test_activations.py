"""Every registered activation against its numpy formula (tests generated from the
registry: a new activation without a reference here fails), plus the learnable and
stochastic ones' own contracts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compose_cfg, step_once
from scipy.special import erf

from vgrad import activations

Z = np.array([-50.0, -10.0, -3.0, -1.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 1.0, 3.0, 10.0, 50.0])
SELU_L, SELU_A = 1.0507009873554805, 1.6732632423543772

#: Each activation at its default config (conf/act/<name>.yaml), in float64 numpy.
REFERENCE = {
    "linear": lambda z: z,
    "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
    "tanh": np.tanh,
    "hardtanh": lambda z: np.clip(z, -1, 1),
    "arctan": np.arctan,
    "softsign": lambda z: z / (1 + np.abs(z)),
    "bent_identity": lambda z: (np.sqrt(z ** 2 + 1) - 1) / 2 + z,
    "relu": lambda z: np.maximum(z, 0),
    "selu": lambda z: SELU_L * np.where(z > 0, z, SELU_A * (np.exp(np.minimum(z, 0)) - 1)),
    "gelu": lambda z: z * (1 + erf(z / np.sqrt(2))) / 2,
    "softplus": lambda z: np.logaddexp(0, z),
    "leaky_relu": lambda z: np.where(z >= 0, z, 0.01 * z),
    "elu": lambda z: np.where(z > 0, z, np.exp(np.minimum(z, 0)) - 1),
    "swish": lambda z: z / (1 + np.exp(-z)),
    "prelu": lambda z: np.where(z >= 0, z, 0.25 * z),
    "rrelu": lambda z: np.where(z >= 0, z, (1 / 8 + 1 / 3) / 2 * z),  # evaluation: mean slope
    "maxout": None,  # tested on its own below
}


def module_for(name: str, **overrides):
    cfg = compose_cfg(f"act={name}", *[f"act.{k}={v}" for k, v in overrides.items()])
    factory, pieces = activations.build(cfg.act)
    return factory(), pieces


def apply(act, z, train=False, key=None):
    variables = act.init({"params": jax.random.key(0), "noise": jax.random.key(0)}, z)
    rngs = {"noise": key} if key is not None else {}
    return act.apply(variables, z, train, rngs=rngs), variables


@pytest.mark.parametrize("name", sorted(activations.ACTIVATIONS))
def test_every_activation_has_a_reference(name):
    assert name in REFERENCE


@pytest.mark.parametrize("name", sorted(n for n, f in REFERENCE.items() if f is not None))
def test_activation_matches_numpy_and_has_finite_slope(name):
    act, pieces = module_for(name)
    assert pieces == 1
    z = jnp.asarray(Z[None, :], jnp.float32)
    out, variables = apply(act, z)
    np.testing.assert_allclose(out[0], REFERENCE[name](Z), rtol=2e-6, atol=1e-6)
    slope = jax.grad(lambda u: act.apply(variables, u).sum())(z)
    assert np.isfinite(slope).all()


def test_maxout_takes_the_max_over_each_units_pieces_with_k_times_the_parameters():
    act, pieces = module_for("maxout", pieces=3)
    assert pieces == 3
    z = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2 * 3)), jnp.float32)
    out, _ = apply(act, z)
    np.testing.assert_array_equal(out, np.asarray(z).reshape(4, 2, 3).max(-1))
    relu = compose_cfg("act=relu", "depth=2", "width=4")
    maxout = compose_cfg("act=maxout", "act.pieces=3", "depth=2", "width=4")
    from vgrad import models, program

    def hidden_params(cfg):
        net = models.build(cfg, 1)
        shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 2))))
        return {n: sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"][n]))
                for n in ("dense_0", "dense_1")}

    assert (program.count_params(models.build(maxout, 1), 2)
            > program.count_params(models.build(relu, 1), 2))
    assert hidden_params(maxout)["dense_0"] == 3 * hidden_params(relu)["dense_0"]


def test_prelu_slope_is_learned_per_unit():
    layout, state, new_state, out, _, _ = step_once("act=prelu", "optim=sgd", "optim.lr=1.0",
                                                   "init.std=3", batch=32)
    alpha = state.params["act_0"]["alpha"]
    assert alpha.shape == (3,) and np.allclose(alpha, 0.25)
    assert np.abs(out.grads["act_0"]["alpha"]).max() > 0
    assert not np.allclose(new_state.params["act_0"]["alpha"], alpha)
    shared, _ = module_for("prelu", shared="true")
    _, variables = apply(shared, jnp.ones((1, 5)))
    assert variables["params"]["alpha"].shape == ()


def test_learnable_swish_gets_a_beta_gradient():
    _, state, _, out, _, _ = step_once("act=swish", "act.learnable=true", batch=16)
    assert state.params["act_0"]["beta"] == 1.0
    assert out.grads["act_0"]["beta"] != 0
    fixed, _ = module_for("swish", beta=2.0)
    z = jnp.asarray(Z[None, :], jnp.float32)
    np.testing.assert_allclose(apply(fixed, z)[0][0], Z / (1 + np.exp(-2 * Z)), rtol=2e-6,
                               atol=1e-6)


def test_rrelu_is_random_in_training_fixed_in_evaluation_and_seeded():
    act, _ = module_for("rrelu")
    z = -jnp.ones((2, 6))
    train_a, _ = apply(act, z, True, jax.random.key(1))
    train_b, _ = apply(act, z, True, jax.random.key(1))
    train_c, _ = apply(act, z, True, jax.random.key(2))
    evaluation, _ = apply(act, z, False)
    np.testing.assert_array_equal(train_a, train_b)  # same key, same slopes
    assert not np.allclose(train_a, train_c)
    np.testing.assert_allclose(evaluation, -(1 / 8 + 1 / 3) / 2, rtol=1e-6)
    slopes = -np.asarray(train_a)
    assert ((slopes >= 1 / 8) & (slopes <= 1 / 3)).all()
    np.testing.assert_array_equal(slopes[0], slopes[1])  # one slope per unit and step
    assert len(np.unique(slopes[0])) == 6
