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
    schema: type
    make: Callable[[Any, optax.ScalarOrSchedule], optax.GradientTransformation]


def is_zero(value: Any) -> bool:
    """True for a constant zero. A knob fed to a grouped program (``vgrad.group``) is a
    traced value, never a constant zero: the group's structure says it is not zero."""
    return isinstance(value, (int, float)) and value == 0


def optional(value: Any) -> Any:
    """None for a constant zero (optax then leaves the term out), else the value."""
    return None if is_zero(value) else value


OPTIMIZERS: dict[str, Optim] = {
    "sgd": Optim(SGDOptim, lambda c, lr: optax.sgd(lr, optional(c.momentum), c.nesterov)),
    "rmsprop": Optim(
        RMSpropOptim,
        lambda c, lr: optax.rmsprop(lr, decay=c.rho, eps=c.eps, momentum=optional(c.momentum),
                                    centered=c.centered),
    ),
    "adam": Optim(AdamOptim, lambda c, lr: optax.adam(lr, c.b1, c.b2, c.eps)),
    "adamw": Optim(
        AdamWOptim,
        lambda c, lr: optax.adamw(lr, c.b1, c.b2, c.eps, weight_decay=c.weight_decay,
                                  mask=kernel_mask),
    ),
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


def make(clip: Any, optim: Any, n_train: int, total_steps: int) -> Transforms:
    """Build the clipping and optimizer transforms from the ``clip`` and ``optim`` nodes."""
    lr = learning_rate(optim, total_steps)
    update = OPTIMIZERS[optim.name].make(optim, lr)
    if not is_zero(optim.l2):
        update = optax.chain(optax.add_decayed_weights(optim.l2 / n_train, kernel_mask), update)
    return Transforms(CLIPS[clip.name].make(clip), update)
