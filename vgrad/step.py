"""The pure training step: ``(state, x, y, key) -> (state, StepOut)``.

Like the ``apply_model`` of Flax's MNIST example, the step returns its measurements
as values: the loss, the gradient pytree exactly as the loss produced it (before
clipping), the per-example backpropagated deltas, the clipped gradient and the update.
There is no I/O and no global state, so the step can be scanned, vmapped over seeds
and compared against a plain Python loop.

Divergence is data: when the loss, a gradient or the update is not finite (or a
parameter or update entry reaches half the float's largest value, where the update's
add could overflow), the seed's parameters are frozen at their last finite value for
good and the step index is kept in ``diverged_at``; the caller (the loop) goes on with
the other seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from vgrad import losses, noise
from vgrad.layers import Layout, pack
from vgrad.optim import Transforms

Array = jax.Array


class TrainState(struct.PyTreeNode):
    step: Array  # global step index of the next step (int32)
    params: Any
    batch_stats: Any  # BatchNorm running averages ({} without batch norm)
    clip_state: Any
    opt_state: Any
    # first step refused (loss, gradient or update not finite, or an update or parameter
    # entry at half the float's largest value: ``step_admissible``); -1: none
    diverged_at: Array
    nonfinite_at_divergence: Array  # [L] non-finite gradient entries per layer at that step
    # the local step size's start point (``with_alpha``; else None): the last update
    # applied, its length over the layers and its observation (``vgrad.noise.alpha``)
    alpha_start: Any = None
    # the parameters and batch-norm averages at initialisation (``with_initial``; else
    # None): what the coordinate check measures each layer's change from
    initial: Any = None


class StepOut(NamedTuple):
    loss: Array  # mean loss on the batch
    grads: Any  # dL/dparams, before clipping
    # delta_l of example n: B * dL/dz_l^(n) = sum_m dl_m/dz_l^(n), [batch, units] per layer:
    # the backpropagated signal at n's pre-activation that reaches the weights. Without
    # batch norm the examples do not interact and it is n's own dl_n/dz_l^(n).
    deltas: Any
    clipped: Any  # the gradient after clipping
    updates: Any  # the parameter change applied (new params - old params)
    params: Any  # the parameters the gradient was taken at
    # dl_n/dz_l^(n), example n's own loss at its own pre-activation (through batch norm's
    # batch statistics too), when asked for (``own_deltas``); else None.
    own_deltas: Any = None
    # every nn.Dense call's input and B x dL/d(output), when asked for (``taps``: the
    # per-example gradient statistics, ``vgrad.noise``); else None
    taps: Any = None
    # Cockpit's local step size of the previous step (``with_alpha``: NaN at the first)
    alpha: Any = None


def step_admissible(grads: Any, updates: Any, params: Any) -> Array:
    """Whether a step may be applied: every gradient entry finite, every update and
    parameter entry of magnitude below half the dtype's largest finite value.

    Then p + u is finite (|p + u| <= |p| + |u| < max), so the step is decided before
    its add: the freeze of a diverged seed, ``where(keep, p + u, p)``, fuses into the
    update itself (one kernel per leaf; deciding on the new parameters needs a
    reduction between the add and a select of its own, two more kernels per leaf).
    A parameter that grows past half the largest float counts as diverged a step
    before its add could overflow. One count of bad entries per leaf (a comparison
    with NaN is false; g * 0 is NaN where g is not finite: exact, a sum of zeros never
    overflows).

    The leaves' counts are added by ``cumsum``, not ``sum``: XLA rewrites a sum of
    stacked scalars into a chain of scalar adds and then copies that chain into every
    consumer of the result, here the update of every leaf of the parameters: quadratic
    in the number of leaves (a 12-block Transformer's train step took 62 s to compile,
    6.5 s with the cumulative sum, which stays one operation)."""
    def bad(g: Array, u: Array, p: Array) -> Array:
        half = jnp.finfo(p.dtype).max / 2
        size = jnp.maximum(jnp.abs(u), jnp.abs(p)) + (g * 0).astype(p.dtype)
        return jnp.sum(~(size < half), dtype=jnp.int32)

    counts = jnp.stack([bad(g, u, p) for g, u, p in zip(
        jax.tree.leaves(grads), jax.tree.leaves(updates), jax.tree.leaves(params),
        strict=True)])
    return jnp.cumsum(counts)[-1] == 0


def perturbation_zeros(model: nn.Module) -> Callable[[Array], Any]:
    """A function from a batch ``x`` to zeros shaped like the ``perturbations`` collection.

    The shapes come from one abstract ``init`` per batch shape, remembered, so that
    tracing a step does not trace the whole initialisation again.
    """
    shapes: dict[tuple, Any] = {}

    def zeros(x: Array) -> Any:
        if x.shape not in shapes:
            key = jax.random.key(0)
            init = jax.eval_shape(lambda: model.init({"params": key, "noise": key},
                                                     jnp.zeros(x.shape, x.dtype)))
            shapes[x.shape] = init["perturbations"]
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[x.shape])

    return zeros


class AlphaStart(NamedTuple):
    """What the next step needs of this one to fit Cockpit's Alpha: the update applied,
    its length over the layers' kernels and biases, and the start point's observation."""

    update: Any
    size: Array
    seen: noise.Observation


def init_state(model: nn.Module, tx: Transforms, key: Array, x: Array, n_layers: int,
               with_alpha: bool = False, with_initial: bool = False) -> TrainState:
    """Initial parameters (from ``key``) and optimizer states for one seed (and, with
    ``with_alpha``, an empty start point for the local step size; with ``with_initial``,
    a copy of the initial parameters and batch-norm averages, kept unchanged).

    ``lazy_init`` creates the variables without running the forward pass, so the
    program depends on the shapes only (and compiles to the same code for every
    parameter-free activation, which the persistent compilation cache shares).
    """
    variables = model.lazy_init({"params": key, "noise": key},
                                jax.ShapeDtypeStruct(x.shape, x.dtype))
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        clip_state=tx.clip.init(params),
        opt_state=tx.update.init(params),
        diverged_at=jnp.full((), -1, jnp.int32),
        nonfinite_at_divergence=jnp.zeros((n_layers,), jnp.int32),
        alpha_start=_no_start(params) if with_alpha else None,
        initial=(params, variables.get("batch_stats", {})) if with_initial else None,
    )


def _no_start(params: Any) -> AlphaStart:
    zero = jnp.zeros((), jax.tree.leaves(params)[0].dtype)
    return AlphaStart(jax.tree.map(jnp.zeros_like, params), zero,
                      noise.Observation(zero, zero, zero, zero))


def make_loss_fn(model: nn.Module, loss: str, mean: bool = True, sown: bool = False
                 ) -> Callable[..., tuple[Array, Any]]:
    """Batch loss as a function of (params, perturbations); aux = new batch_stats (with
    ``sown``: and the values the network sowed into ``intermediates``). The mean over the
    batch, or (``mean=False``) one loss per example."""
    per_example = losses.LOSSES[loss]
    mutable = ["batch_stats", "intermediates"] if sown else ["batch_stats"]

    def loss_fn(params, perturbations, batch_stats, x, y, key):
        variables = {"params": params}
        if perturbations is not None:  # (None: the delta points add nothing)
            variables["perturbations"] = perturbations
        if batch_stats:
            variables["batch_stats"] = batch_stats
        logits, mutated = model.apply(variables, x, train=True, rngs={"noise": key},
                                      mutable=mutable)
        values = per_example(logits, y)
        aux = mutated.get("batch_stats", batch_stats)
        if sown:
            aux = (aux, mutated.get("intermediates", {}), values)
        return values.mean() if mean else values, aux

    return loss_fn


def own_deltas(model: nn.Module, loss: str) -> Callable[..., Any]:
    """dl_n/dz_l^(n) for every example n and layer l, [batch, units] per layer.

    The diagonal blocks of the Jacobian of the per-example losses with respect to the
    per-example perturbations: one backward pass per example (``jax.jacrev``), so it is
    ``batch`` times the cost of ``deltas``; asked for by the ``delta_norm_own`` probe.
    """
    per_example = make_loss_fn(model, loss, mean=False)

    def own(params, perturbations, batch_stats, x, y, key):
        jac = jax.jacrev(lambda p: per_example(params, p, batch_stats, x, y, key)[0])(
            perturbations)  # per layer: [batch (loss n), batch (example m), units]
        index = jnp.arange(x.shape[0])
        return jax.tree.map(lambda j: j[index, index], jac)

    return own


def nonfinite_per_layer(grads: Any, layout: Layout) -> Array:
    """Number of non-finite entries in each Dense layer's kernel and bias gradient, [L]."""
    joined = [jnp.concatenate([k.reshape(k.shape[0], -1), b.reshape(b.shape[0], -1)], axis=1)
              for k, b in zip(layout.leaves(grads, "kernel"), layout.leaves(grads, "bias"),
                              strict=True)]
    return jnp.concatenate([jnp.sum(~jnp.isfinite(r.x), axis=1) for r in pack(joined)]
                           ).astype(jnp.int32)


