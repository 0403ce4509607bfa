"""Pure reductions of a step's measurements into small per-layer arrays.

Two registries, both ``name -> function``; each function returns a dict of arrays and
its keys become arrays of ``metrics.npz`` (DESIGN.md section 4). A new statistic is one
function plus one registry entry.

- ``STEP_PROBES`` reduce a :class:`~vgrad.step.StepOut` at every recorded step. Per-layer
  arrays have one entry per Dense layer (``dense_0`` ... output layer), shape [L].
- ``EPOCH_PROBES`` reduce an :class:`EpochView` (the state at an epoch boundary, plus
  measurements on the fixed probe batch and full-set evaluations) at initialisation
  and after every epoch.

Layers are read through the model's :class:`~vgrad.layers.Layout`, one segment at a time
with a leading layer axis, so that a statistic costs one reduction per segment (not per
layer) and a scanned stack of 1,000 layers is measured as cheaply as one.

Statistics use the kernel (weight matrix) of each Dense layer unless the name says bias.
**Norms, means and standard deviations never overflow** while the values are finite:
each is computed on the values divided by their largest magnitude and scaled back, so a
gradient with entries near 1e30, whose sum of squares exceeds float32's 3.4e38, still
has its true (finite) norm: the last steps before an explosion are what users study.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vgrad.layers import Layout
from vgrad.step import StepOut

Array = jax.Array

#: Fixed bin edges of log10|value| histograms: identical for every run and layer, so a
#: sweep compares bin for bin. 0.25 decade bins from 1e-12 to 1e4; smaller values
#: (exact zeros included) count in the first bin, larger (inf included) in the last.
HIST_EDGES = np.linspace(-12.0, 4.0, 65, dtype=np.float32)

# --- overflow-safe reductions over every axis but the first (one row per layer) ----------


def _rows(x: Array) -> Array:
    return x.reshape(x.shape[0], -1)


def _scale(x: Array) -> Array:
    """Per row, the largest |x| where it is finite and non-zero, else 1: [n, 1]."""
    m = jnp.max(jnp.abs(x), axis=1, keepdims=True)
    return jnp.where((m > 0) & jnp.isfinite(m), m, 1.0)


def row_norm(x: Array) -> Array:
    """L2 norm of each row of ``x`` [n, ...] -> [n], without overflow."""
    x = _rows(x)
    s = _scale(x)
    return jnp.sqrt(jnp.sum((x / s) ** 2, axis=1)) * s[:, 0]


def row_mean(x: Array) -> Array:
    x = _rows(x)
    s = _scale(x)
    return jnp.mean(x / s, axis=1) * s[:, 0]


def row_std(x: Array) -> Array:
    x = _rows(x)
    s = _scale(x)
    return jnp.std(x / s, axis=1) * s[:, 0]


def row_absmean(x: Array) -> Array:
    return row_mean(jnp.abs(_rows(x)))


def row_maxabs(x: Array) -> Array:
    return jnp.max(jnp.abs(_rows(x)), axis=1)


def global_norm(tree: Any) -> Array:
    """L2 norm of all leaves of ``tree`` together, without overflow (cf. optax.tree.norm)."""
    leaves = [jnp.ravel(x) for x in jax.tree.leaves(tree)]
    m = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in leaves]))
    s = jnp.where((m > 0) & jnp.isfinite(m), m, 1.0)
    return (jnp.sqrt(sum(jnp.sum((x / s) ** 2) for x in leaves)) * s).astype(jnp.float32)


def _pair_norm(a: Array, b: Array) -> Array:
    """Per row, the norm of rows of ``a`` and ``b`` taken together, [n]."""
    return row_norm(jnp.concatenate([_rows(a), _rows(b)], axis=1))


# --- step probes ----------------------------------------------------------------------


def kernel_grad_stats(out: StepOut, layout: Layout) -> dict[str, Array]:
    """Mean, std, L2 norm, mean |g| and max |g| of each kernel gradient dL/dW_l."""
    g = layout.leaves(out.grads, "kernel")
    return {
        "grad_mean": layout.per_layer(row_mean, g),
        "grad_std": layout.per_layer(row_std, g),
        "grad_norm": layout.per_layer(row_norm, g),
        "grad_absmean": layout.per_layer(row_absmean, g),
        "grad_maxabs": layout.per_layer(row_maxabs, g),
    }


def bias_grad_norm(out: StepOut, layout: Layout) -> dict[str, Array]:
    """||dL/db_l||: Nielsen's "speed of learning" of layer l (``nielsen`` preset)."""
    return {"bias_grad_norm": layout.per_layer(row_norm, layout.leaves(out.grads, "bias"))}


