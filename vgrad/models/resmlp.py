"""The residual MLP (``model=resmlp``): skip connections, the fix for vanishing gradients
that deep learning adopted.

An input projection h_0 = W_p x, then ``depth`` blocks of width ``width``

    h_k = h_{k-1} + alpha * F(h_{k-1}),   F = [norm] -> act -> Dense  (x block_dense)

in the pre-activation order of He, Zhang, Ren & Sun 2016 ("Identity mappings in deep
residual networks"), then [norm] -> act -> Dense to the logits. ``skip=false`` drops the
identity path (h_k = alpha * F(h_{k-1})): with one Dense per block, no norm and alpha = 1
that is exactly an MLP of ``depth + 1`` hidden layers, the plain baseline.

Branch scale alpha (``model.alpha``):

- ``one``; ``inv_sqrt_depth``: 1/sqrt(depth), which keeps the stream's variance O(1) at
  any depth;
- ``rezero``: a learned scalar per block, initialised at 0 (Bachlechner et al. 2020,
  "ReZero is all you need"): every block starts as the identity;
- ``skipinit``: a learned scalar per block, initialised at ``alpha_init`` (De & Smith
  2020, "Batch normalization biases residual blocks towards the identity function");
- ``fixup``: a learned scalar multiplier initialised at 1, the last Dense of each branch
  initialised at zero and the others' initial kernels scaled by depth^(-1/(2m-2)) for m
  Dense layers per branch (Zhang, Dauphin & Ma 2019, "Fixup initialization"). Fixup's
  zero-initialised output layer and scalar biases are left out: a zero output layer
  makes every delta zero at initialisation, leaving nothing to measure there.

Norm (``model.norm``): ``none``, ``batch`` (running averages in ``batch_stats``, the
top-level ``bn_momentum`` and ``bn_eps``) or ``layer`` (LayerNorm, Ba et al. 2016).

Instrumented layers (the declaration in :func:`layout`): ``proj``, ``block_1`` ...
``block_<depth>``, ``out``. A block's delta is taken on the residual stream after it,
delta_k = dL/dh_k, the gradient every earlier block receives through the skip path (its
Dense sees alpha * delta_k); its kernel statistics pool the block's Dense layers. The
``hidden`` axis holds the activation applied to each layer's output (the first
activation of the next block, or the final one). Each block also sows its branch output
alpha F(h) and skip path h, for the branch/skip variance probe (Brock et al. 2021's
signal-propagation plots). The blocks run as one ``nn.scan``: compile time does not grow
with depth.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vgrad.errors import ConfigError, one_of
from vgrad.layers import Blocks, Capture, Layout, Segment
from vgrad.models.common import Parts, activate, delta_point
from vgrad.parametrization import Scaling, scaling

Array = jax.Array

NORMS = ("none", "batch", "layer")
ALPHAS = ("one", "inv_sqrt_depth", "rezero", "skipinit", "fixup")


@dataclass
class ResMLPModel:
    """``conf/model/resmlp.yaml``; ``depth`` counts blocks, ``width`` is their width."""

    name: str = "resmlp"
    skip: bool = True  # the identity path; false: the same net without skips
    norm: str = "none"  # none | batch | layer, before each activation
    block_dense: int = 1  # Dense layers per residual branch: 1 or 2
    alpha: str = "one"  # branch scale: one | inv_sqrt_depth | rezero | skipinit | fixup
    alpha_init: float = 0.0  # SkipInit's initial alpha


def scaled(init: Callable[..., Array], factor: float) -> Callable[..., Array]:
    """``init`` with its draws multiplied by ``factor`` (Fixup's branch rescaling)."""
    return lambda key, shape, dtype=jnp.float32: factor * init(key, shape, dtype)


class _Norm(nn.Module):
    """BatchNorm, LayerNorm or nothing, by name."""

    kind: str
    momentum: Any
    eps: Any
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if self.kind == "batch":
            return nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                                epsilon=self.eps, dtype=self.dtype,
                                param_dtype=self.dtype)(x)
        return nn.LayerNorm(dtype=self.dtype, param_dtype=self.dtype)(x)


class _Block(nn.Module):
    """One residual block, in ``nn.scan``'s (carry, x) -> (carry, y) form."""

    parts: Parts
    cfg: Any  # the model node (a ResMLPModel or its config)
    depth: int
    width: int
    train: bool = False
    capture: bool = False
    scaling: Scaling = Scaling()

    def _alpha(self) -> Array | float:
        kind, dtype = self.cfg.alpha, self.parts.dtype
        if kind == "one":
            return 1.0
        if kind == "inv_sqrt_depth":
            return 1.0 / math.sqrt(self.depth)
        start = {"rezero": 0.0, "skipinit": self.cfg.alpha_init, "fixup": 1.0}[kind]
        return self.param("alpha", nn.initializers.constant(start, dtype), (), dtype)

    def _kernel_init(self, j: int) -> Callable[..., Array]:
        m = self.cfg.block_dense
        if self.cfg.alpha != "fixup":
            return self.parts.kernel_init
        if j == m - 1:
            return nn.initializers.zeros
        return scaled(self.parts.kernel_init, self.depth ** (-1.0 / (2 * m - 2)))

    @nn.compact
    def __call__(self, h: Array, _: Any) -> tuple[Array, None]:
        p, u = self.parts, h
        for j in range(self.cfg.block_dense):
            if self.cfg.norm != "none":
                u = _Norm(self.cfg.norm, p.bn_momentum, p.bn_eps, p.dtype,
                          name=f"norm_{j}")(u, self.train)
            # The first activation is the one applied to the previous layer's output.
            u = activate(self, p.act(name=f"act_{j}"), u, self.train,
                         self.capture and j == 0)
            dense = nn.Dense(self.width,
                             kernel_init=self.scaling.kernel_init(self._kernel_init(j), "hidden"),
                             bias_init=p.bias_init, dtype=p.dtype, param_dtype=p.dtype,
                             name=f"dense_{j}")
            u = dense(self.scaling.dense_input(u, "hidden"))
        branch = self._alpha() * u
        skip = h if self.cfg.skip else jnp.zeros_like(h)
        if self.capture:
            self.sow("intermediates", "branch", branch)
            self.sow("intermediates", "skip", skip)
        return delta_point(self, "delta", skip + branch, self.capture), None