def make_train_step(model: nn.Module, tx: Transforms, loss: str, layout: Layout,
                    with_own_deltas: bool = False, with_taps: bool = False,
                    with_alpha: bool = False, with_deltas: bool = True
                    ) -> Callable[[TrainState, Array, Array, Array], tuple[TrainState, StepOut]]:
    """One optimisation step on a batch, with its gradient and deltas returned (and each
    example's own deltas with ``with_own_deltas``; every Dense call's input and output
    gradient with ``with_taps``: ``vgrad.noise``; the previous step's local step size
    with ``with_alpha``, which needs the taps and a state from ``init_state(...,
    with_alpha=True)``). ``with_deltas=False``: the plain step of a step that is not
    recorded (``record.every``), the gradient of the parameters only (deltas None): the
    same update, without the perturbations' gradients."""
    if not with_deltas and (with_own_deltas or with_taps or with_alpha):
        raise ValueError("a plain step (with_deltas=False) computes no deltas, taps or alpha")
    own_fn = own_deltas(model, loss) if with_own_deltas else None
    with_taps = with_taps or with_alpha
    if with_taps:
        model = noise.Tapped(model)
    grad_fn = jax.value_and_grad(make_loss_fn(model, loss, sown=with_taps),
                                 argnums=(0, 1) if with_deltas else 0, has_aux=True)
    zero_perturbations = perturbation_zeros(model) if with_deltas else (lambda x: None)

    def train_step(state: TrainState, x: Array, y: Array, key: Array
                   ) -> tuple[TrainState, StepOut]:
        perturbations = zero_perturbations(x)
        (loss_value, aux), grads = grad_fn(
            state.params, perturbations, state.batch_stats, x, y, key)
        grads, dperturb = grads if with_deltas else (grads, None)
        batch_stats, sown, values = aux if with_taps else (aux, None, None)
        # d(mean loss)/dz = delta_n / batch for example n: undo the mean.
        deltas = jax.tree.map(lambda d: d * x.shape[0], dperturb)
        taps = noise.Taps(sown, deltas) if with_taps else None
        own = (None if own_fn is None else
               own_fn(state.params, perturbations, state.batch_stats, x, y, key))
        clipped, clip_state = tx.clip.update(grads, state.clip_state, state.params)
        updates, opt_state = tx.update.update(clipped, state.opt_state, state.params)

        alive = state.diverged_at < 0
        with jax.named_scope("guard"):  # (profiles tell its kernels apart)
            finite = jnp.isfinite(loss_value) & step_admissible(grads, updates, state.params)
        keep = alive & finite
        # A diverged seed trains no more: only its parameters and batch-norm averages
        # (what is saved of it) are frozen; its optimizer, clipping and alpha states run
        # on, NaN perhaps, and are never read again (its records are NaN from its
        # divergence on; a checkpoint carries them as they are, and a resumed seed stays
        # diverged).
        params = jax.tree.map(lambda n, o: jnp.where(keep, n, o),
                              optax.apply_updates(state.params, updates), state.params)
        step_alpha, alpha_start = None, None
        if with_alpha:
            step_alpha, alpha_start = _alpha(layout, state, taps, values, updates)
        diverging = alive & ~finite
        new = state.replace(
            params=params,
            batch_stats=jax.tree.map(lambda n, o: jnp.where(keep, n, o), batch_stats,
                                     state.batch_stats),
            clip_state=clip_state, opt_state=opt_state, alpha_start=alpha_start,
            step=state.step + 1,
            diverged_at=jnp.where(diverging, state.step, state.diverged_at),
            nonfinite_at_divergence=jnp.where(
                diverging, nonfinite_per_layer(grads, layout), state.nonfinite_at_divergence),
        )
        return new, StepOut(loss_value, grads, deltas, clipped, updates, state.params, own,
                            taps, step_alpha)

    return train_step


