"""What every model is built from, and the instrumented pieces they share.

A model's *parts* (activation, initializers, batch-norm constants, dtype) are chosen per
member of a program (``vgrad.group``): the registry's ``build`` receives them ready, so
that a model never reads the ``act``, ``init`` or ``bias_init`` config nodes itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vgrad import activations, initializers

Array = jax.Array

#: Where the activation's maximum slope is searched (includes 0, where sigmoid peaks).
SLOPE_GRID = np.linspace(-10.0, 10.0, 2001, dtype=np.float32)


@dataclass(frozen=True)
class Parts:
    """A member's activation (module factory, and its outputs per unit: maxout's k),
    kernel and bias initializers, batch-norm momentum and epsilon (traced knobs), the
    dtype of parameters and computation, and the model's own knobs."""

    act: Callable[..., nn.Module]
    kernel_init: Callable[..., Array]
    bias_init: Callable[..., Array]
    pieces: int = 1
    bn_momentum: Any = 0.99
    bn_eps: Any = 1e-3
    dtype: Any = jnp.float32
    #: The model's own traced knobs (``Model.knobs``: e.g. a recurrent net's
    #: ``recurrent_scale``), by field name; None: the config's values.
    model_knobs: Any = None


def parts_from_config(cfg: Any) -> Parts:
    """The parts a validated config names (one member; tests and single builds)."""
    act, pieces = activations.build(cfg.act)
    return Parts(act, initializers.kernel_init(cfg.init), initializers.bias_init(cfg.bias_init),
                 pieces, cfg.bn_momentum, cfg.bn_eps, jnp.dtype(cfg.dtype))


def slopes(act: nn.Module, z: Array, train: bool) -> tuple[Array, Array]:
    """f(z) and the elementwise slope f'(z) (a forward-mode derivative through ``act``)."""
    return nn.jvp(lambda mdl, u: mdl(u, train), act, (z,), (jnp.ones_like(z),), {})


def slopes_and_max(act: nn.Module, z: Array, train: bool) -> tuple[Array, Array, Array]:
    """f(z), f'(z) and the activation's largest slope |f'| over z in [-10, 10], per unit
    (of the last axis of ``z``)."""
    a, slope = slopes(act, z, train)
    grid = jnp.broadcast_to(jnp.asarray(SLOPE_GRID, z.dtype)[:, None],
                            (SLOPE_GRID.size, z.shape[-1]))
    _, grid_slope = slopes(act, grid, False)
    return a, slope, jnp.abs(grid_slope).max(axis=0)


def activate(module: nn.Module, act: nn.Module, z: Array, train: bool, capture: bool,
             suffix: str = "") -> Array:
    """f(z); with ``capture``, ``module`` also sows f(z), f'(z) and the activation's
    largest slope over z in [-10, 10] (per unit) as ``activation<suffix>``,
    ``slope<suffix>``, ``slope_max<suffix>``: what the probes measure dead and saturated
    units from. Call it inside ``module``'s compact method."""
    if not capture:
        return act(z, train)
    a, slope, slope_max = slopes_and_max(act, z, train)
    module.sow("intermediates", f"activation{suffix}", a)
    module.sow("intermediates", f"slope{suffix}", slope)
    module.sow("intermediates", f"slope_max{suffix}", slope_max)
    return a


def delta_point(module: nn.Module, name: str, z: Array, capture: bool) -> Array:
    """``z`` through ``Module.perturb(name)`` (so that dL/dz is the gradient at that zero
    perturbation: Flax's documented way to get intermediate gradients), and with
    ``capture`` sown under the same name (the forward signal the probes measure)."""
    if capture:
        module.sow("intermediates", name, z)
    return module.perturb(name, z)
