"""Gradient clipping and optimizers by name: the ``clip`` and ``optim`` axes.

Both are optax's own transforms. They are kept as two transforms, applied one after
the other, rather than one ``optax.chain`` so that the training step can report the
gradient between them: the global norm after clipping and whether clipping fired.
The order is

    loss gradient -> clip -> (+ L2 term) -> optimizer -> update

so the clipping contracts hold exactly on the loss gradient (value clipping keeps every
entry in [-max, max] like Keras ``clipvalue``; global-norm clipping leaves a norm of
min(norm, max), Pascanu et al. 2013).

``optim.l2`` is the coupled L2 regularisation of Nielsen's network2 (chapter 5):
C = C0 + lambda / (2 n) * sum(w^2) adds (lambda / n) * w to every kernel's gradient,
n being the training-set size; biases are not regularised. The recorded gradients
are those of C0 alone, so a vanishing data gradient is not hidden by the decay term.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

# --- clipping schemas ---------------------------------------------------------------------


@dataclass
class NoClip:
    name: str = "none"


@dataclass
class ValueClip:
    name: str = "value"
    max: float = 1.0  # every gradient entry clipped to [-max, max] (Keras clipvalue)


@dataclass
class GlobalNormClip:
    name: str = "global_norm"
    max: float = 1.0  # gradient rescaled to global norm <= max (Keras global_clipnorm)


@dataclass
class AGCClip:
    name: str = "agc"
    clipping: float = 0.01  # max ratio of unit-wise gradient norm to weight norm
    eps: float = 0.001  # weights with smaller norm are treated as having norm eps


@dataclass(frozen=True)
class Clip:
    schema: type
    make: Callable[[Any], optax.GradientTransformation]


CLIPS: dict[str, Clip] = {
    "none": Clip(NoClip, lambda c: optax.identity()),
    "value": Clip(ValueClip, lambda c: optax.clip(c.max)),
    "global_norm": Clip(GlobalNormClip, lambda c: optax.clip_by_global_norm(c.max)),
    # Adaptive gradient clipping, Brock et al. 2021 (NFNets).
    "agc": Clip(AGCClip, lambda c: optax.adaptive_grad_clip(c.clipping, c.eps)),
}

# --- optimizer schemas ----------------------------------------------------------------------


@dataclass
class SGDOptim:
    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    nesterov: bool = False
    l2: float = 0.0  # Nielsen's lambda: adds (l2 / n_train) * w to kernel gradients
    schedule: str = "constant"  # constant | cosine (decays to 0 over the whole run)
    warmup: int = 0  # steps of linear warmup from 0 to lr before the schedule


@dataclass
class RMSpropOptim:
    """Defaults are Keras's RMSprop: epsilon inside the square root, as optax does."""

    name: str = "rmsprop"
    lr: float = 0.001
    rho: float = 0.9  # Keras's name; optax calls it decay
    eps: float = 1e-7
    momentum: float = 0.0
    centered: bool = False
    l2: float = 0.0
    schedule: str = "constant"
    warmup: int = 0


@dataclass
class AdamOptim:
    """Defaults are Keras's Adam (eps 1e-7); optax's own default eps is 1e-8."""

    name: str = "adam"
    lr: float = 0.001
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-7
    l2: float = 0.0
    schedule: str = "constant"
    warmup: int = 0


@dataclass
class AdamWOptim(AdamOptim):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019), kernels only."""

    name: str = "adamw"
    weight_decay: float = 1e-4


def kernel_mask(params: Any) -> Any:
    """True on Dense kernels, False on biases and normalisation / activation parameters."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


@dataclass(frozen=True)
class Optim:
    """A registry entry: config schema, and the optimizer from its node, a learning rate
    and a per-parameter factor applied to its normalised direction (muP's learning-rate
    multipliers, ``vgrad.parametrization``; None: none); whether it normalises the
    gradient entrywise (``adaptive``: what muP's rates depend on, mup's MuAdam vs
    MuSGD). A non-adaptive optimizer is linear in the gradient: its factors are applied
    to the gradient before it (``make``)."""

    schema: type
    make: Callable[[Any, optax.ScalarOrSchedule, Any], optax.GradientTransformation]
    adaptive: bool = False


def is_zero(value: Any) -> bool:
    """True for a constant zero. A knob fed to a grouped program (``vgrad.group``) is a
    traced value, never a constant zero: the group's structure says it is not zero."""
    return isinstance(value, (int, float)) and value == 0


def optional(value: Any) -> Any:
    """None for a constant zero (optax then leaves the term out), else the value."""
    return None if is_zero(value) else value


