"""What the epoch probes see: the epoch view, and evaluation in blocks within a budget.

At every epoch boundary the program measures each member's state on the full training
and test sets and on the fixed probe batch (:func:`epoch_view`), computing only what the
chosen probes need (``vgrad.probes.NEEDS``). Full sets are evaluated ``block`` examples
at a time (:func:`mean_over_set`), the block chosen so that every member's activations
on one device fit ``EVAL_BYTES`` (:func:`eval_block`); the sets come padded to whole
blocks of ``EVAL_BLOCK`` examples (:class:`DeviceData`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vgrad import curvature, jacobian, probes
from vgrad.layers import Layout
from vgrad.models import rnn
from vgrad.step import TrainState, make_eval_fn, make_loss_fn

Array = jax.Array

#: Examples per block when evaluating on a full set (bounds activation memory).
EVAL_BLOCK = 4096
#: Bytes the activations of one evaluation block may take on a device, all members
#: together; blocks shrink below EVAL_BLOCK (by powers of two) to stay under it. A
#: recurrent net holds every time step of every example of a block: at T = 100 and 32
#: units, 1,000 seeds evaluating 1,000 sequences at once asked an H200 for 36 GiB.
EVAL_BYTES = 2 * 2**30


class DeviceData(NamedTuple):
    """Inputs as jit arguments (never baked into the program as constants).

    Full sets are zero-padded to whole evaluation blocks; the padding is never trained
    on (batches index the first n_train rows) and is masked out of evaluations. A group
    whose jobs use several datasets of one shape (other noise, other scaling) holds them
    stacked on a leading axis, and each member reads its own by index.
    """

    x_train: Array
    y_train: Array
    x_test: Array
    y_test: Array
    x_probe: Array
    y_probe: Array


def pad_to_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """``x`` zero-padded to whole blocks of ``block`` rows (a set shorter than one block
    stays as it is)."""
    n_pad = -len(x) % block if len(x) > block else 0
    return np.concatenate([x, np.zeros((n_pad,) + x.shape[1:], x.dtype)]) if n_pad else x


def eval_block(floats_per_example: int, members_per_device: int, itemsize: int) -> int:
    """Examples per evaluation block: the largest power of two up to ``EVAL_BLOCK``
    whose activations, for every member on a device, fit in ``EVAL_BYTES``."""
    block = EVAL_BLOCK
    while block > 1 and block * floats_per_example * members_per_device * itemsize > EVAL_BYTES:
        block //= 2
    return block


def mean_over_set(eval_batch: Callable, params: Any, batch_stats: Any, x: Array, y: Array,
                  n: int, block: int = EVAL_BLOCK) -> tuple[Array, Array]:
    """Mean loss and accuracy over the first n rows of a set, ``block`` rows at a time
    (``block`` divides ``EVAL_BLOCK``, to which sets longer than it are padded)."""
    if n == 0:
        return jnp.asarray(jnp.nan, x.dtype), jnp.asarray(jnp.nan, x.dtype)
    if n <= block:
        loss, correct = eval_batch(params, batch_stats, x[:n], y[:n])
        return loss.mean(), correct.mean()
    x, y = x[:-(-n // block) * block], y[:-(-n // block) * block]
    if x.shape[0] % block:  # a set shorter than EVAL_BLOCK, unpadded
        pad = block - x.shape[0] % block
        x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
        y = jnp.concatenate([y, jnp.zeros((pad,) + y.shape[1:], y.dtype)])
    blocks = x.shape[0] // block
    loss, correct = jax.lax.map(
        lambda xy: eval_batch(params, batch_stats, *xy),
        (x.reshape(blocks, block, *x.shape[1:]), y.reshape(blocks, block, *y.shape[1:])))
    mask = jnp.arange(x.shape[0]).reshape(blocks, block) < n
    return jnp.where(mask, loss, 0).sum() / n, jnp.where(mask, correct, 0).sum() / n


@dataclass(frozen=True)
class ViewSpec:
    """What shapes a group's epoch views (static): the model's layout, the loss, what
    the chosen epoch probes need (``vgrad.probes.needs``), the sizes of the training and
    test sets, the evaluation block, and the zero perturbations of the network's delta
    points for a batch (``vgrad.step.perturbation_zeros``)."""

    layout: Layout
    loss: str
    needs: frozenset[str]
    n_train: int
    n_test: int
    block: int
    zero_perturbations: Callable[[Array], Any]


def _variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    """A net's variables (batch-norm averages only where it has them)."""
    return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def _sown(net: Any, variables: dict[str, Any], x: Array) -> Any:
    """What the net sows (``intermediates``) on ``x`` in inference mode with its captures
    on: activations, slopes, the signals at its delta points, attention weights."""
    _, captured = net.apply(variables, x, train=False, capture=True,
                            mutable=["intermediates"])
    return captured["intermediates"]


