"""The MLP (``model=mlp``): Dense layers with stable names and injected parts.

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
pre-activation z (under its delta's name: the forward signal), its activation a = f(z),
the slope f'(z) and the activation's largest slope over z in [-10, 10] (per unit), from
which the probes measure the signal's length and correlation and dead and saturated
units.

**Deep nets compile in constant time.** From ``SCAN_FROM`` identical hidden layers on
(same width, the common case ``depth=D width=W``), layers 1 ... depth-1 are one
``nn.scan`` over stacked parameters (the submodule ``hidden``): the program holds one
layer whatever the depth, so compile time and program size stay flat while every
per-layer statistic comes out of the scan as a stacked array (``vgrad.layers``). A
shallower net keeps its layers unrolled, which XLA fuses a little better.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vgrad.errors import ConfigError
from vgrad.layers import Capture, Layout, Segment
from vgrad.models.common import Parts, activate, delta_point
from vgrad.parametrization import Scaling, scaling

#: Identical hidden layers (after the first) from which they run as one scan.
SCAN_FROM = 8


@dataclass
class MLPModel:
    """``conf/model/mlp.yaml``: the shape comes from the top-level ``depth``, ``width``
    (or ``widths``) and ``bn`` keys, as before models were an axis."""

    name: str = "mlp"


def hidden_widths(cfg: Any) -> list[int]:
    """Widths of the hidden layers, input side first."""
    return list(cfg.widths) if cfg.widths is not None else [cfg.width] * cfg.depth


def layer_names(depth: int) -> list[str]:
    """Names of the Dense layers, input side first, output layer last."""
    return [f"dense_{i}" for i in range(depth + 1)]


def scanned_layers(widths: Sequence[int]) -> int:
    """How many hidden layers (from layer 1 on) run as one scan: all of layers 1 ...
    depth-1 when they share one width and number at least ``SCAN_FROM``, else none."""
    rest = list(widths[1:])
    return len(rest) if len(rest) >= SCAN_FROM and len(set(rest)) == 1 else 0


def layout_of(widths: Sequence[int]) -> Layout:
    """Where the layers of an MLP with hidden ``widths`` live in its variables."""
    depth, stack = len(widths), scanned_layers(widths)

    def single(i: int, hidden: bool = True) -> Segment:
        kinds = ("dense", "bn", "act") if hidden else ("dense",)
        return Segment((f"dense_{i}",), ((f"dense_{i}",),), (f"delta_{i}",), False,
                       tuple(((f"{k}_{i}",), (f"{k}_{i}",)) for k in kinds))

    if not stack:
        segments = [single(i) for i in range(depth)]
        captures = [Capture((), f"_{i}", False) for i in range(depth)]
    else:
        names = tuple(f"dense_{i}" for i in range(1, depth))
        segments = [single(0), Segment(
            names, (("hidden", "dense"),), ("hidden", "delta"), True,
            tuple((tuple(n.replace("dense", k) for n in names), ("hidden", k))
                  for k in ("dense", "bn", "act")))]
        captures = [Capture((), "_0", False), Capture(("hidden",), "", True)]
    return Layout((*segments, single(depth, hidden=False)), tuple(captures))


def layout(cfg: Any) -> Layout:
    return layout_of(hidden_widths(cfg))


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
    scaling: Scaling = Scaling()  # the ``param`` axis: multipliers and initial scales

    def hidden_layer(self, x: jax.Array, width: int, suffix: str, train: bool,
                     capture: bool) -> jax.Array:
        """Dense -> [BatchNorm] -> activation -> [BatchNorm], delta and captures; the
        submodules and collections are named ``dense<suffix>``, ``bn<suffix>``,
        ``act<suffix>``, ``delta<suffix>`` and the captures ``activation<suffix>``, ..."""
        role = "input" if suffix == "_0" else "hidden"
        dense = nn.Dense(width * self.pieces,
                         kernel_init=self.scaling.kernel_init(self.kernel_init, role),
                         bias_init=self.bias_init, dtype=self.dtype, param_dtype=self.dtype,
                         name=f"dense{suffix}")
        z = delta_point(self, f"delta{suffix}", dense(self.scaling.dense_input(x, role)),
                        capture)
        if self.bn == "pre":
            z = self._norm(f"bn{suffix}", train)(z)
        x = activate(self, self.act(name=f"act{suffix}"), z, train, capture, suffix)
        if self.bn == "post":
            x = self._norm(f"bn{suffix}", train)(x)
        return x

    def _norm(self, name: str, train: bool) -> nn.BatchNorm:
        return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                            epsilon=self.bn_eps, dtype=self.dtype, param_dtype=self.dtype,
                            name=name)


class _StackLayer(_Parts):
    """One layer of the scanned stack, in ``nn.scan``'s (carry, x) -> (carry, y) form."""

    width: int = 1
    train: bool = False
    capture: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        return self.hidden_layer(x, self.width, "", self.train, self.capture), None


class MLP(_Parts):
    """Fully connected network: ``widths`` hidden layers, then ``out_dim`` logits."""

    widths: Sequence[int] = ()
    out_dim: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, capture: bool = False) -> jax.Array:
        stack = scanned_layers(self.widths)
        unrolled = range(len(self.widths) - stack)
        for i in unrolled:
            x = self.hidden_layer(x, self.widths[i], f"_{i}", train, capture)
        if stack:
            parts = {k: getattr(self, k) for k in (
                "act", "kernel_init", "bias_init", "pieces", "bn", "bn_momentum", "bn_eps",
                "dtype", "scaling")}
            layers = nn.scan(
                _StackLayer,
                variable_axes={c: 0 for c in ("params", "batch_stats", "perturbations",
                                              "intermediates")},
                split_rngs={"params": True, "noise": True},
                length=stack)
            x, _ = layers(**parts, width=self.widths[-1], train=train, capture=capture,
                          name="hidden")(x, None)
        depth = len(self.widths)
        out = nn.Dense(self.out_dim, kernel_init=self.scaling.kernel_init(self.kernel_init,
                                                                          "output"),
                       bias_init=self.bias_init, dtype=self.dtype, param_dtype=self.dtype,
                       name=f"dense_{depth}")
        return delta_point(self, f"delta_{depth}", out(self.scaling.dense_input(x, "output")),
                           capture)


def build(cfg: Any, parts: Parts, out_dim: int) -> MLP:
    """The MLP described by a validated config, from a member's ``parts`` (Dense infers
    its input size)."""
    return MLP(widths=tuple(hidden_widths(cfg)), out_dim=out_dim, act=parts.act,
               kernel_init=parts.kernel_init, bias_init=parts.bias_init, pieces=parts.pieces,
               bn=cfg.bn.value if hasattr(cfg.bn, "value") else cfg.bn,
               bn_momentum=parts.bn_momentum, bn_eps=parts.bn_eps, dtype=parts.dtype,
               scaling=scaling(cfg))


def validate(cfg: Any) -> None:
    """The MLP's keys: at least one hidden layer; ``widths``, if given, one per layer."""
    if cfg.depth < 1:
        raise ConfigError("depth", cfg.depth, "a number >= 1")
    if cfg.widths is not None:
        if len(cfg.widths) != cfg.depth:
            raise ConfigError("widths", list(cfg.widths),
                              f"{cfg.depth} entries to match depth={cfg.depth} "
                              "(or set widths=null)")
        for w in cfg.widths:
            if w < 1:
                raise ConfigError("widths", w, "a number >= 1")