class ResMLP(nn.Module):
    """Input projection, ``depth`` residual blocks (one scan), final norm, act, Dense."""

    parts: Parts
    cfg: Any
    depth: int
    width: int
    out_dim: int = 1
    scaling: Scaling = Scaling()  # the ``param`` axis (``vgrad.parametrization``)

    @nn.compact
    def __call__(self, x: Array, train: bool = False, capture: bool = False) -> Array:
        p, s = self.parts, self.scaling
        h = nn.Dense(self.width, kernel_init=s.kernel_init(p.kernel_init, "input"),
                     bias_init=p.bias_init, dtype=p.dtype, param_dtype=p.dtype,
                     name="proj")(s.dense_input(x, "input"))
        h = delta_point(self, "delta_proj", h, capture)
        blocks = nn.scan(
            _Block,
            variable_axes={c: 0 for c in ("params", "batch_stats", "perturbations",
                                          "intermediates")},
            split_rngs={"params": True, "noise": True},
            length=self.depth)
        h, _ = blocks(p, self.cfg, self.depth, self.width, train, capture, s,
                      name="blocks")(h, None)
        if self.cfg.norm != "none":
            h = _Norm(self.cfg.norm, p.bn_momentum, p.bn_eps, p.dtype, name="out_norm")(h, train)
        h = activate(self, p.act(name="out_act"), h, train, capture, "_out")
        out = nn.Dense(self.out_dim, kernel_init=s.kernel_init(p.kernel_init, "output"),
                       bias_init=p.bias_init, dtype=p.dtype, param_dtype=p.dtype,
                       name="out")(s.dense_input(h, "output"))
        return delta_point(self, "delta_out", out, capture)


def _node(cfg: Any) -> ResMLPModel:
    """The model node as a plain, hashable dataclass (a Flax module field)."""
    m = cfg.model
    return ResMLPModel(skip=bool(m.skip), norm=str(m.norm), block_dense=int(m.block_dense),
                       alpha=str(m.alpha), alpha_init=float(m.alpha_init))


def build(cfg: Any, parts: Parts, out_dim: int) -> ResMLP:
    """The residual MLP described by a validated config, from a member's ``parts``."""
    return ResMLP(parts, _node(cfg), cfg.depth, cfg.width, out_dim, scaling(cfg))


def block_names(depth: int) -> tuple[str, ...]:
    return tuple(f"block_{k}" for k in range(1, depth + 1))


def layout(cfg: Any) -> Layout:
    """``proj``, the blocks (one stacked segment), ``out``."""
    blocks = block_names(cfg.depth)
    dense = tuple(("blocks", f"dense_{j}") for j in range(cfg.model.block_dense))
    return Layout(
        (Segment(("proj",), (("proj",),), ("delta_proj",), False, ((("proj",), ("proj",)),)),
         Segment(blocks, dense, ("blocks", "delta"), True, ((blocks, ("blocks",)),)),
         Segment(("out",), (("out",),), ("delta_out",), False,
                 tuple(((n,), (n,)) for n in ("out", "out_norm", "out_act")))),
        (Capture(("blocks",), "", True), Capture((), "_out", False)),
        Blocks(("blocks",), cfg.depth))


def widths(cfg: Any) -> list[int]:
    """Widths of the Dense outputs before the logits, input side first."""
    return [cfg.width] * (1 + cfg.depth * cfg.model.block_dense)


def validate(cfg: Any) -> None:
    """A residual net's keys, and the MLP keys it does not take."""
    m = cfg.model
    if cfg.depth < 1:
        raise ConfigError("depth", cfg.depth, "a number >= 1 (residual blocks)")
    if cfg.widths is not None:
        raise ConfigError("widths", list(cfg.widths),
                          "null with model=resmlp (its blocks share one width: set width)")
    bn = getattr(cfg.bn, "value", cfg.bn)
    if bn != "none":
        raise ConfigError("bn", bn, "none with model=resmlp (its norm is model.norm=batch)")
    if m.block_dense not in (1, 2):
        raise ConfigError("model.block_dense", m.block_dense, "1 or 2")
    one_of("model.norm", m.norm, NORMS)
    one_of("model.alpha", m.alpha, ALPHAS)
    if not math.isfinite(m.alpha_init):
        raise ConfigError("model.alpha_init", m.alpha_init, "a finite number")
    if cfg.act.name == "maxout":
        raise ConfigError("act", "maxout", "an activation with one output per unit with "
                          "model=resmlp (maxout would change the stream's width)")