def epoch_view(spec: ViewSpec, net: Any, state: TrainState, data: DeviceData,
               probe_key: Callable[[], Array], sat_threshold: Array | float
               ) -> probes.EpochView:
    """One member's epoch view: its evaluation on the full sets and, as the probes need
    them, the captures and the deep Jacobian on the probe batch and the probe batch's
    gradient (``probe_key()`` draws that gradient's random key; ``data``: the member's
    own dataset)."""
    layout = spec.layout
    eval_batch = make_eval_fn(net, spec.loss)
    params, batch_stats = state.params, state.batch_stats
    variables = _variables(params, batch_stats)
    train = mean_over_set(eval_batch, params, batch_stats,
                          data.x_train, data.y_train, spec.n_train, spec.block)
    test = mean_over_set(eval_batch, params, batch_stats,
                         data.x_test, data.y_test, spec.n_test, spec.block)
    sown = dict.fromkeys(("activation", "slope", "slope_max"), [])
    signals = branches = skips = attention = None
    if "captures" in spec.needs:  # (only traced when asked for)
        inter = _sown(net, variables, data.x_probe)
        sown = {k: layout.captured(inter, k) for k in sown}
        signals = layout.signals(inter)
        if layout.blocks is not None:
            branches, skips = layout.block_values(inter)
    initial_signals = None
    if "initial_signals" in spec.needs:  # (the same probe batch through the initial net)
        initial_signals = layout.signals(_sown(net, _variables(*state.initial),
                                               data.x_probe))
    jacobian_sv = None
    if "jacobian" in spec.needs:
        jacobian_sv = jacobian.singular_values(jacobian.deep_jacobian(
            net, variables, layout, data.x_probe[:probes.JACOBIAN_EXAMPLES],
            spec.zero_perturbations))
    if "attention" in spec.needs:  # (on a few examples: heads x T^2 weights each)
        attention = layout.attention_weights(
            _sown(net, variables, data.x_probe[:probes.ATTENTION_EXAMPLES]))
    state_sv = None
    if "state_jacobian" in spec.needs:
        state_sv = rnn.state_jacobian_sv(net, params, data.x_probe)
    probe_grads = hessian = None
    if spec.needs & {"probe_grads", "curvature", "curvature_blocks", "curvature_density"}:
        loss_fn = make_loss_fn(net, spec.loss)
        perturbations = spec.zero_perturbations(data.x_probe)
        key = probe_key()

        def probe_loss(p: Any) -> Array:
            return loss_fn(p, perturbations, batch_stats, data.x_probe, data.y_probe, key)[0]

        if "probe_grads" in spec.needs:
            probe_grads = jax.grad(probe_loss)(params)
        # (the random vectors of the curvature probes: new at every epoch)
        keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, 1), state.step))
        hessian = {}
        if "curvature" in spec.needs:
            hessian.update(curvature.curvature(probe_loss, params, layout, keys[0]))
        if "curvature_blocks" in spec.needs:
            hessian["hess_max_layer"] = curvature.block_maxima(probe_loss, params, layout,
                                                               keys[1])
        if "curvature_density" in spec.needs:
            hessian.update(curvature.density(probe_loss, params,
                                             jax.random.fold_in(keys[0], 2)))
    return probes.EpochView(
        params, *train, *test, acts=sown["activation"], slopes=sown["slope"],
        slope_max=sown["slope_max"], probe_grads=probe_grads,
        sat_threshold=sat_threshold, signals=signals,
        branches=branches, skips=skips, jacobian_sv=jacobian_sv, curvature=hessian,
        state_jacobian_sv=state_sv, attention=attention, initial_signals=initial_signals)
