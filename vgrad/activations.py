"""Activation functions by name: the ``act`` axis of every sweep.

Every activation is a Flax linen module called as ``act(z, train)`` on the output
``z`` of a Dense layer, shape ``[batch, features * pieces]``, and returning
``[batch, features]``. ``pieces`` is 1 for everything but maxout. Modules (rather than
bare functions) let the learnable and stochastic ones carry parameters (PReLU,
learnable Swish) or draw noise (RReLU) while the model treats all of them alike.

The registry ``ACTIVATIONS`` maps a config name to an :class:`Activation` entry: its
config schema (a dataclass whose fields are the keys of ``conf/act/<name>.yaml``) and a
``build`` function from that config to a module factory. Adding an activation is one
entry here plus one YAML file; the tests are generated from the registry's keys.

Sources: the activations book chapter (ch. 5, sections 5.2-5.3) and "Vanishing/exploding
gradients" (ReLU variants).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


# --- pure elementwise functions that jax.nn lacks -------------------------------------


def hardtanh(z: Array) -> Array:
    """Hard tanh: -1 below -1, z in between, 1 above (the activations book chapter, Fig. 5.6)."""
    return jnp.clip(z, -1.0, 1.0)


def bent_identity(z: Array) -> Array:
    """Bent identity, (sqrt(z^2 + 1) - 1) / 2 + z (the activations book chapter, Fig. 5.9)."""
    return (jnp.sqrt(z * z + 1.0) - 1.0) / 2.0 + z


def linear(z: Array) -> Array:
    """Identity: no nonlinearity (the deep linear networks of Saxe et al. 2014)."""
    return z


# --- modules ---------------------------------------------------------------------------


class Fixed(nn.Module):
    """A fixed elementwise nonlinearity with no parameters."""

    fn: Callable[[Array], Array]

    def __call__(self, z: Array, train: bool = False) -> Array:
        return self.fn(z)


class PReLU(nn.Module):
    """Parametric ReLU: z for z >= 0, alpha * z below, alpha learned (He et al. 2015).

    ``shared=False`` learns one slope per unit, ``shared=True`` one per layer.
    """

    initial: float = 0.25  # (not ``init``: that would shadow Module.init)
    shared: bool = False

    @nn.compact
    def __call__(self, z: Array, train: bool = False) -> Array:
        shape = () if self.shared else (z.shape[-1],)
        alpha = self.param("alpha", nn.initializers.constant(self.initial), shape)
        return jnp.where(z >= 0, z, alpha * z)


class Swish(nn.Module):
    """Swish, z * sigmoid(beta * z) (Ramachandran et al. 2017); beta optionally learned."""

    beta: float = 1.0
    learnable: bool = False

    @nn.compact
    def __call__(self, z: Array, train: bool = False) -> Array:
        beta = self.param("beta", nn.initializers.constant(self.beta), ()) if self.learnable \
            else self.beta
        return swish(z, beta)


class RReLU(nn.Module):
    """Randomized leaky ReLU (Xu et al. 2015).

    In training the negative slope of each unit is drawn uniformly from
    [lower, upper] afresh at every step (from the ``"noise"`` rng stream, which stochastic
    layers draw from); at evaluation
    it is fixed at their mean, (lower + upper) / 2.
    """

    lower: float = 1.0 / 8.0
    upper: float = 1.0 / 3.0

    @nn.compact
    def __call__(self, z: Array, train: bool = False) -> Array:
        if train:
            key = self.make_rng("noise")
            slope = jax.random.uniform(key, (z.shape[-1],), z.dtype, self.lower, self.upper)
        else:
            slope = (self.lower + self.upper) / 2.0
        return jnp.where(z >= 0, z, slope * z)


class Maxout(nn.Module):
    """Maxout (Goodfellow et al. 2013): the max over ``pieces`` affine maps per unit.

    The preceding Dense layer computes ``features * pieces`` outputs (k times the
    parameters); unit j takes the max over its k consecutive pieces.
    """

    pieces: int = 2

    def __call__(self, z: Array, train: bool = False) -> Array:
        return z.reshape(*z.shape[:-1], -1, self.pieces).max(axis=-1)


# --- config schemas ----------------------------------------------------------------------


@dataclass
class PlainAct:
    """An activation with no parameters."""

    name: str = "relu"


@dataclass
class LeakyReLUAct:
    name: str = "leaky_relu"
    # Negative slope; "Vanishing/exploding gradients" uses 0.2, Keras 0.3, PyTorch 0.01.
    alpha: float = 0.01


@dataclass
class ELUAct:
    name: str = "elu"
    alpha: float = 1.0  # value approached as z -> -inf is -alpha (Clevert et al. 2016)


@dataclass
class SwishAct:
    name: str = "swish"
    # beta = 0 is linear / 2, beta -> inf approaches ReLU (the activations book chapter).
    beta: float = 1.0
    learnable: bool = False


@dataclass
class PReLUAct:
    name: str = "prelu"
    init: float = 0.25  # He et al. 2015
    shared: bool = False  # one slope per layer instead of one per unit


@dataclass
class RReLUAct:
    name: str = "rrelu"
    lower: float = 0.125  # Xu et al. 2015 / PyTorch defaults: U[1/8, 1/3]
    upper: float = 0.3333333333333333


@dataclass
class MaxoutAct:
    name: str = "maxout"
    pieces: int = 2  # k affine maps per unit


@dataclass(frozen=True)
class Activation:
    """A registry entry: the config schema, the builder of the module factory and, for
    elementwise activations, the plain function (which lets one compiled program select
    the activation per member of a grouped sweep; see ``vgrad.group``)."""

    schema: type
    build: Callable[[Any], Callable[..., nn.Module]]
    pieces: Callable[[Any], int] = lambda cfg: 1
    elementwise: Callable[[Any], Callable[[Array], Array] | None] = lambda cfg: None


def _fixed(fn: Callable[[Any], Callable[[Array], Array]]) -> Activation:
    """An elementwise activation without parameters of its own to learn."""
    return Activation(PlainAct, lambda c: partial(Fixed, fn=fn(c)), elementwise=fn)


def swish(z: Array, beta: Array | float) -> Array:
    """z * sigmoid(beta * z)."""
    return z * jax.nn.sigmoid(beta * z)


ACTIVATIONS: dict[str, Activation] = {
    "linear": _fixed(lambda c: linear),
    "sigmoid": _fixed(lambda c: jax.nn.sigmoid),
    "tanh": _fixed(lambda c: jnp.tanh),
    "hardtanh": _fixed(lambda c: hardtanh),
    "arctan": _fixed(lambda c: jnp.arctan),
    "softsign": _fixed(lambda c: jax.nn.soft_sign),
    "bent_identity": _fixed(lambda c: bent_identity),
    "relu": _fixed(lambda c: jax.nn.relu),
    "selu": _fixed(lambda c: jax.nn.selu),
    "gelu": _fixed(lambda c: partial(jax.nn.gelu, approximate=False)),
    "softplus": _fixed(lambda c: jax.nn.softplus),
    "leaky_relu": dataclasses.replace(
        _fixed(lambda c: partial(jax.nn.leaky_relu, negative_slope=c.alpha)),
        schema=LeakyReLUAct),
    "elu": dataclasses.replace(_fixed(lambda c: partial(jax.nn.elu, alpha=c.alpha)),
                               schema=ELUAct),
    "swish": Activation(
        SwishAct, lambda c: partial(Swish, beta=c.beta, learnable=c.learnable),
        elementwise=lambda c: None if c.learnable else partial(swish, beta=c.beta)),
    "prelu": Activation(PReLUAct, lambda c: partial(PReLU, initial=c.init, shared=c.shared)),
    "rrelu": Activation(RReLUAct, lambda c: partial(RReLU, lower=c.lower, upper=c.upper)),
    "maxout": Activation(
        MaxoutAct, lambda c: partial(Maxout, pieces=c.pieces), pieces=lambda c: c.pieces
    ),
}


def build(cfg: Any) -> tuple[Callable[..., nn.Module], int]:
    """Module factory and number of pieces per unit for the ``act`` config node."""
    entry = ACTIVATIONS[cfg.name]
    return entry.build(cfg), entry.pieces(cfg)


def pieces(cfg: Any) -> int:
    """Outputs per unit of the ``act`` config node (maxout's pieces; 1 otherwise)."""
    return int(ACTIVATIONS[cfg.name].pieces(cfg))


def elementwise(cfg: Any) -> Callable[[Array], Array] | None:
    """The activation as a plain elementwise function, or None when it is not one
    (learnable parameters, noise, or several inputs per output)."""
    return ACTIVATIONS[cfg.name].elementwise(cfg)


def select(fns: list[Callable[[Array], Array]], index: Array) -> Callable[..., nn.Module]:
    """A module factory applying ``fns[index]`` (``index`` traced, one per member).

    Under ``vmap`` over members with different indices, ``lax.switch`` evaluates every
    branch and selects: the elementwise branches fuse into the same loops, so a few
    activations in one program cost little (``benchmarks/sweep_bench.py`` measures it).
    """
    return partial(Fixed, fn=lambda z: jax.lax.switch(index, fns, z))
