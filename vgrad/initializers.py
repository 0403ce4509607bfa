"""Weight initializers by name: the ``init`` (kernels) and ``bias_init`` (biases) axes.

Each registry entry maps a config name to its schema (the fields of
``conf/init/<name>.yaml``) and a factory returning a ``jax.nn.initializers``
initializer ``(key, shape, dtype) -> Array``. Where jax has the initializer it is used
as is; only Keras's ``RandomNormal(mean, stddev)`` and ``RandomUniform(minval, maxval)``
need a two-line wrapper, because jax's ``normal`` has no mean and ``uniform`` no lower
bound.

Kernel shapes are ``[fan_in, fan_out]`` (Flax's Dense), so the variance-scaling family
reads fans the same way Keras does: Glorot & Bengio (2010) scale by
``2 / (fan_in + fan_out)``, He et al. (2015) by ``2 / fan_in``, LeCun et al. (1998) by
``1 / fan_in``. ``he_*`` and ``lecun_normal``/``glorot_normal`` use a truncated normal
with the variance corrected for the truncation, as Keras and jax both do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def normal(mean: float, std: float) -> Initializer:
    """N(mean, std^2), Keras ``RandomNormal(mean, stddev)``."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return mean + std * jax.random.normal(key, shape, dtype)

    return init


def uniform(low: float, high: float) -> Initializer:
    """U[low, high), Keras ``RandomUniform(minval, maxval)``."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, low, high)

    return init


@dataclass
class PlainInit:
    """An initializer with no parameters."""

    name: str = "glorot_uniform"


@dataclass
class NormalInit:
    name: str = "normal"
    mean: float = 0.0
    std: float = 1.0  # "Visualizing the vanishing gradient problem": RandomNormal(0, 1)


@dataclass
class UniformInit:
    name: str = "uniform"
    min: float = -0.05  # Keras RandomUniform defaults
    max: float = 0.05


@dataclass
class ConstantInit:
    name: str = "constant"
    value: float = 0.0


@dataclass
class OrthogonalInit:
    name: str = "orthogonal"
    gain: float = 1.0  # W^T W = gain^2 I (Saxe et al. 2014)


@dataclass
class VarianceScalingInit:
    """Var(W) = scale / fan, so sigma_w^2 of mean-field theory can be swept directly."""

    name: str = "variance_scaling"
    scale: float = 1.0
    mode: str = "fan_in"  # fan_in | fan_out | fan_avg
    distribution: str = "normal"  # normal | truncated_normal | uniform


@dataclass
class MeanFieldInit:
    """W ~ N(0, sigma_w2 / fan_in), in the units of mean-field theory (Poole et al. 2016;
    Schoenholz et al. 2017), so that ``init.sigma_w2=1,1.25,...`` is a phase-diagram axis;
    ``distribution=orthogonal``: a random orthogonal matrix scaled so that a layer maps
    an input's mean square q to sigma_w2 * q, as the Gaussian kernel does on average
    (Saxe et al. 2014; Pennington et al. 2017): sqrt(sigma_w2) for square and narrowing
    kernels, sqrt(sigma_w2 * fan_out / fan_in) for widening ones, whose orthonormal rows
    would otherwise spread the input's length over fan_out > fan_in units."""

    name: str = "mean_field"
    sigma_w2: float = 1.0
    distribution: str = "normal"  # normal | orthogonal


def mean_field_kernel(cfg: Any) -> Initializer:
    """``init=mean_field``: Gaussian or scaled orthogonal kernels of a given sigma_w^2."""
    if cfg.distribution == "orthogonal":
        def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32
                 ) -> jax.Array:
            fan_in, fan_out = math.prod(shape[:-1]), shape[-1]
            q = jax.nn.initializers.orthogonal()(key, shape, dtype)
            widening = max(1.0, fan_out / fan_in)
            return jnp.sqrt(jnp.asarray(cfg.sigma_w2 * widening, dtype)) * q

        return init
    return jax.nn.initializers.variance_scaling(cfg.sigma_w2, "fan_in", "normal")


@dataclass
class MeanFieldBias:
    """b ~ N(0, sigma_b2): mean-field theory's bias variance."""

    name: str = "mean_field"
    sigma_b2: float = 0.05


