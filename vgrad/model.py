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

**Deep nets compile in constant time.** From ``SCAN_FROM`` identical hidden layers on
(same width, the common case ``depth=D width=W``), layers 1 ... depth-1 are one
``nn.scan`` over stacked parameters (the submodule ``hidden``): the program holds one
layer whatever the depth, so compile time and program size stay flat while every
per-layer statistic comes out of the scan as a stacked array (``vgrad.layers``). A
shallower net keeps its layers unrolled, which XLA fuses a little better.
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
from vgrad.layers import Layout, Segment

#: Where the activation's maximum slope is searched (includes 0, where sigmoid peaks).
SLOPE_GRID = np.linspace(-10.0, 10.0, 2001, dtype=np.float32)
#: Identical hidden layers (after the first) from which they run as one scan.
SCAN_FROM = 8


def layer_names(depth: int) -> list[str]:
    """Names of the Dense layers, input side first, output layer last."""
    return [f"dense_{i}" for i in range(depth + 1)]


def scanned_layers(widths: Sequence[int]) -> int:
    """How many hidden layers (from layer 1 on) run as one scan: all of layers 1 ...
    depth-1 when they share one width and number at least ``SCAN_FROM``, else none."""
    rest = list(widths[1:])
    return len(rest) if len(rest) >= SCAN_FROM and len(set(rest)) == 1 else 0


def layout(widths: Sequence[int]) -> Layout:
    """Where the layers of an MLP with hidden ``widths`` live in its variables."""
    depth, stack = len(widths), scanned_layers(widths)

    def single(i: int, hidden: bool = True) -> Segment:
        return Segment((f"dense_{i}",), (f"dense_{i}",), False, (f"delta_{i}",),
                       (f"bn_{i}",) if hidden else None, (f"act_{i}",) if hidden else None,
                       hidden)

    if not stack:
        segments = [single(i) for i in range(depth)]
    else:
        segments = [single(0), Segment(
            tuple(f"dense_{i}" for i in range(1, depth)), ("hidden", "dense"), True,
            ("hidden", "delta"), ("hidden", "bn"), ("hidden", "act"))]
    return Layout((*segments, single(depth, hidden=False)))


def _slopes(act: nn.Module, z: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """f(z) and the elementwise slope f'(z) (a forward-mode derivative through ``act``)."""
    return nn.jvp(lambda mdl, u: mdl(u, train), act, (z,), (jnp.ones_like(z),), {})


class _Parts(nn.Module):
    """What every hidden layer is made of (shared by the unrolled and scanned forms)."""

    act: Callable[..., nn.Module]
    kernel_init: Callable[..., jax.Array]
    bias_init: Callable[..., jax.Array]
    pieces: int = 1
    bn: str = "none"
    bn_momentum: float = 0.99
    bn_eps: float = 1e-3
    dtype: Any = jnp.float32  # of the parameters and the computation

    def hidden_layer(self, x: jax.Array, width: int, names: dict[str, str], train: bool,
                     capture: bool) -> jax.Array:
        """Dense -> [BatchNorm] -> activation -> [BatchNorm], delta and captures; the
        submodules and collections are named by ``names`` (dense, bn, act, delta, and
        the captures activation, slope, slope_max)."""
        dense = nn.Dense(width * self.pieces, kernel_init=self.kernel_init,
                         bias_init=self.bias_init, dtype=self.dtype, param_dtype=self.dtype,
                         name=names["dense"])
        z = self.perturb(names["delta"], dense(x))
        if self.bn == "pre":
            z = self._norm(names["bn"], train)(z)
        act = self.act(name=names["act"])
        if capture:
            x, slope = _slopes(act, z, train)
            grid = jnp.broadcast_to(jnp.asarray(SLOPE_GRID, z.dtype)[:, None],
                                    (SLOPE_GRID.size, z.shape[-1]))
            _, grid_slope = _slopes(act, grid, False)
            self.sow("intermediates", names["activation"], x)
            self.sow("intermediates", names["slope"], slope)
            self.sow("intermediates", names["slope_max"], jnp.abs(grid_slope).max(axis=0))
        else:
            x = act(z, train)
        if self.bn == "post":
            x = self._norm(names["bn"], train)(x)
        return x

    def _norm(self, name: str, train: bool) -> nn.BatchNorm:
        return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                            epsilon=self.bn_eps, dtype=self.dtype, param_dtype=self.dtype,
                            name=name)


_IN_STACK = {k: k for k in ("dense", "bn", "act", "delta", "activation", "slope", "slope_max")}


class _StackLayer(_Parts):
    """One layer of the scanned stack, in ``nn.scan``'s (carry, x) -> (carry, y) form."""

    width: int = 1
    train: bool = False
    capture: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        return self.hidden_layer(x, self.width, _IN_STACK, self.train, self.capture), None


class MLP(_Parts):
    """Fully connected network: ``widths`` hidden layers, then ``out_dim`` logits."""

    widths: Sequence[int] = ()
    out_dim: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, capture: bool = False) -> jax.Array:
        stack = scanned_layers(self.widths)
        unrolled = range(len(self.widths) - stack)
        for i in unrolled:
            names = {k: f"{k}_{i}" for k in _IN_STACK}
            x = self.hidden_layer(x, self.widths[i], names, train, capture)
        if stack:
            parts = {k: getattr(self, k) for k in (
                "act", "kernel_init", "bias_init", "pieces", "bn", "bn_momentum", "bn_eps",
                "dtype")}
            layers = nn.scan(
                _StackLayer,
                variable_axes={c: 0 for c in ("params", "batch_stats", "perturbations",
                                              "intermediates")},
                split_rngs={"params": True, "noise": True},
                length=stack)
            x, _ = layers(**parts, width=self.widths[-1], train=train, capture=capture,
                          name="hidden")(x, None)
        depth = len(self.widths)
        out = nn.Dense(self.out_dim, kernel_init=self.kernel_init, bias_init=self.bias_init,
                       dtype=self.dtype, param_dtype=self.dtype, name=f"dense_{depth}")
        return self.perturb(f"delta_{depth}", out(x))


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