def _alpha(layout: Layout, state: TrainState, taps: noise.Taps, values: Array,
           updates: Any) -> tuple[Array, AlphaStart]:
    """The previous step's local step size (its end point is this step's parameters,
    observed on this step's batch, as Cockpit does; NaN at the first step) and this
    step's start point for the next."""
    before = state.alpha_start
    end = noise.observe(values, noise.projections(layout, taps, before.update), before.size)
    value = noise.alpha(before.seen, end, before.size)
    size = noise.layers_norm(layout, updates)
    seen = noise.observe(values, noise.projections(layout, taps, updates), size)
    return jnp.where(state.step > 0, value, jnp.nan), AlphaStart(updates, size, seen)


def make_eval_fn(model: nn.Module, loss: str) -> Callable[[Any, Any, Array, Array],
                                                          tuple[Array, Array]]:
    """Per-example loss and correctness on a batch (batch norm uses running averages).

    Correctness is 1 or 0 (per step: the share of an example's steps), and NaN for an
    example whose logits are not all finite (a
    NaN logit predicts nothing), so that a set's accuracy is NaN when the network no
    longer computes numbers, rather than the share of one class.
    """
    per_example = losses.LOSSES[loss]

    def eval_batch(params, batch_stats, x, y):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        logits = model.apply(variables, x, train=False)
        correct = losses.correct(loss, logits, y)
        finite = jnp.all(jnp.isfinite(logits), axis=tuple(range(1, logits.ndim)))
        return per_example(logits, y), jnp.where(finite, correct, jnp.nan)

    return eval_batch
