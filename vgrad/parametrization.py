"""How a net's layers scale with its width: the ``param`` axis (``conf/param/<name>.yaml``).

A *parametrization* says, for every layer, how its initial weights, a constant
multiplier in the forward pass and its learning rate scale with the width n of the
hidden layers (the abc-parametrizations of Yang & Hu 2021, "Feature learning in
infinite-width neural networks"). Three are built in, for the MLP and the residual MLP
(registry fact ``Model.width_parametrized``):

- ``sp``, the standard parametrization (the default, what every other axis describes):
  the kernel initializer's variance, no multiplier, one learning rate.
- ``ntk``, the neural tangent kernel parametrization (Jacot, Gabriel & Hongler 2018):
  every Dense layer computes W' (x / sqrt(fan_in)) + b, with W' = sqrt(fan_in) W_0 where
  W_0 is what the ``init`` axis draws; the net at initialisation is the same function as
  under ``sp`` (``init=lecun_normal``: W' ~ N(0, 1)), but a step of size lr moves a
  weight's effect by lr / fan_in: training freezes into the kernel regime as n grows.
- ``mup``, the maximal-update parametrization (Yang & Hu 2021; Yang et al. 2022,
  "Tensor Programs V: tuning large neural networks via zero-shot hyperparameter
  transfer"), in the form microsoft/mup implements, relative to a base width
  ``param.base_width`` at which it equals ``sp``. With width multipliers m = n / n_base
  per dimension that scales with the width ("infinite" dimensions: those whose size
  differs from the same net's at the base width, as ``mup.set_base_shapes`` finds them):

  ================  ==============================  ==================  ==============
  weights            init (x the ``init`` draw)      forward multiplier  learning rate
  ================  ==============================  ==================  ==============
  input kernel,      1 (kernel: variance 1/fan_in;   1                   SGD: lr * m
  biases, norm       biases: the ``bias_init``                           Adam: lr
  scales (vector-    draw)
  like: one
  infinite dim.)
  hidden (matrix-    1 (variance 1/fan_in)           1                   SGD: lr * m_out / m_in
  like: [n, n])                                                          Adam: lr / m_in
  output [n, k]      sqrt(m_in)                      1 / m_in            SGD: lr * m_in
                     (variance 1/n_base)             (on its input)      Adam: lr
  scalars, output    1                               1                   lr
  bias (finite)
  ================  ==============================  ==================  ==============

  which is Table 3 of Tensor Programs V written with an output multiplier (their Table
  8 and mup's ``MuReadout``): the output layer's effective weights W'/m_in have variance
  n_base / fan_in^2 (Table 3: 1/fan_in^2) and an effective Adam (SGD) learning rate
  lr / m_in (lr * n_base / fan_in); hidden weights keep variance 1/fan_in with Adam's
  rate 1/fan_in. "Adam" is every optimizer that normalises the gradient entrywise
  (``Optim.adaptive``: Adam, AdamW, RMSprop: mup's ``MuAdam``), "SGD" the others
  (``MuSGD``). A decoupled weight decay (AdamW's) is not rescaled (mup multiplies
  torch's by the width multiplier inside a rate divided by it: the same decay per step).

Both ``ntk`` and ``mup`` assume a kernel initializer whose variance scales as 1/fan_in
(LeCun, He, Nielsen's, mean-field, variance scaling with ``mode=fan_in``: the entry's
fact ``Init.fan_in``); any other is refused with a one-line error. Biases keep the
``bias_init`` draw, a constant variance as both tables have it (mup's
``_rescale_parameters`` also multiplies the readout's bias by sqrt(m_in), to turn
torch's U(+-1/sqrt(fan_in)) bias into a constant variance: vgrad's bias initializers do
not depend on the width, so it is left alone). ``widths=[...]`` lists are refused under
``mup`` (its base net sets every hidden width to ``base_width``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Initializer = Callable[..., Array]

#: The roles of a Dense layer: next to the input, between hidden layers, the readout.
ROLES = ("input", "hidden", "output")


@dataclass
class SPParam:
    name: str = "sp"


@dataclass
class NTKParam:
    name: str = "ntk"


@dataclass
class MuPParam:
    name: str = "mup"
    base_width: int = 128  # the width at which muP equals the standard parametrization


@dataclass(frozen=True)
class Scaling:
    """A net's parametrization, as its modules apply it (a hashable module field): the
    multiplier on each Dense layer's input and the factor on its initial kernel."""

    name: str = "sp"
    base_width: int = 128

    def multiplier(self, role: str, fan_in: int) -> float:
        """The constant the Dense layer's input is multiplied by (1: none)."""
        if self.name == "ntk":
            return 1.0 / math.sqrt(fan_in)
        if self.name == "mup" and role == "output":
            return self.base_width / fan_in
        return 1.0

    def kernel_init(self, init: Initializer, role: str) -> Initializer:
        """``init`` with its draws scaled as the parametrization's kernels are: by
        sqrt(fan_in) (``ntk``), by sqrt(fan_in / base_width) on the readout (``mup``)."""
        if self.name == "sp" or (self.name == "mup" and role != "output"):
            return init
        base = self.base_width

        def scaled(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
            fan_in = math.prod(shape[:-1])
            factor = math.sqrt(fan_in) if self.name == "ntk" else math.sqrt(fan_in / base)
            return init(key, shape, dtype) * jnp.asarray(factor, dtype)
        return scaled

    def dense_input(self, x: Array, role: str) -> Array:
        """``x`` times the multiplier of a Dense layer of ``role`` reading it (untouched
        where it is 1, so that ``sp`` computes exactly what it did before)."""
        c = self.multiplier(role, x.shape[-1])
        return x if c == 1.0 else x * jnp.asarray(c, x.dtype)


@dataclass(frozen=True)
class Param:
    """A registry entry: the config schema, and whether learning rates are rescaled."""

    schema: type
    scales_lr: bool = False


PARAMS: dict[str, Param] = {
    "sp": Param(SPParam),
    "ntk": Param(NTKParam),
    "mup": Param(MuPParam, scales_lr=True),
}


def scaling(cfg: Any) -> Scaling:
    """The ``param`` node of a config as its modules apply it."""
    node = cfg.param
    return Scaling(node.name, int(getattr(node, "base_width", 128)))


def width_multipliers(shape: tuple[int, ...], base: tuple[int, ...]) -> list[float]:
    """n / n_base of each dimension of a parameter that differs from the base net's (its
    "infinite" dimensions, mup's ``InfShape``), in order."""
    if len(shape) != len(base):
        raise ValueError(f"a parameter of shape {shape} has base shape {base}")
    return [n / b for n, b in zip(shape, base, strict=True) if n != b]


def lr_multiplier(shape: tuple[int, ...], base: tuple[int, ...], adaptive: bool) -> float:
    """muP's learning-rate factor of one parameter (mup's ``MuAdam`` / ``MuSGD``): a
    kernel's last two axes are [fan_in, fan_out] (Flax's Dense; stacked layers lead)."""
    mults = width_multipliers(shape, base)
    if len(mults) > 2:
        raise ValueError(f"a parameter of shape {shape} has more than two dimensions that "
                         f"scale with the width (base {base})")
    if len(mults) == 2:  # matrix-like: fan_in then fan_out
        fan_in, fan_out = mults
        return 1.0 / fan_in if adaptive else fan_out / fan_in
    if len(mults) == 1:  # vector-like
        return 1.0 if adaptive else mults[0]
    return 1.0


def lr_multipliers(shapes: Any, base_shapes: Any, adaptive: bool) -> Any:
    """The learning-rate factor of every parameter (a tree like ``shapes``, of floats),
    from the net's parameter shapes and those of the same net at the base width."""
    return jax.tree.map(lambda s, b: lr_multiplier(tuple(s.shape), tuple(b.shape), adaptive),
                        shapes, base_shapes)



def at_base_width(cfg: Any) -> Any:
    """A copy of a config with every hidden width at ``param.base_width``: the net whose
    parameter shapes muP's multipliers are relative to (mup's base model)."""
    base = copy.deepcopy(cfg)
    width = int(cfg.param.base_width)
    base.width = width
    if base.widths is not None:
        base.widths = [width] * len(base.widths)
    return base


def param_shapes(net: Any, x: Array) -> Any:
    """The shapes of a linen module's parameters on inputs like ``x`` (nothing is
    computed or allocated)."""
    key = jax.random.key(0)
    variables = jax.eval_shape(lambda: net.lazy_init(
        {"params": key, "noise": key}, jax.ShapeDtypeStruct(x.shape, x.dtype)))
    return variables["params"]