def mean_field_bias(sigma_b2: Any) -> Initializer:
    """N(0, sigma_b2) (``sigma_b2`` may be traced: a sweep's knob)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jnp.sqrt(jnp.asarray(sigma_b2, dtype)) * jax.random.normal(key, shape, dtype)

    return init


@dataclass(frozen=True)
class Init:
    """A registry entry: config schema and initializer factory; whether the variance it
    draws is proportional to 1/fan_in (``fan_in``, or a function of its config node):
    what the NTK and muP parametrizations rescale (``vgrad.parametrization``)."""

    schema: type
    make: Callable[[Any], Initializer]
    fan_in: bool | Callable[[Any], bool] = False

    def scales_with_fan_in(self, cfg: Any) -> bool:
        return self.fan_in(cfg) if callable(self.fan_in) else self.fan_in


KERNEL_INITIALIZERS: dict[str, Init] = {
    "normal": Init(NormalInit, lambda c: normal(c.mean, c.std)),
    "uniform": Init(UniformInit, lambda c: uniform(c.min, c.max)),
    # The relu_fix preset's deliberately poor U(0, 1): a named choice, so a preset can select it
    # and a sweep can still swap it for he_uniform (a preset cannot patch init.min/max
    # without breaking every other choice of init).
    "uniform01": Init(UniformInit, lambda c: uniform(c.min, c.max)),
    "glorot_uniform": Init(PlainInit, lambda c: jax.nn.initializers.glorot_uniform()),
    "glorot_normal": Init(PlainInit, lambda c: jax.nn.initializers.glorot_normal()),
    "he_uniform": Init(PlainInit, lambda c: jax.nn.initializers.he_uniform(), fan_in=True),
    "he_normal": Init(PlainInit, lambda c: jax.nn.initializers.he_normal(), fan_in=True),
    "lecun_uniform": Init(PlainInit, lambda c: jax.nn.initializers.lecun_uniform(), fan_in=True),
    "lecun_normal": Init(PlainInit, lambda c: jax.nn.initializers.lecun_normal(), fan_in=True),
    "orthogonal": Init(OrthogonalInit, lambda c: jax.nn.initializers.orthogonal(c.gain)),
    "delta_orthogonal": Init(OrthogonalInit, lambda c: delta_orthogonal(c.gain)),
    "variance_scaling": Init(
        VarianceScalingInit,
        lambda c: jax.nn.initializers.variance_scaling(c.scale, c.mode, c.distribution),
        fan_in=lambda c: c.mode == "fan_in",
    ),
    "mean_field": Init(MeanFieldInit, mean_field_kernel, fan_in=True),
    # Nielsen's network2 default_weight_initializer: W ~ N(0, 1/n_in) (untruncated);
    # conf/init/nielsen.yaml also selects his bias init, N(0, 1).
    "nielsen": Init(
        PlainInit, lambda c: jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
        fan_in=True),
}

def delta_orthogonal(gain: Any) -> Initializer:
    """Delta-orthogonal (Xiao et al. 2018, "Dynamical isometry and a mean field theory of
    CNNs: how to train 10,000-layer vanilla convolutional neural networks"): a
    convolution kernel [k..., c_in, c_out] that is a random orthogonal matrix (times
    ``gain``) at the spatial centre and zero elsewhere, so that with circular padding the
    convolution is an orthogonal map of the whole feature map (``jax``'s
    ``delta_orthogonal``); a Dense kernel [fan_in, fan_out] (a CNN's readout) is drawn
    orthogonal as by ``init=orthogonal``. Needs c_in <= c_out."""
    conv = jax.nn.initializers.delta_orthogonal(gain)
    dense = jax.nn.initializers.orthogonal(gain)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return conv(key, shape, dtype) if len(shape) in (3, 4, 5) else dense(key, shape, dtype)

    return init


BIAS_INITIALIZERS: dict[str, Init] = {
    "zeros": Init(PlainInit, lambda c: jax.nn.initializers.zeros),
    "constant": Init(ConstantInit, lambda c: jax.nn.initializers.constant(c.value)),
    "normal": Init(NormalInit, lambda c: normal(c.mean, c.std)),
    "uniform": Init(UniformInit, lambda c: uniform(c.min, c.max)),
    "mean_field": Init(MeanFieldBias, lambda c: mean_field_bias(c.sigma_b2)),
}


def kernel_init(cfg: Any) -> Initializer:
    """The kernel initializer named by the ``init`` config node."""
    return KERNEL_INITIALIZERS[cfg.name].make(cfg)


def bias_init(cfg: Any) -> Initializer:
    """The bias initializer named by the ``bias_init`` config node."""
    return BIAS_INITIALIZERS[cfg.name].make(cfg)


def select(inits: list[Initializer], index: jax.Array) -> Initializer:
    """An initializer drawing from ``inits[index]`` (``index`` traced, one per member),
    so that jobs differing only in their initializer share one program. Every family
    draws from the same key; under ``vmap`` all are evaluated once, at initialisation."""
    if len(inits) == 1:
        return inits[0]

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.lax.switch(index, [lambda k, f=f: f(k, shape, dtype) for f in inits], key)

    return init


def drawn_in_float32(init: Initializer) -> Initializer:
    """``init`` drawing its values in float32 whatever the parameters' dtype, then cast:
    a float64 run (``dtype=float64``) starts from exactly the weights of the float32
    run of the same seed, so that the two differ only in their arithmetic."""
    def cast(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return init(key, shape, jnp.float32).astype(dtype)

    return cast