def then(tx: optax.GradientTransformation, factors: Any) -> optax.GradientTransformation:
    """``tx``, its updates multiplied by per-parameter ``factors`` (None: ``tx``)."""
    return tx if factors is None else optax.chain(tx, factors)


def _adamw(c: Any, lr: optax.ScalarOrSchedule, factors: Any) -> optax.GradientTransformation:
    """optax's ``adamw``, with the per-parameter factors on Adam's direction only: the
    decoupled decay lr * wd * w is not rescaled (as mup's MuAdamW leaves it)."""
    if factors is None:
        return optax.adamw(lr, c.b1, c.b2, c.eps, weight_decay=c.weight_decay,
                           mask=kernel_mask)
    return optax.chain(optax.scale_by_adam(c.b1, c.b2, c.eps), factors,
                       optax.add_decayed_weights(c.weight_decay, kernel_mask),
                       optax.scale_by_learning_rate(lr))


OPTIMIZERS: dict[str, Optim] = {
    "sgd": Optim(SGDOptim,
                 lambda c, lr, f: optax.sgd(lr, optional(c.momentum), c.nesterov)),
    "rmsprop": Optim(
        RMSpropOptim,
        lambda c, lr, f: then(optax.rmsprop(lr, decay=c.rho, eps=c.eps,
                                            momentum=optional(c.momentum),
                                            centered=c.centered), f),
        adaptive=True,
    ),
    "adam": Optim(AdamOptim, lambda c, lr, f: then(optax.adam(lr, c.b1, c.b2, c.eps), f),
                  adaptive=True),
    "adamw": Optim(AdamWOptim, _adamw, adaptive=True),
}

SCHEDULES: dict[str, Callable[[float, int], optax.ScalarOrSchedule]] = {
    "constant": lambda lr, steps: lr,
    "cosine": lambda lr, steps: optax.cosine_decay_schedule(lr, decay_steps=max(steps, 1)),
}


class Transforms(NamedTuple):
    """The two halves of the update: clipping, then (L2 +) optimizer."""

    clip: optax.GradientTransformation
    update: optax.GradientTransformation


def learning_rate(optim: Any, total_steps: int) -> optax.ScalarOrSchedule:
    """The ``optim`` node's learning rate: ``optim.warmup`` steps rising linearly from 0
    to ``optim.lr`` (the warmup a post-LN Transformer needs: Xiong et al. 2020; Liu et
    al. 2020), then ``optim.schedule`` over the remaining steps."""
    warmup = int(getattr(optim, "warmup", 0))
    after = SCHEDULES[optim.schedule](optim.lr, total_steps - warmup)
    if warmup == 0:
        return after
    return optax.join_schedules(
        [optax.linear_schedule(0.0, optim.lr, warmup),
         after if callable(after) else optax.constant_schedule(after)], [warmup])


def make(clip: Any, optim: Any, n_train: int, total_steps: int,
         lr_factors: Any = None) -> Transforms:
    """Build the clipping and optimizer transforms from the ``clip`` and ``optim`` nodes;
    ``lr_factors``: a learning-rate factor per parameter (a tree of floats like the
    parameters, ``vgrad.parametrization.lr_multipliers``), or None.

    The factors multiply the loss gradient's contribution to the update, never the L2
    term: a non-adaptive optimizer's gradient before the L2 term is added (with
    ``optim.l2 / n`` unchanged, mup's MuSGD dividing torch's weight decay by the factor
    it multiplies the rate by); an adaptive one's normalised direction (with
    ``optim.l2 = 0``: ``vgrad.config`` refuses the combination)."""
    lr = learning_rate(optim, total_steps)
    entry = OPTIMIZERS[optim.name]
    factors = None if lr_factors is None else scale_by_tree(lr_factors)
    update = entry.make(optim, lr, factors if entry.adaptive else None)
    if not is_zero(optim.l2):
        update = optax.chain(optax.add_decayed_weights(optim.l2 / n_train, kernel_mask), update)
    if factors is not None and not entry.adaptive:
        update = optax.chain(factors, update)
    return Transforms(CLIPS[clip.name].make(clip), update)


def scale_by_tree(factors: Any) -> optax.GradientTransformation:
    """Every leaf of the updates times its factor (a per-parameter learning rate, as
    torch's parameter groups give one); factors of 1 cost nothing."""
    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        return jax.tree.map(lambda u, f: u if f == 1.0 else u * jnp.asarray(f, u.dtype),
                            updates, factors), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
