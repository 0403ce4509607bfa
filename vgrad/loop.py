"""The training loop: chunks of epochs as one compiled ``lax.scan``, vmapped over members.

This is the only module with Python control flow around training. It trains a
:class:`~vgrad.group.Group`: jobs of one structure, whose seeds are the *members* of one
program (a single run is a group of one job). A run is cut into chunks of
``chunk_epochs`` epochs; one chunk is one call of one compiled program that

  for each epoch:   shuffle (one sort of random keys), then lax.scan over its steps:
                      train step -> probes -> write the step's row into a buffer
                    epoch probes (full-set evaluation, weights, probe batch)

for every member at once (``jax.vmap``). Python sees only chunk boundaries, where it
pulls the chunk's records to the host (the one device->host sync of a chunk), cuts them
into each job's share and hands them to the caller, which writes them.

Every chunk has the same shapes, so the chunk program compiles once: the epoch index
is a traced argument, epochs past the end of the run are skipped by a ``lax.cond`` on
it, and statistics that are not due at a step (``record.every``) are skipped by a
``lax.cond`` on the step index. Both predicates are the same for every member, so under
``vmap`` they remain real branches rather than computing both sides.

``engine="python"`` runs the same vmapped step one dispatch per step: a debugging mode
(and the reference the scanned engine is tested against), tens of times slower.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vgrad import activations, initializers, jacobian, layers, losses, models, optim, probes
from vgrad.data import Dataset
from vgrad.group import Group, Job, Members, family, node_view, structure
from vgrad.step import (
    TrainState,
    init_state,
    make_eval_fn,
    make_loss_fn,
    make_train_step,
    perturbation_zeros,
)

Array = jax.Array

#: Epoch probes that read values the network sows on the probe batch (``capture=True``).
CAPTURING = {"activation_stats", "forward_signal", "residual_signal"}
#: Examples per block when evaluating on a full set (bounds activation memory).
EVAL_BLOCK = 4096
#: Bytes the activations of one evaluation block may take on a device, all members
#: together; blocks shrink below EVAL_BLOCK (by powers of two) to stay under it. A
#: recurrent net holds every time step of every example of a block: at T = 100 and 32
#: units, 1,000 seeds evaluating 1,000 sequences at once asked an H200 for 36 GiB.
EVAL_BYTES = 2 * 2**30
#: Work per chunk chosen by record.chunk_epochs=0, in multiply-adds (about a second on
#: a laptop core): large enough to hide the per-chunk host sync, small enough for a
#: live progress bar and frequent checkpoints.
CHUNK_BUDGET = 2e10
#: Fixed per-step overhead of a small network in the same units.
STEP_OVERHEAD = 2e5


# --- static plan ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """How steps, epochs, chunks and recorded steps line up (all static)."""

    steps_per_epoch: int
    epochs: int
    chunk_epochs: int
    record_every: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.epochs / self.chunk_epochs)

    def chunk_epochs_of(self, chunk: int) -> range:
        """The epochs (0-based) that chunk ``chunk`` trains."""
        first = chunk * self.chunk_epochs
        return range(first, min(first + self.chunk_epochs, self.epochs))

    def recorded_steps(self, epochs: range | None = None) -> np.ndarray:
        """Global indices of the recorded steps: 0, K, 2K, ... (within ``epochs``)."""
        epochs = epochs if epochs is not None else range(self.epochs)
        start, stop = epochs.start * self.steps_per_epoch, epochs.stop * self.steps_per_epoch
        first = -(-start // self.record_every) * self.record_every
        return np.arange(first, stop, self.record_every, dtype=np.int64)


def count_params(net: Any, n_features: int) -> int:
    shapes = jax.eval_shape(lambda: net.init({"params": jax.random.key(0),
                                               "noise": jax.random.key(0)},
                                              jnp.zeros((1, n_features))))
    return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes["params"]))


def make_plan(cfg: Any, n_train: int, n_params: int, members: int) -> Plan:
    """The plan of a validated config trained as ``members`` members (jobs x seeds).

    ``record.chunk_epochs=0`` picks the largest divisor of ``epochs`` whose work fits
    ``CHUNK_BUDGET``, so that every chunk has the same length and compiles once.
    """
    steps_per_epoch = n_train // cfg.batch_size  # the last partial batch is dropped
    chunk = cfg.record.chunk_epochs
    if chunk == 0:
        epoch_cost = steps_per_epoch * members * (6 * cfg.batch_size * n_params + STEP_OVERHEAD)
        fits = max(1, int(CHUNK_BUDGET // max(epoch_cost, 1)))
        chunk = max(d for d in range(1, cfg.epochs + 1) if cfg.epochs % d == 0 and d <= fits)
    return Plan(steps_per_epoch, cfg.epochs, min(chunk, cfg.epochs), cfg.record.every)


# --- data on the device -----------------------------------------------------------------------


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


def _pad_to_blocks(x: np.ndarray, block: int) -> np.ndarray:
    n_pad = -len(x) % block if len(x) > block else 0
    return np.concatenate([x, np.zeros((n_pad,) + x.shape[1:], x.dtype)]) if n_pad else x


def device_data(datasets: list[Dataset], probe_size: int, mesh: Mesh,
                dtype: str = "float32") -> DeviceData:
    """The datasets on every device of ``mesh`` (each holds a whole copy), inputs in
    ``dtype``; one dataset as is, several stacked on a leading axis."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def arrays(ds: Dataset) -> tuple[np.ndarray, ...]:
        x_train, x_test = ds.x_train.astype(dtype), ds.x_test.astype(dtype)
        return (_pad_to_blocks(x_train, EVAL_BLOCK), _pad_to_blocks(ds.y_train, EVAL_BLOCK),
                _pad_to_blocks(x_test, EVAL_BLOCK), _pad_to_blocks(ds.y_test, EVAL_BLOCK),
                x_train[:probe_size], ds.y_train[:probe_size])

    parts = [arrays(ds) for ds in datasets]
    joined = parts[0] if len(parts) == 1 else [np.stack(a) for a in zip(*parts, strict=True)]
    return DeviceData(*(jax.device_put(a, replicated) for a in joined))


