"""The MLP under study: Dense layers with stable names and injected parts.

Layers are ``dense_0`` (next to the input) ... ``dense_{depth}`` (the output layer), so
an array indexed by layer means the same thing in every run. The activation and the
initializers come from the registries; nothing here names a nonlinearity.

Each Dense output z_l is passed through ``Module.perturb("delta_l", z_l)``: the gradient
of the loss with respect to that zero perturbation is the backpropagated pre-activation
gradient delta_l = dL/dz_l (Flax's documented way to get intermediate gradients).

Batch norm (Ioffe & Szegedy 2015) goes before (``pre``) or after (``post``) each hidden
activation, never on the output layer; its running averages live in ``batch_stats`` and
are used whenever ``train=False``.

With ``capture=True`` each hidden layer also sows, into ``intermediates``, its
activation a = f(z), the slope f'(z) and the activation's largest slope over
z in [-10, 10] (per unit), from which the probes measure dead and saturated units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vgrad import activations, initializers
from vgrad.config import hidden_widths

#: Where the activation's maximum slope is searched (includes 0, where sigmoid peaks).
SLOPE_GRID = np.linspace(-10.0, 10.0, 2001, dtype=np.float32)


def layer_names(depth: int) -> list[str]:
    """Names of the Dense layers, input side first, output layer last."""
    return [f"dense_{i}" for i in range(depth + 1)]


def _slopes(act: nn.Module, z: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """f(z) and the elementwise slope f'(z) (a forward-mode derivative through ``act``)."""
    return nn.jvp(lambda mdl, u: mdl(u, train), act, (z,), (jnp.ones_like(z),), {})


class MLP(nn.Module):
    """Fully connected network: ``widths`` hidden layers, then ``out_dim`` logits."""

    widths: Sequence[int]
    out_dim: int
    act: Callable[..., nn.Module]  # module factory from vgrad.activations
    kernel_init: Callable[..., jax.Array]
    bias_init: Callable[..., jax.Array]
    pieces: int = 1  # maxout: each hidden Dense computes width * pieces outputs
    bn: str = "none"  # none | pre | post
    bn_momentum: float = 0.99
    bn_eps: float = 1e-3

    def _dense(self, features: int, i: int) -> nn.Dense:
        return nn.Dense(features, kernel_init=self.kernel_init, bias_init=self.bias_init,
                        name=f"dense_{i}")

    def _norm(self, i: int, train: bool) -> nn.BatchNorm:
        return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                            epsilon=self.bn_eps, name=f"bn_{i}")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, capture: bool = False) -> jax.Array:
        for i, width in enumerate(self.widths):
            z = self.perturb(f"delta_{i}", self._dense(width * self.pieces, i)(x))
            if self.bn == "pre":
                z = self._norm(i, train)(z)
            act = self.act(name=f"act_{i}")
            if capture:
                x, slope = _slopes(act, z, train)
                grid = jnp.broadcast_to(SLOPE_GRID[:, None], (SLOPE_GRID.size, z.shape[-1]))
                _, grid_slope = _slopes(act, grid, False)
                self.sow("intermediates", f"activation_{i}", x)
                self.sow("intermediates", f"slope_{i}", slope)
                self.sow("intermediates", f"slope_max_{i}", jnp.abs(grid_slope).max(axis=0))
            else:
                x = act(z, train)
            if self.bn == "post":
                x = self._norm(i, train)(x)
        depth = len(self.widths)
        return self.perturb(f"delta_{depth}", self._dense(self.out_dim, depth)(x))


def build(cfg: Any, out_dim: int) -> MLP:
    """The MLP described by a validated config (Dense infers its input size)."""
    act, pieces = activations.build(cfg.act)
    return MLP(
        widths=tuple(hidden_widths(cfg)),
        out_dim=out_dim,
        act=act,
        kernel_init=initializers.kernel_init(cfg.init),
        bias_init=initializers.bias_init(cfg.bias_init),
        pieces=pieces,
        bn=cfg.bn.value,
        bn_momentum=cfg.bn_momentum,
        bn_eps=cfg.bn_eps,
    )
