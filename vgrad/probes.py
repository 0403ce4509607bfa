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

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vgrad.step import StepOut

Array = jax.Array

#: Fixed bin edges of log10|value| histograms: identical for every run and layer, so a
#: sweep compares bin for bin. 0.25 decade bins from 1e-12 to 1e4; smaller values
#: (exact zeros included) count in the first bin, larger (inf included) in the last.
HIST_EDGES = np.linspace(-12.0, 4.0, 65, dtype=np.float32)


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


def delta_norm(out: StepOut, names: list[str]) -> dict[str, Array]:
    """Batch mean of ||delta_l^(n)||, delta_l^(n) = dl_n/dz_l the backpropagated gradient
    of example n's loss at layer l's pre-activation z_l = W_l a_{l-1} + b_l.

    The quantity signal-propagation theory predicts (Schoenholz et al. 2017): its ratio
    between consecutive layers is the depth-wise gradient gain, which the weight gradient
    ||a_{l-1} delta_l^T|| can hide when the activations a_{l-1} shrink or grow instead.
    """
    return {"delta_norm": _stack([
        jnp.linalg.norm(out.deltas[f"delta_{i}"], axis=-1).mean() for i in range(len(names))])}


def update_stats(out: StepOut, names: list[str]) -> dict[str, Array]:
    """||Delta theta_l|| and ||Delta theta_l|| / ||theta_l|| over layer l's kernel and bias.

    Delta theta is the change the optimizer applied at this step (after clipping, weight
    decay and the learning rate); the ratio is the relative speed of each layer.
    """
    update = _stack([optax.tree.norm(out.updates[n]) for n in names])
    weight = _stack([optax.tree.norm(out.params[n]) for n in names])
    return {"update_norm": update, "update_ratio": update / weight}


def clip_stats(out: StepOut, names: list[str]) -> dict[str, Array]:
    """Global gradient norm after clipping, and 1.0 where clipping changed the gradient."""
    pairs = zip(jax.tree.leaves(out.clipped), jax.tree.leaves(out.grads), strict=True)
    changed = jnp.stack([jnp.any(c != g) for c, g in pairs]).any()
    return {"grad_global_norm_clipped": optax.tree.norm(out.clipped).astype(jnp.float32),
            "clip_fired": changed.astype(jnp.float32)}


STEP_PROBES: dict[str, Callable[[StepOut, list[str]], dict[str, Array]]] = {
    "global_norms": global_norms,
    "kernel_grad_stats": kernel_grad_stats,
    "bias_grad_norm": bias_grad_norm,
    "delta_norm": delta_norm,
    "update_stats": update_stats,
    "clip_stats": clip_stats,
}


def _collect(registry: dict[str, Callable[..., dict[str, Array]]], view: Any,
             names: list[str], which: Sequence[str] | None) -> dict[str, Array]:
    stats: dict[str, Array] = {}
    for name, probe in registry.items():
        if which is None or name in which:
            stats.update(probe(view, names))
    return stats


def step_stats(out: StepOut, names: list[str], which: Sequence[str] | None = None
               ) -> dict[str, Array]:
    """The per-step statistics of one step: every registered probe, or those in ``which``."""
    return _collect(STEP_PROBES, out, names, which)


# --- epoch-boundary probes ---------------------------------------------------------------


class EpochView(NamedTuple):
    """What the epoch probes see at an epoch boundary."""

    params: Any
    train_loss: Array  # mean loss on the whole training set
    train_acc: Array
    test_loss: Array  # NaN when there is no test set
    test_acc: Array
    acts: list[Array]  # per hidden layer: a = f(z) on the probe batch, [probe, units]
    slopes: list[Array]  # per hidden layer: f'(z) on the probe batch, [probe, units]
    slope_max: list[Array]  # per hidden layer: max |f'| over z in [-10, 10], [units]
    probe_grads: Any  # gradient of the loss on the probe batch (training mode)
    sat_threshold: float


def weight_stats(view: EpochView, names: list[str]) -> dict[str, Array]:
    """Mean and std of each kernel (seed 000's WeightCapture figure)."""
    w = _kernels(view.params, names)
    return {"weight_mean": _stack([x.mean() for x in w]),
            "weight_std": _stack([x.std() for x in w])}