def global_norms(out: StepOut, layout: Layout) -> dict[str, Array]:
    """Loss and global gradient norm over all parameters (before clipping)."""
    return {"loss": out.loss.astype(jnp.float32), "grad_global_norm": global_norm(out.grads)}


def delta_norm(out: StepOut, layout: Layout) -> dict[str, Array]:
    """Batch mean of ||delta_l^(n)||, delta_l^(n) the backpropagated gradient of example
    n's loss at layer l's pre-activation z_l = W_l a_{l-1} + b_l (see ``vgrad.step``
    for what it is under batch norm).

    The quantity signal-propagation theory predicts (Schoenholz et al. 2017): its ratio
    between consecutive layers is the depth-wise gradient gain, which the weight gradient
    ||a_{l-1} delta_l^T|| can hide when the activations a_{l-1} shrink or grow instead.
    """
    def per_example_mean(d: Array) -> Array:  # d: [n, batch, units]
        norms = jax.vmap(row_norm)(d)  # [n, batch]
        return row_mean(norms)

    return {"delta_norm": layout.per_layer(per_example_mean, layout.deltas(out.deltas))}


def update_stats(out: StepOut, layout: Layout) -> dict[str, Array]:
    """||Delta theta_l|| and ||Delta theta_l|| / ||theta_l|| over layer l's kernel and bias.

    Delta theta is the change the optimizer applied at this step (after clipping, weight
    decay and the learning rate); the ratio is the relative speed of each layer.
    """
    update = layout.per_layer(_pair_norm, layout.leaves(out.updates, "kernel"),
                              layout.leaves(out.updates, "bias"))
    weight = layout.per_layer(_pair_norm, layout.leaves(out.params, "kernel"),
                              layout.leaves(out.params, "bias"))
    return {"update_norm": update, "update_ratio": update / weight}


def clip_stats(out: StepOut, layout: Layout) -> dict[str, Array]:
    """Global gradient norm after clipping, and 1.0 where clipping changed the gradient.

    Only finite entries are compared: at a divergence step the non-finite gradient is
    not "clipped" (NaN differs from itself), and without clipping nothing ever fires.
    """
    pairs = zip(jax.tree.leaves(out.clipped), jax.tree.leaves(out.grads), strict=True)
    changed = jnp.stack([jnp.any((c != g) & jnp.isfinite(c) & jnp.isfinite(g))
                         for c, g in pairs]).any()
    return {"grad_global_norm_clipped": global_norm(out.clipped),
            "clip_fired": changed.astype(jnp.float32)}


STEP_PROBES: dict[str, Callable[[StepOut, Layout], dict[str, Array]]] = {
    "global_norms": global_norms,
    "kernel_grad_stats": kernel_grad_stats,
    "bias_grad_norm": bias_grad_norm,
    "delta_norm": delta_norm,
    "update_stats": update_stats,
    "clip_stats": clip_stats,
}


def _collect(registry: dict[str, Callable[..., dict[str, Array]]], view: Any,
             layout: Layout, which: Sequence[str] | None) -> dict[str, Array]:
    stats: dict[str, Array] = {}
    for name, probe in registry.items():
        if which is None or name in which:
            stats.update(probe(view, layout))
    return stats


def step_stats(out: StepOut, layout: Layout, which: Sequence[str] | None = None
               ) -> dict[str, Array]:
    """The per-step statistics of one step: every registered probe, or those in ``which``."""
    return _collect(STEP_PROBES, out, layout, which)


# --- epoch-boundary probes ---------------------------------------------------------------


class EpochView(NamedTuple):
    """What the epoch probes see at an epoch boundary."""

    params: Any
    train_loss: Array  # mean loss on the whole training set
    train_acc: Array
    test_loss: Array  # NaN when there is no test set
    test_acc: Array
    acts: list[Array]  # per hidden segment: a = f(z) on the probe batch, [n, probe, units]
    slopes: list[Array]  # per hidden segment: f'(z) on the probe batch, [n, probe, units]
    slope_max: list[Array]  # per hidden segment: max |f'| over z in [-10, 10], [n, units]
    probe_grads: Any  # gradient of the loss on the probe batch (training mode)
    sat_threshold: Array | float


def weight_stats(view: EpochView, layout: Layout) -> dict[str, Array]:
    """Mean and std of each kernel (the figure of "Visualizing the vanishing gradient
    problem", its WeightCapture callback)."""
    w = layout.leaves(view.params, "kernel")
    return {"weight_mean": layout.per_layer(row_mean, w),
            "weight_std": layout.per_layer(row_std, w)}