#: Epoch probes whose programs hang when the member axis is split across several CPU
#: devices (seen with the Jacobian spectrum's forward-mode Jacobian and SVD: the program
#: stops on every device at once, idle; one CPU device runs it). They train on one device.
SINGLE_CPU_DEVICE = ("jacobian_spectrum",)


def trains_on_one_device(group: Group) -> bool:
    """Whether ``group`` trains on one device (see ``SINGLE_CPU_DEVICE``)."""
    return (jax.default_backend() == "cpu"
            and bool(set(SINGLE_CPU_DEVICE) & set(group.cfg.record.epoch_probes)))


def member_mesh(n_members: int, one_device: bool = False) -> Mesh:
    """The devices the member axis is split across: as many as divide ``n_members``
    evenly (all of them when they do), so each device trains an equal share; only the
    first with ``one_device``."""
    devices = jax.devices()[:1] if one_device else jax.devices()
    count = max(d for d in range(1, len(devices) + 1) if n_members % d == 0)
    return Mesh(np.array(devices[:count]), ("members",))


def shard_members(tree: Any, mesh: Mesh) -> Any:
    """Place (or, for ShapeDtypeStructs, describe) an [M, ...] pytree split along members."""
    sharding = NamedSharding(mesh, PartitionSpec("members"))

    def place(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return jax.device_put(x, sharding)

    return jax.tree.map(place, tree)


def shuffle(key: Array, n: int) -> Array:
    """A random permutation of range(n) from one sort of random bits.

    ``jax.random.permutation`` guarantees uniformity with extra rounds and was about a
    third of the step time of small nets here; one argsort of 32 random bits is 5x
    cheaper, and ties (probability ~ n^2 / 2^33) only keep two examples in order.
    """
    return jnp.argsort(jax.random.bits(key, (n,), jnp.uint32))


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


# --- the program ------------------------------------------------------------------------------


class SeedKeys(NamedTuple):
    """Per-seed random streams, derived from the seed value alone, so that a seed draws
    the same numbers whatever job or group it trains in."""

    init: Array  # parameter initialisation
    shuffle: Array  # epoch e's order: fold_in(shuffle, e)
    noise: Array  # stochastic layers (RReLU) at step t: fold_in(noise, t)
    probe: Array  # stochastic layers in the probe-batch gradient at epoch boundaries


def seed_keys(seed: Array) -> SeedKeys:
    return SeedKeys(*jax.random.split(jax.random.key(seed), 4))


class StepResult(NamedTuple):
    """What one step of all members hands back to the loop."""

    state: TrainState
    stats: dict[str, Array]  # recorded statistics, [M, ...]; NaN if the step is not recorded
    clip_fired: Array  # [M] 1.0 where clipping changed the gradient (every step)
    grads: Any  # the gradient pytree, [M, ...] (kept only for full snapshots)


class Program:
    """The functions of one group's structure, batched over members, before jit.

    A *member* is one seed of one job (``vgrad.group``); its knobs (learning rate, init
    scale, ...), family indices (activation, initializers) and dataset index are inputs
    of the program, so the network and the optimizer are built per member, inside the
    traced functions, from those values.

    ``vmap`` is applied to the per-member pieces (step, probes, evaluation) inside the
    scans, not around them: the control flow stays unbatched, so its predicates are
    plainly shared by all members and tracing does not re-batch whole loop bodies.
    """

    def __init__(self, group: Group):
        cfg = group.cfg
        self.group = group
        self.config = group.jobs[0].config
        self.loss = cfg.loss.value
        ds = group.datasets[0]
        self.out_dim = losses.out_dim(self.loss, ds.n_classes)
        self.n_features = ds.n_features
        self.dtype = jnp.dtype(cfg.dtype)
        self.model = models.MODELS[cfg.model.name]
        self.layout = self.model.layout(cfg)
        self.names = self.layout.names
        template = jax.tree.map(lambda a: a[0], group.members())
        self.n_params = count_params(self.net(template), ds.n_features)
        self.plan = make_plan(cfg, len(ds.x_train), self.n_params, group.n_members)
        self.n_train, self.n_test = len(ds.x_train), len(ds.x_test)
        self.n_datasets = len(group.datasets)
        self.batch_size = cfg.batch_size
        self.snapshot_every = cfg.record.full_grads_every
        self.matmul_precision = cfg.matmul_precision
        # (a probe of residual blocks does not run on a model without blocks, ...)
        self.step_probes = probes.applicable(probes.STEP_PROBES, cfg.record.step_probes,
                                             self.layout)
        self.epoch_probes = probes.applicable(probes.EPOCH_PROBES, cfg.record.epoch_probes,
                                              self.layout)
        self.zero_perturbations = perturbation_zeros(self.net(template))
        # Activations an example holds in evaluation: its Dense outputs (at every time
        # step of a recurrent net), twice (the elementwise results beside them); for the
        # members on one device of the group's mesh.
        devices = member_mesh(group.n_members, trains_on_one_device(group)).devices.size
        self.eval_block = eval_block(2 * models.activation_units(cfg),
                                     group.n_members // devices, self.dtype.itemsize)

    # -- a member's network and optimizer, from its knobs --

    def net(self, m: Members) -> Any:
        """Member ``m``'s network (``m``: one member's values, traced or not)."""
        fam, cfg = self.group.families, self.group.cfg
        if len(fam["act"]) == 1:
            act, pieces = activations.build(node_view(fam["act"][0], m.knobs, "act"))
        else:
            fns = [activations.elementwise(node_view(a, m.knobs, "act")) for a in fam["act"]]
            act, pieces = activations.select(fns, m.act), 1
        kernel_init = initializers.drawn_in_float32(initializers.select(
            [initializers.kernel_init(node_view(f, m.knobs, "init")) for f in fam["init"]],
            m.init))
        bias_init = initializers.drawn_in_float32(initializers.select(
            [initializers.bias_init(node_view(f, m.knobs, "bias_init"))
             for f in fam["bias_init"]], m.bias_init))
        parts = models.Parts(act, kernel_init, bias_init, pieces, m.knobs["bn_momentum"],
                             m.knobs["bn_eps"], self.dtype)
        return self.model.build(cfg, parts, self.out_dim)

    def tx(self, m: Members) -> optim.Transforms:
        """Member ``m``'s clipping and optimizer."""
        return optim.make(node_view(self.config["clip"], m.knobs, "clip"),
                          node_view(self.config["optim"], m.knobs, "optim"),
                          self.n_train, self.plan.total_steps)

    def _data(self, data: DeviceData, m: Members) -> DeviceData:
        """Member ``m``'s dataset (the group's only one, or the one it indexes)."""
        return data if self.n_datasets == 1 else jax.tree.map(lambda a: a[m.data], data)

    def _batch(self, data: DeviceData, members: Members, idx: Array) -> tuple[Array, Array]:
        """Every member's batch, [M, B, ...], from its rows ``idx`` [M, B]."""
        if self.n_datasets == 1:
            return data.x_train[idx], data.y_train[idx]
        which = members.data[:, None]
        return data.x_train[which, idx], data.y_train[which, idx]

    # -- per-member pieces (vmapped by the methods below) --

    def _start_one(self, m: Members) -> TrainState:
        x = jax.ShapeDtypeStruct((self.batch_size, self.n_features), self.dtype)
        return init_state(self.net(m), self.tx(m), seed_keys(m.seed).init, x, len(self.names))

    def _train_one(self, m: Members, state: TrainState, x: Array, y: Array, key: Array
                   ) -> tuple[TrainState, Any]:
        step = make_train_step(self.net(m), self.tx(m), self.loss, self.layout,
                               with_own_deltas="delta_norm_own" in self.step_probes)
        return step(state, x, y, key)

    def _epoch_view(self, state: TrainState, m: Members, data: DeviceData
                    ) -> probes.EpochView:
        net, data = self.net(m), self._data(data, m)
        eval_batch = make_eval_fn(net, self.loss)
        params, batch_stats = state.params, state.batch_stats
        train = mean_over_set(eval_batch, params, batch_stats,
                              data.x_train, data.y_train, self.n_train, self.eval_block)
        test = mean_over_set(eval_batch, params, batch_stats,
                             data.x_test, data.y_test, self.n_test, self.eval_block)
        sown = dict.fromkeys(("activation", "slope", "slope_max"), [])
        signals = branches = skips = None
        if CAPTURING & set(self.epoch_probes):  # (only traced when asked for)
            variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats
                                              else {})}
            _, captured = net.apply(variables, data.x_probe, train=False, capture=True,
                                    mutable=["intermediates"])
            inter = captured["intermediates"]
            sown = {k: self.layout.captured(inter, k) for k in sown}
            signals = self.layout.signals(inter)
            if self.layout.blocks is not None:
                branches, skips = self.layout.block_values(inter)
        jacobian_sv = None
        if "jacobian_spectrum" in self.epoch_probes:
            variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats
                                              else {})}
            jacobian_sv = jacobian.singular_values(jacobian.deep_jacobian(
                net, variables, self.layout, data.x_probe[:probes.JACOBIAN_EXAMPLES],
                self.zero_perturbations))
        probe_grads = None
        if {"histograms", "probe_bias_grad_norm"} & set(self.epoch_probes):
            loss_fn = make_loss_fn(net, self.loss)
            perturbations = self.zero_perturbations(data.x_probe)
            probe_key = seed_keys(m.seed).probe
            probe_grads = jax.grad(lambda p: loss_fn(
                p, perturbations, batch_stats, data.x_probe, data.y_probe, probe_key)[0])(params)
        return probes.EpochView(
            params, *train, *test, acts=sown["activation"], slopes=sown["slope"],
            slope_max=sown["slope_max"], probe_grads=probe_grads,
            sat_threshold=m.knobs["record.sat_threshold"], signals=signals,
            branches=branches, skips=skips, jacobian_sv=jacobian_sv)

    def _epoch_stats_one(self, state: TrainState, m: Members, data: DeviceData
                         ) -> dict[str, Array]:
        stats = self._cast(probes.epoch_stats(self._epoch_view(state, m, data), self.layout,
                                              self.epoch_probes))
        # A diverged member's statistics are NaN from its divergence on.
        return _nan_where(state.diverged_at >= 0, stats)

    # -- the shapes of what the probes return (from their declarations, not traced) --

    def axis_sizes(self) -> dict[str, int]:
        blocks = self.layout.blocks
        rec = self.layout.recurrent
        return {"layer": len(self.names), "hidden": len(self.layout.hidden_names),
                "bin": probes.HIST_EDGES.size - 1, "block": blocks.count if blocks else 0,
                "sv_bin": probes.SV_EDGES.size - 1,
                "recurrent": len(rec.names) if rec else 0, "time": rec.steps if rec else 0}

    def step_template(self, lead: tuple[int, ...]) -> dict[str, jax.ShapeDtypeStruct]:
        axes = probes.outputs(probes.STEP_PROBES, self.step_probes)
        return probes.template(axes, self.axis_sizes(), lead, self.dtype)

    def epoch_template(self, lead: tuple[int, ...]) -> dict[str, jax.ShapeDtypeStruct]:
        return probes.template(probes.epoch_outputs(self.epoch_probes), self.axis_sizes(),
                               lead, self.dtype)

    def _cast(self, stats: dict[str, Array]) -> dict[str, Array]:
        """Statistics in the run's dtype (the records keep float64 runs' precision)."""
        return {k: v.astype(self.dtype) for k, v in stats.items()}

    # -- batched over members --

    def start(self, members: Members, data: DeviceData) -> TrainState:
        """Initial states of all members.

        The statistics at initialisation come from the first chunk (see ``chunk``), so
        that the epoch probes are compiled into one program only.
        """
        return jax.vmap(self._start_one)(members)

    def epoch_stats(self, state: TrainState, members: Members, data: DeviceData,
                    clipped_steps: Array | None = None) -> dict[str, Array]:
        """Statistics at an epoch boundary, [M, ...]; ``clip_frac`` is the fraction of the
        epoch's steps whose gradient clipping changed (NaN at initialisation: pass None
        or NaN ``clipped_steps``)."""
        stats = jax.vmap(self._epoch_stats_one, in_axes=(0, 0, None))(state, members, data)
        clip_frac = (jnp.full(state.diverged_at.shape, jnp.nan) if clipped_steps is None
                     else clipped_steps / self.plan.steps_per_epoch)
        stats["clip_frac"] = jnp.where(state.diverged_at >= 0, jnp.nan,
                                       clip_frac).astype(self.dtype)
        return stats

    def permutations(self, members: Members, epoch: Array) -> Array:
        """Each member's order of the training set in ``epoch``, [M, n_train]."""
        return jax.vmap(lambda s: shuffle(jax.random.fold_in(seed_keys(s).shuffle, epoch),
                                          self.n_train))(members.seed)

    def step(self, state: TrainState, members: Members, perms: Array, epoch: Array, i: Array,
             data: DeviceData) -> StepResult:
        """Step i of ``epoch`` for all members, and its statistics if the step is recorded."""
        plan = self.plan
        gstep = epoch * plan.steps_per_epoch + i
        idx = jax.lax.dynamic_slice_in_dim(perms, i * self.batch_size, self.batch_size, axis=1)
        noise = jax.vmap(lambda s: jax.random.fold_in(seed_keys(s).noise, gstep))(members.seed)
        alive = state.diverged_at < 0
        x, y = self._batch(data, members, idx)
        state, out = jax.vmap(self._train_one)(members, state, x, y, noise)

        def measure(o):
            return jax.vmap(lambda oo: self._cast(
                probes.step_stats(oo, self.layout, self.step_probes)))(o)

        if plan.record_every == 1:
            stats = measure(out)
        else:
            template = self.step_template((len(x),))
            stats = jax.lax.cond(gstep % plan.record_every == 0, measure,
                                 lambda o: _nan_like(template), out)
        fired = jax.vmap(lambda o: probes.clip_stats(o, self.layout)["clip_fired"])(out)
        fired = fired.astype(self.dtype)
        return StepResult(state, _nan_where(~alive, stats), jnp.where(alive, fired, 0.0),
                          out.grads)

    def chunk(self, state: TrainState, members: Members, epoch0: Array, data: DeviceData,
              n_epochs: int) -> tuple[TrainState, dict[str, Array], dict[str, Array], Any]:
        """Train epochs epoch0 ... epoch0 + n_epochs - 1.

        Returns the new state, the statistics of every step ([M, n_epochs * P, ...]; NaN
        where a step is not recorded), those at the chunk's n_epochs + 1 epoch boundaries
        ([M, n_epochs + 1, ...]: the first, before any training, is measured only when
        epoch0 = 0 and NaN otherwise, as the previous chunk measured it) and, with
        ``record.full_grads_every=K``, the gradients of the chunk's steps that are
        multiples of K ([M, n_snapshots, ...] per parameter; None otherwise).

        The scan runs over the n_epochs + 1 boundaries: measure, then train the next
        epoch unless it is the last boundary. Each of the two appears once in the program,
        so XLA compiles the epoch probes and the training step once each.
        """
        P, K = self.plan.steps_per_epoch, self.snapshot_every
        first_snap = -(-epoch0 * P // K) * K if K else 0
        snaps = jax.tree.map(lambda p: jnp.zeros((-(-n_epochs * P // K),) + p.shape, p.dtype),
                             state.params) if K else None

        def keep_snapshot(snaps, gstep, grads):
            def write(b):
                row = (gstep - first_snap) // K
                return jax.tree.map(lambda bb, g: bb.at[row].set(g), b, grads)
            return jax.lax.cond(gstep % K == 0, write, lambda b: b, snaps)

        def train_epoch(state, snaps, epoch):
            perms = self.permutations(members, epoch)

            def step_body(carry, i):
                state, snaps, clipped = carry
                res = self.step(state, members, perms, epoch, i, data)
                if K:
                    snaps = keep_snapshot(snaps, epoch * P + i, res.grads)
                return (res.state, snaps, clipped + res.clip_fired), res.stats

            clipped = jnp.zeros(state.diverged_at.shape, self.dtype)
            (state, snaps, clipped), rows = jax.lax.scan(step_body, (state, snaps, clipped),
                                                         jnp.arange(P))
            return state, snaps, clipped, rows

        M = state.diverged_at.shape[0]
        rows_template = self.step_template((P, M))
        stats_template = self.epoch_template((M,))

        def measure(state, clipped):
            return self.epoch_stats(state, members, data, clipped)

        def boundary(carry, k):
            state, snaps, clipped = carry  # clipped: steps clipped in the epoch just ended
            stats = jax.lax.cond((k > 0) | (epoch0 == 0), measure,
                                 lambda *_: _nan_like(stats_template), state, clipped)
            state, snaps, clipped, rows = jax.lax.cond(
                k < n_epochs, train_epoch,
                lambda s, b, _: (s, b, jnp.zeros_like(clipped), _nan_like(rows_template)),
                state, snaps, epoch0 + k)
            return (state, snaps, clipped), (rows, stats)

        no_steps = jnp.full(state.diverged_at.shape, jnp.nan, self.dtype)  # at boundary 0
        (state, snaps, _), (rows, epochs) = jax.lax.scan(
            boundary, (state, snaps, no_steps), jnp.arange(n_epochs + 1))
        # [n_epochs + 1, P, M, ...] (the last boundary trains nothing) -> [M, n_epochs * P, ...]
        rows = jax.tree.map(lambda r: jnp.moveaxis(r[:-1].reshape((-1,) + r.shape[2:]), 0, 1),
                            rows)
        epochs = jax.tree.map(lambda e: jnp.moveaxis(e, 0, 1), epochs)  # -> [M, n_epochs + 1]
        if K:
            snaps = jax.tree.map(lambda b: jnp.moveaxis(b, 0, 1), snaps)
        return state, rows, epochs, snaps


def _nan_like(template: Any) -> Any:
    return jax.tree.map(lambda t: jnp.full(t.shape, jnp.nan, t.dtype), template)


def _nan_where(cond: Array, stats: dict[str, Array]) -> dict[str, Array]:
    """NaN where ``cond`` (per seed, broadcast over each statistic's trailing axes)."""
    def mask(v):
        if not jnp.issubdtype(v.dtype, jnp.floating):
            return v
        c = jnp.reshape(cond, jnp.shape(cond) + (1,) * (v.ndim - jnp.ndim(cond)))
        return jnp.where(c, jnp.nan, v)

    return {k: mask(v) for k, v in stats.items()}


# --- compiled programs (cached per configuration) ---------------------------------------------


class Compiled:
    """A :class:`Program` with its jitted entry points, compiled ahead of time.

    The initialisation and chunk programs are traced and compiled one after the other.
    The chunk program is compiled once per distinct chunk length (one, unless
    ``record.chunk_epochs`` does not divide ``epochs``); ``compile_s`` accumulates.
    """

    def __init__(self, prog: Program, members: Members, data: DeviceData, mesh: Mesh):
        self.program = prog
        self.mesh = mesh
        self.compile_s = 0.0
        # Every output has the member axis first and stays split along it (without this,
        # XLA may replicate outputs that do not depend on the member, such as zero biases).
        by_member = NamedSharding(mesh, PartitionSpec("members"))

        def jit(fn: Callable, **kwargs: Any) -> Any:
            return jax.jit(_traced_at(prog.matmul_precision, fn), out_shardings=by_member,
                           compiler_options=compiler_options(), **kwargs)

        self._chunk_jit = jit(prog.chunk, static_argnums=4, donate_argnums=0)
        self._members, self._data = members, data
        t0 = time.perf_counter()
        start = jit(prog.start).lower(members, data)
        self._state = shard_members(jax.tree.map(
            lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype), start.out_info), mesh)
        n = prog.plan.chunk_epochs
        chunk = self._chunk_jit.lower(self._state, members, jnp.int32(0), data, n)
        # One after the other: compiling (and reading JAX's cache) in two threads at once
        # crashed the process in CI (segfaults inside XLA, not reproducible alone).
        self.start, first = start.compile(), chunk.compile()
        self._chunks: dict[int, Any] = {n: first}
        self.compile_s = time.perf_counter() - t0
        # The debugging engine's per-step pieces, compiled on first use (with the same
        # options, so that both engines give the same numbers).
        self.permutations = jit(prog.permutations)
        self.step = jit(prog.step, donate_argnums=0)
        self.epoch_stats = jit(prog.epoch_stats)

    def _compile(self, jitted: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        compiled = jitted.lower(*args).compile()
        self.compile_s += time.perf_counter() - t0
        return compiled

    def chunk(self, n_epochs: int) -> Any:
        """The compiled chunk program for ``n_epochs`` epochs."""
        if n_epochs not in self._chunks:
            self._chunks[n_epochs] = self._compile(
                self._chunk_jit, self._state, self._members, jnp.int32(0), self._data,
                n_epochs)
        return self._chunks[n_epochs]


def _traced_at(precision: str, fn: Callable) -> Callable:
    """``fn`` traced under ``jax.default_matmul_precision(precision)``: a jitted function
    keeps the matrix-product precision of its tracing, whenever it is first called."""
    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        with jax.default_matmul_precision(precision):
            return fn(*args, **kwargs)

    return traced


def compiler_options() -> dict[str, Any]:
    """XLA options for vgrad's programs.

    On CPU, LLVM optimisation level 1 instead of XLA's default 2: it compiles vgrad's
    programs 15-30% faster and they run as fast (measured on the ``visualize`` preset's
    net at 1 and 100 seeds, and a 64-512x4-10 ReLU net: run times within 1%, while level
    0 runs 2.5x slower). Matrix products call Eigen/oneDNN kernels either way, and the
    rest is small fused loops. Other backends keep XLA's defaults, and so does
    ``jax_disable_most_optimizations`` (level 0: the tests' fast compiles).
    """
    if jax.default_backend() != "cpu" or jax.config.read("jax_disable_most_optimizations"):
        return {}
    return {"xla_backend_optimization_level": 1}


#: Compiled programs kept in this process, most recently used last (see MAX_PROGRAMS).
_CACHE: collections.OrderedDict[str, Compiled] = collections.OrderedDict()
#: At most this many compiled programs stay loaded in one process. Each program XLA
#: compiles for the CPU maps about 700 memory regions (LLVM's JIT), and Linux allows a
#: process 65,530 (``vm.max_map_count``): a process that kept every program segfaulted
#: inside XLA's compiler after about 90 of them (seen in the test suite, whose workers
#: train hundreds of programs). Evicting the least recently used program releases them.
MAX_PROGRAMS = 16


def _cache_key(group: Group) -> str:
    """Everything that shapes a group's program: the structure and data shapes of its
    jobs, the families it selects from, the knobs it takes, and the member count."""
    ds = group.datasets[0]
    families = {g: [family(f, g) for f in fs] for g, fs in group.families.items()}
    return json.dumps([structure(group.jobs[0].config),
                       [ds.x_train.shape, ds.x_test.shape, ds.n_classes],
                       families, group.knob_keys, group.n_members, len(group.datasets),
                       jax.default_backend()], sort_keys=True, default=str)


def compile_program(group: Group, members: Members, data: DeviceData,
                    mesh: Mesh) -> tuple[Compiled, bool]:
    """The compiled programs of a group, reused by later groups of this process that
    share its cache key (other knob values, seeds or data values); and whether they
    were reused."""
    key = _cache_key(group) + repr(mesh.devices.tolist())
    reused = key in _CACHE
    if reused:
        _CACHE.move_to_end(key)
    else:
        while len(_CACHE) >= MAX_PROGRAMS:
            _CACHE.popitem(last=False)
        _CACHE[key] = Compiled(Program(group), members, data, mesh)
    return _CACHE[key], reused


# --- running ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Resume:
    """Where an interrupted run stopped: its state and records after ``epochs_done``."""

    epochs_done: int
    state: list[np.ndarray]  # the TrainState's leaves, [S, ...] each
    step: np.ndarray  # [T] recorded steps so far
    step_stats: dict[str, np.ndarray]  # [S, T, ...]
    epoch_stats: dict[str, np.ndarray]  # [S, epochs_done + 1, ...]
    snapshot_step: np.ndarray  # [N]
    snapshots: dict[str, np.ndarray]  # [S, N, ...]


@dataclasses.dataclass
class Records:
    """Everything measured so far for one job, as host numpy arrays (leading axis =
    seeds).

    The chunks' pieces are joined only when an array is first read, so that following a
    run chunk by chunk costs nothing until its records are written.
    """

    seeds: np.ndarray  # [S] seed values
    layer_names: list[str]
    n_params: int
    plan: Plan
    step_parts: list[np.ndarray]  # global steps of the recorded rows, per chunk
    step_stat_parts: list[dict[str, np.ndarray]]  # [S, T_chunk, ...] per chunk
    epoch_parts: list[dict[str, np.ndarray]]  # [S, E_chunk, ...] per chunk
    diverged_at: np.ndarray  # [S], -1 = never
    nonfinite_at_divergence: np.ndarray  # [S, L]
    snapshot_step_parts: list[np.ndarray]
    snapshot_parts: list[dict[str, np.ndarray]]  # "dense_0.kernel" -> [S, N_chunk, ...]
    seed_devices: int  # devices the member axis was split across
    compile_s: float
    run_s: float
    done: bool  # all epochs accounted for (trained, or skipped after every seed diverged)
    state: list[np.ndarray] | None = None  # the TrainState's leaves after the last chunk
    group: dict[str, Any] = dataclasses.field(default_factory=dict)  # id, jobs, members
    #: Parameters to save (record.params): "initial.dense_0.kernel" -> [S, ...], and the
    #: "final." ones once the run is done.
    params: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def step(self) -> np.ndarray:
        """[T] global step of each recorded row."""
        return _cat(self.step_parts)

    @functools.cached_property
    def step_stats(self) -> dict[str, np.ndarray]:
        """Per-step statistics, [S, T, ...]."""
        return _concat(self.step_stat_parts)

    @functools.cached_property
    def epoch_stats(self) -> dict[str, np.ndarray]:
        """Per-epoch statistics, [S, E+1, ...] (0 = initialisation)."""
        return _concat(self.epoch_parts)

    @property
    def epoch(self) -> np.ndarray:
        return np.arange(self.epochs_done + 1)

    @functools.cached_property
    def snapshot_step(self) -> np.ndarray:
        """[N] steps of the full gradient snapshots (record.full_grads_every)."""
        return _cat(self.snapshot_step_parts)

    @functools.cached_property
    def snapshots(self) -> dict[str, np.ndarray]:
        """Full gradient snapshots: "dense_0.kernel" -> [S, N, ...]."""
        return _concat(self.snapshot_parts)

    @property
    def epochs_done(self) -> int:
        return sum(next(iter(p.values())).shape[1] for p in self.epoch_parts) - 1


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    parts = [p for p in parts if p]
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]}


def _nan_rows(template: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: np.full((v.shape[0], n) + v.shape[2:], np.nan, v.dtype)
            for k, v in template.items()}


class _JobRecords:
    """The growing records of one job of a group (its slice of the member axis)."""

    def __init__(self, job: Job, members: slice):
        self.members = members
        self.params: dict[str, np.ndarray] = {}
        self.seeds = job.seeds
        r = job.resume
        self.step_parts = [r.step] if r else []
        self.step_stat_parts = [r.step_stats] if r else []
        self.epoch_parts = [r.epoch_stats] if r else []
        self.snap_steps = [r.snapshot_step] if r and r.snapshots else []
        self.snap_parts = [r.snapshots] if r and r.snapshots else []


def _join_state(fresh: TrainState, jobs: list[Job]) -> TrainState:
    """The group's state, each job's members taken from where it was interrupted."""
    leaves, treedef = jax.tree.flatten(fresh)
    saved = [job.resume.state for job in jobs]
    if any(len(s) != len(leaves) for s in saved):
        raise ValueError("a saved training state does not fit this program")
    joined = [np.concatenate([s[i] for s in saved]).astype(leaf.dtype)
              for i, leaf in enumerate(leaves)]
    for leaf, new in zip(leaves, joined, strict=True):
        if leaf.shape != new.shape:
            raise ValueError("a saved training state does not fit this program")
    return jax.tree.unflatten(treedef, [jax.device_put(x, leaf.sharding)
                                        for x, leaf in zip(joined, leaves, strict=True)])


def run(group: Group, engine: str = "scan", group_id: int = 0) -> Iterator[list[Records]]:
    """Train every member of ``group``; yield each job's records at every chunk boundary.

    The last yielded list has ``done=True``. The caller owns all I/O. The group computes
    in its ``dtype``: JAX's 64-bit mode is on while its programs are traced and run
    (``jax.enable_x64``, thread-local) and off otherwise, whatever ``JAX_ENABLE_X64``
    says, so a float32 run gives the same numbers with or without it.
    """
    steps = _run(group, engine, group_id)
    while True:
        with jax.enable_x64(group.cfg.dtype == "float64"):
            try:
                records = next(steps)
            except StopIteration:
                return
        yield records


def _run(group: Group, engine: str, group_id: int) -> Iterator[list[Records]]:
    if engine not in ("scan", "python"):
        raise ValueError(f"engine={engine!r}: expected scan or python")
    mesh = member_mesh(group.n_members, trains_on_one_device(group))
    data = device_data(group.datasets, group.cfg.record.probe_size, mesh)
    members = shard_members(group.members(), mesh)
    compiled, reused = compile_program(group, members, data, mesh)
    # A reused program's compile time was spent (and recorded) by an earlier group: this
    # group records only what it compiled itself (a new chunk length, say).
    compiled_before = compiled.compile_s if reused else 0.0
    prog, plan = compiled.program, compiled.program.plan
    first_epoch = group.jobs[0].epochs_done
    info = {"id": group_id, "jobs": len(group.jobs), "members": group.n_members,
            "compile_s": compiled.compile_s - compiled_before, "reused_program": reused}

    t0 = time.perf_counter()
    state = compiled.start(members, data)
    if first_epoch:
        state = _join_state(state, group.jobs)
    jobs = [_JobRecords(job, sl) for job, sl in zip(group.jobs, group.slices(), strict=True)]
    keep = set(group.cfg.record.params)

    def save_params(when: str) -> None:
        flat = saved_params(prog.layout, jax.device_get((state.params, state.batch_stats)))
        for j in jobs:
            j.params.update({f"{when}.{k}": v[j.members] for k, v in flat.items()})

    if "initial" in keep and not first_epoch:
        save_params("initial")
    run_s = time.perf_counter() - t0

    def records(done: bool, with_state: bool) -> list[Records]:
        diverged, nonfinite = jax.device_get((state.diverged_at, state.nonfinite_at_divergence))
        leaves = jax.device_get(jax.tree.leaves(state)) if with_state else None
        out = []
        for j in jobs:
            m = j.members
            out.append(Records(
                j.seeds, prog.names, prog.n_params, plan, list(j.step_parts),
                list(j.step_stat_parts), list(j.epoch_parts), np.asarray(diverged)[m],
                np.asarray(nonfinite)[m],
                list(j.snap_steps), list(j.snap_parts), mesh.devices.size,
                compiled.compile_s - compiled_before, run_s, done,
                [np.asarray(x)[m] for x in leaves] if leaves is not None else None, info,
                dict(j.params)))
        return out

    for start in range(first_epoch, plan.epochs, plan.chunk_epochs):
        epochs = range(start, min(start + plan.chunk_epochs, plan.epochs))
        chunk = compiled.chunk(len(epochs))  # compiles only for a new chunk length
        t0 = time.perf_counter()
        if engine == "scan":
            state, rows, epoch_rows, snaps = chunk(state, members, jnp.int32(epochs.start), data)
        else:
            state, rows, epoch_rows, snaps = _python_chunk(compiled, state, members, epochs,
                                                           data)
        # Host sync: the chunk's records come to the host.
        rows, epoch_rows, snaps, diverged = jax.device_get(
            (rows, epoch_rows, snaps, state.diverged_at))
        steps = plan.recorded_steps(epochs)
        local = steps - epochs.start * plan.steps_per_epoch
        # Column 0 holds the statistics at initialisation (measured when epoch 0 is trained).
        first_col = 0 if epochs.start == 0 else 1
        taken = None
        if snaps is not None:
            first, stop = (epochs.start * plan.steps_per_epoch, epochs.stop * plan.steps_per_epoch)
            every = prog.snapshot_every
            taken = np.arange(-(-first // every) * every, stop, every, dtype=np.int64)
            snaps = layers.flat_params(prog.layout, snaps, lead=2)
        for j in jobs:
            m = j.members
            j.step_parts.append(steps)
            j.step_stat_parts.append({k: v[m][:, local] for k, v in rows.items()})
            j.epoch_parts.append({k: v[m][:, first_col:] for k, v in epoch_rows.items()})
            if taken is not None:
                # A diverged seed's snapshots after its divergence are NaN, as its metrics.
                snap = {k: v[m][:, : len(taken)] for k, v in snaps.items()}
                j.snap_parts.append(_nan_after(snap, taken, np.asarray(diverged)[m]))
                j.snap_steps.append(taken)
        run_s += time.perf_counter() - t0
        last = epochs.stop == plan.epochs
        if not last and bool(np.all(diverged >= 0)):
            # Every member has diverged: the rest of the run would only record NaN.
            rest = range(epochs.stop, plan.epochs)
            steps_left = plan.recorded_steps(rest)
            for j in jobs:
                j.step_parts.append(steps_left)
                j.step_stat_parts.append(_nan_rows(j.step_stat_parts[-1], len(steps_left)))
                j.epoch_parts.append(_nan_rows(j.epoch_parts[-1], len(rest)))
            if "final" in keep:
                save_params("final")
            yield records(True, with_state=False)
            return
        if last and "final" in keep:
            save_params("final")
        yield records(last, with_state=not last)


def saved_params(layout: layers.Layout, variables: tuple[Any, Any]) -> dict[str, np.ndarray]:
    """Parameters and batch-norm statistics keyed as in ``grads.npz`` (``dense_0.kernel``,
    ``bn_0.scale``, ``bn_0.mean`` ...), [M, ...] each."""
    params, batch_stats = variables
    return {k: np.asarray(v) for k, v in {
        **layers.flat_params(layout, params, lead=1),
        **layers.flat_params(layout, batch_stats or {}, lead=1)}.items()}


def batch_indices(seed: int, epoch: int, n_train: int, batch_size: int) -> np.ndarray:
    """The training examples of every step of ``epoch`` for ``seed``, [steps, batch]:
    step i of the epoch trains on ``x_train[batch_indices(...)[i]]`` (the last partial
    batch is dropped). What an outside reference needs to replay a run's batches."""
    order = np.asarray(shuffle(jax.random.fold_in(seed_keys(jnp.int32(seed)).shuffle, epoch),
                               n_train))
    steps = n_train // batch_size
    return order[: steps * batch_size].reshape(steps, batch_size)


def _nan_after(snaps: dict[str, np.ndarray], steps: np.ndarray, diverged_at: np.ndarray
               ) -> dict[str, np.ndarray]:
    """Snapshots at or after a seed's divergence step are NaN (the seed is frozen there)."""
    after = (diverged_at[:, None] >= 0) & (steps[None, :] > diverged_at[:, None])
    return {k: np.where(after.reshape(after.shape + (1,) * (v.ndim - 2)), np.nan, v)
            for k, v in snaps.items()}


def _python_chunk(compiled: Compiled, state: TrainState, members: Members, epochs: range,
                  data: DeviceData) -> tuple[TrainState, dict, dict, Any]:
    """The debugging engine: the same step, one jitted dispatch per step."""
    prog = compiled.program
    P, K = prog.plan.steps_per_epoch, prog.snapshot_every
    rows: list[dict] = []
    epoch_rows: list[dict] = []
    snaps: list[Any] = []
    initial = compiled.epoch_stats(state, members, data)
    if epochs.start > 0:
        initial = jax.tree.map(lambda v: jnp.full_like(v, jnp.nan), initial)
    epoch_rows.append(initial)
    for epoch in epochs:
        perms = compiled.permutations(members, jnp.int32(epoch))
        clipped = 0.0
        for i in range(P):
            res = compiled.step(state, members, perms, jnp.int32(epoch), jnp.int32(i), data)
            state = res.state
            rows.append(res.stats)
            clipped = clipped + res.clip_fired
            if K and (epoch * P + i) % K == 0:
                snaps.append(res.grads)
        epoch_rows.append(compiled.epoch_stats(state, members, data, clipped))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs, axis=1), *snaps) if K else None
    return state, _stack_rows(rows), _stack_rows(epoch_rows), stacked


def _stack_rows(parts: list[dict[str, Array]]) -> dict[str, Array]:
    return {k: jnp.stack([p[k] for p in parts], axis=1) for k in parts[0]}
