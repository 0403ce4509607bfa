"""Every registered initializer: empirical mean and variance against its formula on a
256 x 512 kernel (tests generated from the registry), orthogonality, bias inits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compose_cfg

from vgrad import initializers

FAN_IN, FAN_OUT = 256, 512

#: (mean, variance) of each kernel initializer at its default config.
MOMENTS = {
    "normal": (0.0, 1.0),
    "uniform": (0.0, 0.1 ** 2 / 12),
    "uniform01": (0.5, 1 / 12),
    "glorot_uniform": (0.0, 2 / (FAN_IN + FAN_OUT)),
    "glorot_normal": (0.0, 2 / (FAN_IN + FAN_OUT)),
    "he_uniform": (0.0, 2 / FAN_IN),
    "he_normal": (0.0, 2 / FAN_IN),
    "lecun_uniform": (0.0, 1 / FAN_IN),
    "lecun_normal": (0.0, 1 / FAN_IN),
    "orthogonal": (0.0, 1 / FAN_OUT),  # orthonormal rows of a 256 x 512 matrix
    "delta_orthogonal": (0.0, 1 / FAN_OUT),  # a Dense kernel: orthogonal
    "variance_scaling": (0.0, 1 / FAN_IN),
    "nielsen": (0.0, 1 / FAN_IN),
    "mean_field": (0.0, 1 / FAN_IN),
}


def draw(group: str, name: str, shape, *overrides: str) -> np.ndarray:
    cfg = compose_cfg(f"{group}={name}", *overrides)[group]
    make = (initializers.kernel_init if group == "init" else initializers.bias_init)(cfg)
    return np.asarray(make(jax.random.key(0), shape, jnp.float32), np.float64)


@pytest.mark.parametrize("name", sorted(initializers.KERNEL_INITIALIZERS))
def test_kernel_initializer_moments(name):
    assert name in MOMENTS, "add the formula of the new initializer to MOMENTS"
    mean, var = MOMENTS[name]
    w = draw("init", name, (FAN_IN, FAN_OUT))
    n = w.size
    assert abs(w.mean() - mean) < 5 * np.sqrt(var / n) + 1e-12
    np.testing.assert_allclose(w.var(), var, rtol=0.03)


@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_orthogonal_kernels(gain):
    w = draw("init", "orthogonal", (FAN_IN, FAN_IN), f"init.gain={gain}")
    np.testing.assert_allclose(w.T @ w, gain ** 2 * np.eye(FAN_IN), atol=1e-4 * gain ** 2)
    wide = draw("init", "orthogonal", (FAN_IN, FAN_OUT), f"init.gain={gain}")
    np.testing.assert_allclose(wide @ wide.T, gain ** 2 * np.eye(FAN_IN), atol=1e-4 * gain ** 2)


@pytest.mark.parametrize("gain", [1.0, 1.5])
def test_delta_orthogonal_conv_kernels_are_orthogonal_at_the_centre_and_zero_elsewhere(gain):
    k, c_in, c_out = 3, 16, 32
    w = draw("init", "delta_orthogonal", (k, k, c_in, c_out), f"init.gain={gain}")
    centre = w[k // 2, k // 2]
    np.testing.assert_allclose(centre @ centre.T, gain ** 2 * np.eye(c_in), atol=1e-5)
    off = w.copy()
    off[k // 2, k // 2] = 0
    assert not off.any()


@pytest.mark.parametrize("name,var", [("he_normal", 2.0), ("lecun_normal", 1.0),
                                      ("glorot_uniform", 1.0)])
def test_conv_kernels_read_the_fan_in_as_receptive_field_times_input_channels(name, var):
    k, c_in, c_out = 3, 32, 64  # fan_in = 288, fan_out = 576; Glorot: 1 / fan_avg
    w = draw("init", name, (k, k, c_in, c_out))
    fan = k * k * c_in if name != "glorot_uniform" else (k * k * (c_in + c_out)) / 2
    np.testing.assert_allclose(w.var(), var / fan, rtol=0.03)


def test_variance_scaling_sweeps_sigma_w_squared():
    for scale, mode, fan in [(2.0, "fan_in", FAN_IN), (3.0, "fan_out", FAN_OUT),
                             (1.5, "fan_avg", (FAN_IN + FAN_OUT) / 2)]:
        for dist in ("normal", "truncated_normal", "uniform"):
            w = draw("init", "variance_scaling", (FAN_IN, FAN_OUT), f"init.scale={scale}",
                     f"init.mode={mode}", f"init.distribution={dist}")
            np.testing.assert_allclose(w.var(), scale / fan, rtol=0.03)


def test_mean_field_init_is_sigma_w2_over_fan_in_and_feeds_the_theory():
    from vgrad import theory

    for sigma_w2 in (1.0, 1.76, 4.0):
        w = draw("init", "mean_field", (FAN_IN, FAN_OUT), f"init.sigma_w2={sigma_w2}")
        np.testing.assert_allclose(w.var(), sigma_w2 / FAN_IN, rtol=0.03)
        assert abs(w).max() > 4.5 * np.sqrt(sigma_w2 / FAN_IN)  # untruncated Gaussian
    w = draw("init", "mean_field", (FAN_IN, FAN_IN), "init.sigma_w2=1.05",
             "init.distribution=orthogonal")
    np.testing.assert_allclose(w.T @ w, 1.05 * np.eye(FAN_IN), atol=1e-4)
    # Widening (fan_out > fan_in): every input's mean square is multiplied by exactly
    # sigma_w^2, as the Gaussian kernel does on average; narrowing: W^T W = sigma_w^2 I.
    wide = draw("init", "mean_field", (FAN_IN, FAN_OUT), "init.sigma_w2=1.05",
                "init.distribution=orthogonal")
    x = np.random.default_rng(0).normal(size=(8, FAN_IN))
    np.testing.assert_allclose(np.mean((x @ wide) ** 2, 1), 1.05 * np.mean(x ** 2, 1),
                               rtol=1e-4)
    narrow = draw("init", "mean_field", (FAN_OUT, FAN_IN), "init.sigma_w2=1.05",
                  "init.distribution=orthogonal")
    np.testing.assert_allclose(narrow.T @ narrow, 1.05 * np.eye(FAN_IN), atol=1e-4)
    cfg = compose_cfg("init=mean_field", "init.sigma_w2=1.76", "bias_init=mean_field")
    assert theory.sigma_w2_of(cfg.init) == 1.76
    assert theory.sigma_b2_of(cfg.bias_init) == 0.05


def test_normal_and_uniform_parameters_are_wired():
    w = draw("init", "normal", (FAN_IN, FAN_OUT), "init.mean=0.3", "init.std=0.2")
    np.testing.assert_allclose([w.mean(), w.std()], [0.3, 0.2], atol=3e-3)
    u = draw("init", "uniform", (FAN_IN, FAN_OUT), "init.min=0", "init.max=1")
    assert u.min() >= 0 and u.max() < 1
    np.testing.assert_allclose(u.var(), 1 / 12, rtol=0.03)


@pytest.mark.parametrize("name,mean,var,overrides", [
    ("zeros", 0.0, 0.0, []),
    ("constant", -2.0, 0.0, ["bias_init.value=-2"]),
    ("normal", 0.0, 1.0, []),
    ("uniform", 0.0, 0.1 ** 2 / 12, []),
    ("mean_field", 0.0, 0.05, []),
    ("mean_field", 0.0, 2.5, ["bias_init.sigma_b2=2.5"]),
])
def test_bias_initializers(name, mean, var, overrides):
    b = draw("bias_init", name, (200_000,), *overrides)
    np.testing.assert_allclose(b.mean(), mean, atol=5 * np.sqrt(var / b.size) + 1e-12)
    np.testing.assert_allclose(b.var(), var, rtol=0.03, atol=1e-12)


def test_nielsen_init_draws_kernels_and_biases_as_network2():
    cfg = compose_cfg("init=nielsen", "depth=1", "width=30")
    from vgrad import models

    net = models.build(cfg, 10)
    params = net.init(jax.random.key(0), jnp.zeros((1, 784)))["params"]
    np.testing.assert_allclose(np.var(params["dense_0"]["kernel"]), 1 / 784, rtol=0.05)
    np.testing.assert_allclose(np.var(params["dense_1"]["kernel"]), 1 / 30, rtol=0.3)
    assert 0.5 < np.std(params["dense_0"]["bias"]) < 1.5  # N(0, 1) on 30 units
