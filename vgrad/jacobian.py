"""The Jacobian of a network's deep part, for the spectrum probe (dynamical isometry).

J(x) = d h_last / d h_0: from the first layer's delta point h_0 (the MLP's first
pre-activation, a residual net's input projection) to the last hidden layer's h_last
(the MLP's last hidden pre-activation, a residual net's last block output), for one
input x. It is the product of the layers in between (W_l diag(phi'(z_l)) for an MLP):
Pennington, Schoenholz & Ganguli 2017 ("Resurrecting the sigmoid in deep learning
through dynamical isometry") show that with orthogonal kernels at criticality a tanh
network keeps every singular value of J near 1 at any depth, Gaussian kernels do not,
and ReLU cannot.

Computed by forward-mode differentiation through ``Module.perturb``: the perturbation at
h_0 is the variable, the signal sown at h_last the output, one input at a time (no batch
norm coupling: inference mode). Costs width forward passes per input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vgrad.layers import Layout, _get

Array = jax.Array


def _set(tree: Any, path: tuple[str, ...], value: Array) -> Any:
    """``tree`` (nested dicts) with the leaf at ``path`` replaced."""
    if not path:
        return value
    return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def _layer_signal(layout: Layout, intermediates: Any, layer: int) -> Array:
    """The signal sown at layer ``layer``'s delta point, [batch, ...] (a feature map's
    [batch, height, width, channels])."""
    first = 0
    for segment, values in zip(layout.segments, layout.signals(intermediates), strict=True):
        if layer < first + len(segment):
            return values[layer - first]
        first += len(segment)
    raise IndexError(layer)


def deep_jacobian(net: nn.Module, variables: Any, layout: Layout, x: Array,
                  zeros: Callable[[Array], Any]) -> Array:
    """J(x_n) = d h_last / d h_0 for every row x_n of ``x``, [n, units_last, units_0]
    (a feature map's units are its positions times its channels)."""
    head = layout.segments[0]
    assert not head.stacked, "the first layer must be a single segment"
    last = len(layout.names) - 2  # the last hidden layer (the output layer is L - 1)

    def signal(eps: Array, x1: Array) -> Array:
        perturbations = _set(zeros(x1[None]), head.delta, eps[None])
        _, sown = net.apply({**variables, "perturbations": perturbations}, x1[None],
                            train=False, capture=True, mutable=["intermediates"])
        return _layer_signal(layout, sown["intermediates"], last)[0]

    shape = _get(zeros(x[:1]), head.delta).shape[1:]

    def flat(x1: Array) -> Array:
        jac = jax.jacfwd(signal)(jnp.zeros(shape, x.dtype), x1)  # [out..., in...]
        return jac.reshape(-1, math.prod(shape))

    return jax.vmap(flat)(x)


def singular_values(jacobians: Array) -> Array:
    """Singular values of each Jacobian, [n, min(rows, cols)], largest first."""
    return jnp.linalg.svd(jacobians, compute_uv=False)
