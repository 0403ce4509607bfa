"""The MLP: stable layer names, batch-norm placement and its inference mode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compose_cfg

from vgrad import models


def build(*overrides: str, out_dim: int = 1):
    return models.build(compose_cfg(*overrides), out_dim)


def test_layers_are_named_from_the_input_side():
    net = build("depth=3", "width=4", "bn=pre")
    params = net.init(jax.random.key(0), jnp.zeros((2, 7)))["params"]
    assert [k for k in params if k.startswith("dense")] == ["dense_0", "dense_1", "dense_2",
                                                            "dense_3"]
    assert params["dense_0"]["kernel"].shape == (7, 4)
    assert params["dense_3"]["kernel"].shape == (4, 1)
    assert sorted(k for k in params if k.startswith("bn")) == ["bn_0", "bn_1", "bn_2"]


def test_widths_list_sets_each_hidden_layer():
    net = build("depth=3", "widths=[8,6,4]", out_dim=10)
    params = net.init(jax.random.key(0), jnp.zeros((2, 5)))["params"]
    assert [params[f"dense_{i}"]["kernel"].shape for i in range(4)] == [(5, 8), (8, 6), (6, 4),
                                                                       (4, 10)]


@pytest.mark.parametrize("where", ["pre", "post"])
def test_evaluation_uses_the_running_averages(where):
    net = build("depth=1", "width=3", "act=tanh", f"bn={where}", "bn_momentum=0.5")
    rng = np.random.default_rng(0)
    x_train = jnp.asarray(rng.normal(2.0, 3.0, size=(64, 2)), jnp.float32)
    x_eval = jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)
    variables = net.init(jax.random.key(0), x_train)
    variables = {k: variables[k] for k in ("params", "batch_stats")}
    for _ in range(3):  # three training-mode passes move the running averages
        _, mutated = net.apply(variables, x_train, train=True, mutable=["batch_stats"])
        variables = {**variables, **mutated}
    stats = variables["batch_stats"]["bn_0"]
    assert not np.allclose(stats["mean"], 0)
    p = variables["params"]

    def norm(v):
        return ((v - stats["mean"]) / np.sqrt(stats["var"] + 1e-3) * p["bn_0"]["scale"]
                + p["bn_0"]["bias"])

    z = x_eval @ p["dense_0"]["kernel"] + p["dense_0"]["bias"]
    a = np.tanh(norm(z)) if where == "pre" else norm(np.tanh(z))
    expected = a @ p["dense_1"]["kernel"] + p["dense_1"]["bias"]
    np.testing.assert_allclose(net.apply(variables, x_eval, train=False), expected, rtol=1e-5,
                               atol=1e-6)
    training_mode, _ = net.apply(variables, x_eval, train=True, mutable=["batch_stats"])
    assert not np.allclose(training_mode, expected)  # batch statistics differ


def test_capture_sows_the_signal_activations_and_slopes_of_every_layer():
    net = build("depth=2", "width=3", "act=sigmoid")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2)), jnp.float32)
    variables = net.init(jax.random.key(0), x)
    _, sown = net.apply(variables, x, capture=True, mutable=["intermediates"])
    inter = sown["intermediates"]
    z = x @ variables["params"]["dense_0"]["kernel"] + variables["params"]["dense_0"]["bias"]
    s = 1 / (1 + np.exp(-np.asarray(z)))
    np.testing.assert_allclose(inter["activation_0"][0], s, rtol=1e-6)
    np.testing.assert_allclose(inter["slope_0"][0], s * (1 - s), rtol=1e-5)
    np.testing.assert_allclose(inter["slope_max_0"][0], 0.25, rtol=1e-6)
    np.testing.assert_allclose(inter["delta_0"][0], z, rtol=1e-6)  # the forward signal
    assert set(inter) == ({f"{k}_{i}" for k in ("activation", "slope", "slope_max")
                           for i in range(2)} | {f"delta_{i}" for i in range(3)})
