"""Per-step statistics against numpy computed on the step's own gradient pytree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import compose_cfg, step_once

from vgrad import models, probes


def one_step(*overrides: str):
    """One step of a 2-3-3-1 net on 16 examples, with both kinds of deltas and the taps."""
    layout, state, new_state, out, _, _ = step_once(*overrides, batch=16, own_deltas=True,
                                                    taps=True)
    return layout, state, new_state, out


def test_kernel_and_bias_statistics_match_numpy():
    layout, _, _, out = one_step()
    stats = jax.jit(lambda o: probes.step_stats(o, layout))(out)
    grads = jax.tree.map(np.asarray, out.grads)
    for layer, name in enumerate(layout.names):
        g = grads[name]["kernel"].astype(np.float64)
        np.testing.assert_allclose(stats["grad_mean"][layer], g.mean(), rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(stats["grad_std"][layer], g.std(), rtol=1e-4)
        np.testing.assert_allclose(stats["grad_norm"][layer], np.sqrt((g ** 2).sum()), rtol=1e-5)
        np.testing.assert_allclose(stats["grad_absmean"][layer], np.abs(g).mean(), rtol=1e-5)
        np.testing.assert_allclose(stats["grad_maxabs"][layer], np.abs(g).max(), rtol=1e-6)
        b = grads[name]["bias"].astype(np.float64)
        np.testing.assert_allclose(stats["bias_grad_norm"][layer], np.linalg.norm(b), rtol=1e-5)
    assert stats["grad_mean"].shape == (len(layout.names),)


def test_global_norm_is_optax_global_norm_over_every_parameter():
    layout, _, _, out = one_step("bn=pre")  # batch-norm scales and offsets count too
    stats = probes.step_stats(out, layout)
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(out.grads)]).astype(np.float64)
    np.testing.assert_allclose(stats["grad_global_norm"], np.linalg.norm(flat), rtol=1e-5)
    np.testing.assert_allclose(stats["grad_global_norm"], optax.tree.norm(out.grads), rtol=1e-6)
    assert "bn_0" in out.grads


def test_gradient_is_the_loss_gradient_before_clipping():
    """The returned pytree is d(mean BCE)/d(params) of the batch, whatever the clipping."""
    layout, state, _, out = one_step("clip=value", "clip.max=1e-4")
    cfg = compose_cfg("depth=2", "width=3")
    net = models.build(cfg, 1)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 2, size=16), jnp.int32)

    def loss(p):
        logits = net.apply({"params": p}, x)
        return optax.sigmoid_binary_cross_entropy(logits[:, 0], y.astype(jnp.float32)).mean()

    expected = jax.grad(loss)(state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
                 out.grads, expected)
    clipped = jax.tree.leaves(out.clipped)
    assert max(float(jnp.abs(c).max()) for c in clipped) <= 1e-4 + 1e-12
    assert float(optax.tree.norm(out.grads)) > 1e-3  # clipping really fired


@pytest.mark.parametrize("probe", sorted(probes.STEP_PROBES))
def test_every_step_probe_returns_what_it_declares(probe):
    entry = probes.STEP_PROBES[probe]
    if entry.requires == "recurrent":
        from test_rnn import rnn_step

        layout, _, out, *_ = rnn_step("model=gru", "data.length=4", "width=3")
    else:
        layout, _, _, out = one_step()
    returned = entry(out, layout)
    assert returned.keys() == entry.outputs.keys()
    sizes = {"layer": len(layout.names), "hidden": len(layout.hidden_names),
             "recurrent": 1, "time": 4, **probes.BIN_AXES}
    for key, value in returned.items():
        assert value.dtype == jnp.float32, key
        assert value.shape == tuple(sizes[a] for a in entry.outputs[key]), key


@pytest.mark.parametrize(("optimizer", "cosine"), [("optim=sgd", -1.0), ("optim=adam", None)])
def test_update_cosine_is_the_gradient_update_cosine_per_layer(optimizer, cosine):
    """-1 for plain SGD at every layer; for Adam, numpy's cosine of the step's own gradient
    and update (kernel and bias together)."""
    layout, _, _, out = one_step(optimizer)
    stats = jax.jit(lambda o: probes.STEP_PROBES["update_cosine"](o, layout))(out)
    grads, updates = jax.tree.map(np.asarray, out.grads), jax.tree.map(np.asarray, out.updates)
    for layer, name in enumerate(layout.names):
        g = np.concatenate([grads[name][k].ravel() for k in ("kernel", "bias")])
        u = np.concatenate([updates[name][k].ravel() for k in ("kernel", "bias")])
        expected = g @ u / (np.linalg.norm(g) * np.linalg.norm(u)) if cosine is None else cosine
        np.testing.assert_allclose(stats["update_cosine"][layer], expected, atol=2e-6)
    if cosine is None:  # Adam really turns the step
        assert np.all(np.asarray(stats["update_cosine"]) > -0.999)