def evaluation(view: EpochView, layout: Layout) -> dict[str, Array]:
    """Loss and accuracy on the full training and test sets."""
    return {"train_loss": view.train_loss, "train_acc": view.train_acc,
            "test_loss": view.test_loss, "test_acc": view.test_acc}


def activation_stats(view: EpochView, layout: Layout) -> dict[str, Array]:
    """Per hidden layer, on the fixed probe batch (examples n, units j):

    - ``act_mean``, ``act_std``: mean and std of a_nj = f(z_nj) over n and j;
    - ``act_dead_frac``: fraction of units with f'(z_nj) = 0 for every example n
      (dead ReLUs: no gradient reaches their inputs whatever the example);
    - ``act_sat_frac``: fraction of pairs (n, j) in the saturated regime,
      |f'(z_nj)| < sat_threshold * max_z |f'(z)| (sigmoid and tanh tails; for ReLU the
      whole negative side, so dead units count as saturated too).
    """
    def cat(values: list[Array]) -> Array:
        return jnp.concatenate(values).astype(jnp.float32)

    dead = [jnp.all(d == 0, axis=1).mean(axis=1) for d in view.slopes]
    sat = [(jnp.abs(d) < view.sat_threshold * m[:, None, :]).mean(axis=(1, 2))
           for d, m in zip(view.slopes, view.slope_max, strict=True)]
    return {"act_mean": cat([row_mean(a) for a in view.acts]),
            "act_std": cat([row_std(a) for a in view.acts]),
            "act_dead_frac": cat(dead),
            "act_sat_frac": cat(sat)}


def log10_hists(xs: list[Array]) -> Array:
    """Counts of log10|x| in the fixed bins ``HIST_EDGES``, one row per row of each array
    (arrays [n, ...]: n layers), [sum of n, B].

    The bins are uniform, so an entry's bin is arithmetic, and one ``bincount`` over all
    rows (offset by row) replaces a search per row. Values below the first edge (exact
    zeros included) count in the first bin, above the last (inf included) in the last;
    NaN entries are not counted.
    """
    bins = HIST_EDGES.size - 1
    low, width = HIST_EDGES[0], HIST_EDGES[1] - HIST_EDGES[0]
    rows = [_rows(x) for x in xs]
    logs = jnp.concatenate([jnp.log10(jnp.abs(r)).ravel() for r in rows])
    first = np.cumsum([0] + [r.shape[0] for r in rows])
    row = jnp.concatenate([
        jnp.repeat(jnp.arange(r.shape[0], dtype=jnp.int32) + f, r.shape[1])
        for r, f in zip(rows, first, strict=False)])
    col = jnp.clip(jnp.floor((logs - low) / width), 0, bins - 1)
    idx = row * bins + jnp.where(jnp.isnan(col), 0, col).astype(jnp.int32)
    counts = jnp.bincount(idx, weights=(~jnp.isnan(logs)).astype(jnp.float32),
                          length=int(first[-1]) * bins)
    return counts.reshape(int(first[-1]), bins)


def probe_bias_grad_norm(view: EpochView, layout: Layout) -> dict[str, Array]:
    """||dC/db_l|| of the loss averaged over the whole probe batch, [L].

    Nielsen's measurement (``nielsen`` preset): with ``record.probe_size=1000`` it is the
    norm of the bias gradient averaged over 1,000 training images, at initialisation
    (epoch 0) and after every epoch, free of the noise of a 10-example mini-batch.
    """
    return {"probe_bias_grad_norm": layout.per_layer(
        row_norm, layout.leaves(view.probe_grads, "bias"))}


def histograms(view: EpochView, layout: Layout) -> dict[str, Array]:
    """Fixed-bin histograms of log10|dL/dW_l| (probe batch) and of log10|W_l|, [L, B]."""
    return {"grad_hist": log10_hists(layout.leaves(view.probe_grads, "kernel")),
            "weight_hist": log10_hists(layout.leaves(view.params, "kernel"))}


EPOCH_PROBES: dict[str, Callable[[EpochView, Layout], dict[str, Array]]] = {
    "evaluation": evaluation,
    "weight_stats": weight_stats,
    "activation_stats": activation_stats,
    "probe_bias_grad_norm": probe_bias_grad_norm,
    "histograms": histograms,
}


def epoch_stats(view: EpochView, layout: Layout, which: Sequence[str] | None = None
                ) -> dict[str, Array]:
    """The per-epoch statistics at one epoch boundary: every registered probe, or those in
    ``which`` (the evaluation always runs: the run's summary needs it)."""
    which = None if which is None else {"evaluation", *which}
    stats = _collect(EPOCH_PROBES, view, layout, which)
    return {k: jnp.asarray(v, jnp.float32) for k, v in stats.items()}
