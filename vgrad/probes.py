"""Pure reductions of a step's measurements into small per-layer arrays.

Two registries, both ``name -> function``; each function returns a dict of arrays and
its keys become arrays of ``metrics.npz`` (DESIGN.md section 4). A new statistic is one
function plus one registry entry.

- ``STEP_PROBES`` reduce a :class:`~vgrad.step.StepOut` at every recorded step. Per-layer
  arrays have one entry per Dense layer (``dense_0`` ... output layer), shape [L].
- ``EPOCH_PROBES`` reduce an :class:`EpochView` (the state at an epoch boundary, plus
  measurements on the fixed probe batch and full-set evaluations) at initialisation
  and after every epoch.

Statistics use the kernel (weight matrix) of each Dense layer unless the name says bias.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from vgrad.step import StepOut

Array = jax.Array

#: Fixed bin edges of log10|value| histograms: identical for every run and layer, so a
#: sweep compares bin for bin. 0.25 decade bins from 1e-12 to 1e4; smaller values
#: (exact zeros included) count in the first bin, larger (inf included) in the last.
HIST_EDGES = jnp.linspace(-12.0, 4.0, 65)


def _stack(values: list[Array]) -> Array:
    return jnp.stack(values).astype(jnp.float32)


def _kernels(tree: Any, names: list[str]) -> list[Array]:
    return [tree[n]["kernel"] for n in names]


def kernel_grad_stats(out: StepOut, names: list[str]) -> dict[str, Array]:
    """Mean, std, L2 norm, mean |g| and max |g| of each kernel gradient dL/dW_l."""
    g = _kernels(out.grads, names)
    return {
        "grad_mean": _stack([x.mean() for x in g]),
        "grad_std": _stack([x.std() for x in g]),
        "grad_norm": _stack([jnp.linalg.norm(x) for x in g]),
        "grad_absmean": _stack([jnp.abs(x).mean() for x in g]),
        "grad_maxabs": _stack([jnp.abs(x).max() for x in g]),
    }


def bias_grad_norm(out: StepOut, names: list[str]) -> dict[str, Array]:
    """||dL/db_l||: Nielsen's "speed of learning" of layer l (seed 004)."""
    return {"bias_grad_norm": _stack([jnp.linalg.norm(out.grads[n]["bias"]) for n in names])}


def global_norms(out: StepOut, names: list[str]) -> dict[str, Array]:
    """Loss and global gradient norm over all parameters (before clipping)."""
    return {"loss": out.loss.astype(jnp.float32),
            "grad_global_norm": optax.tree.norm(out.grads).astype(jnp.float32)}


STEP_PROBES: dict[str, Callable[[StepOut, list[str]], dict[str, Array]]] = {
    "global_norms": global_norms,
    "kernel_grad_stats": kernel_grad_stats,
    "bias_grad_norm": bias_grad_norm,
}


def _collect(registry: dict[str, Callable[..., dict[str, Array]]], view: Any,
             names: list[str]) -> dict[str, Array]:
    stats: dict[str, Array] = {}
    for probe in registry.values():
        stats.update(probe(view, names))
    return stats


def step_stats(out: StepOut, names: list[str]) -> dict[str, Array]:
    """Every registered per-step statistic of one step."""
    return _collect(STEP_PROBES, out, names)


# --- epoch-boundary probes ---------------------------------------------------------------


class EpochView(NamedTuple):
    """What the epoch probes see at an epoch boundary."""

    params: Any
    train_loss: Array  # mean loss on the whole training set
    train_acc: Array
    test_loss: Array  # NaN when there is no test set
    test_acc: Array


def weight_stats(view: EpochView, names: list[str]) -> dict[str, Array]:
    """Mean and std of each kernel (seed 000's WeightCapture figure)."""
    w = _kernels(view.params, names)
    return {"weight_mean": _stack([x.mean() for x in w]),
            "weight_std": _stack([x.std() for x in w])}


def evaluation(view: EpochView, names: list[str]) -> dict[str, Array]:
    """Loss and accuracy on the full training and test sets."""
    return {"train_loss": view.train_loss, "train_acc": view.train_acc,
            "test_loss": view.test_loss, "test_acc": view.test_acc}


EPOCH_PROBES: dict[str, Callable[[EpochView, list[str]], dict[str, Array]]] = {
    "evaluation": evaluation,
    "weight_stats": weight_stats,
}


def epoch_stats(view: EpochView, names: list[str]) -> dict[str, Array]:
    """Every registered per-epoch statistic at one epoch boundary."""
    return {k: jnp.asarray(v, jnp.float32) for k, v in _collect(EPOCH_PROBES, view, names).items()}