def evaluation(view: EpochView, names: list[str]) -> dict[str, Array]:
    """Loss and accuracy on the full training and test sets."""
    return {"train_loss": view.train_loss, "train_acc": view.train_acc,
            "test_loss": view.test_loss, "test_acc": view.test_acc}


def activation_stats(view: EpochView, names: list[str]) -> dict[str, Array]:
    """Per hidden layer, on the fixed probe batch (examples n, units j):

    - ``act_mean``, ``act_std``: mean and std of a_nj = f(z_nj) over n and j;
    - ``act_dead_frac``: fraction of units with f'(z_nj) = 0 for every example n
      (dead ReLUs: no gradient reaches their inputs whatever the example);
    - ``act_sat_frac``: fraction of pairs (n, j) in the saturated regime,
      |f'(z_nj)| < sat_threshold * max_z |f'(z)| (sigmoid and tanh tails; for ReLU the
      whole negative side, so dead units count as saturated too).
    """
    dead = [jnp.all(d == 0, axis=0).mean() for d in view.slopes]
    sat = [(jnp.abs(d) < view.sat_threshold * m).mean()
           for d, m in zip(view.slopes, view.slope_max, strict=True)]
    return {"act_mean": _stack([a.mean() for a in view.acts]),
            "act_std": _stack([a.std() for a in view.acts]),
            "act_dead_frac": _stack(dead),
            "act_sat_frac": _stack(sat)}


def log10_hists(xs: list[Array]) -> Array:
    """Counts of log10|x| in the fixed bins ``HIST_EDGES``, one row per array, [len(xs), B].

    The bins are uniform, so an entry's bin is arithmetic, and one ``bincount`` over all
    arrays (offset by row) replaces a search per array. Values below the first edge (exact
    zeros included) count in the first bin, above the last (inf included) in the last;
    NaN entries are not counted.
    """
    bins = HIST_EDGES.size - 1
    low, width = HIST_EDGES[0], HIST_EDGES[1] - HIST_EDGES[0]
    logs = jnp.concatenate([jnp.log10(jnp.abs(x.ravel())) for x in xs])
    row = jnp.concatenate([jnp.full(x.size, i, jnp.int32) for i, x in enumerate(xs)])
    col = jnp.clip(jnp.floor((logs - low) / width), 0, bins - 1)
    idx = row * bins + jnp.where(jnp.isnan(col), 0, col).astype(jnp.int32)
    counts = jnp.bincount(idx, weights=(~jnp.isnan(logs)).astype(jnp.float32),
                          length=len(xs) * bins)
    return counts.reshape(len(xs), bins)


def probe_bias_grad_norm(view: EpochView, names: list[str]) -> dict[str, Array]:
    """||dC/db_l|| of the loss averaged over the whole probe batch, [L].

    Nielsen's measurement (seed 004): with ``record.probe_size=1000`` it is the norm of
    the bias gradient averaged over 1,000 training images, at initialisation (epoch 0)
    and after every epoch, free of the noise of a 10-example mini-batch.
    """
    return {"probe_bias_grad_norm": _stack(
        [jnp.linalg.norm(view.probe_grads[n]["bias"]) for n in names])}


def histograms(view: EpochView, names: list[str]) -> dict[str, Array]:
    """Fixed-bin histograms of log10|dL/dW_l| (probe batch) and of log10|W_l|, [L, B]."""
    return {"grad_hist": log10_hists(_kernels(view.probe_grads, names)),
            "weight_hist": log10_hists(_kernels(view.params, names))}


EPOCH_PROBES: dict[str, Callable[[EpochView, list[str]], dict[str, Array]]] = {
    "evaluation": evaluation,
    "weight_stats": weight_stats,
    "activation_stats": activation_stats,
    "probe_bias_grad_norm": probe_bias_grad_norm,
    "histograms": histograms,
}


def epoch_stats(view: EpochView, names: list[str], which: Sequence[str] | None = None
                ) -> dict[str, Array]:
    """The per-epoch statistics at one epoch boundary: every registered probe, or those in
    ``which`` (the evaluation always runs: the run's summary needs it)."""
    which = None if which is None else {"evaluation", *which}
    stats = _collect(EPOCH_PROBES, view, names, which)
    return {k: jnp.asarray(v, jnp.float32) for k, v in stats.items()}
