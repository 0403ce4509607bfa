"""The traced program of a group: training steps, epoch boundaries and chunks.

A group (``vgrad.group``) trains its jobs' seeds, the *members*, as one program. This
module holds that program's functions before jit, batched over members: the random
streams of a seed (:class:`SeedKeys`) and its epochs' order (:func:`shuffle`), one
training step of every member with its statistics (:meth:`Program.step`), the
statistics at an epoch boundary (:meth:`Program.epoch_stats`, on the epoch views of
``vgrad.views``) and a chunk of epochs (:meth:`Program.chunk`):

  for each epoch:   shuffle (one sort of random keys), then lax.scan over its steps:
                      train step -> probes -> write the step's row into a buffer
                    epoch probes (full-set evaluation, weights, probe batch)

Every chunk has the same shapes, so the chunk program compiles once: the epoch index
is a traced argument, epochs past the end of the run are skipped by a ``lax.cond`` on
it, and statistics that are not due at a step (``record.every``) are skipped by a
``lax.cond`` on the step index. Both predicates are the same for every member, so under
``vmap`` they remain real branches rather than computing both sides.

The program computes what the chosen probes need and nothing else (``Probe.needs``),
and builds each member's network and optimizer through its group
(:meth:`~vgrad.group.Group.network`, :meth:`~vgrad.group.Group.transforms`).
Compiling it, placing its inputs and caching it is ``vgrad.compiled``'s work.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vgrad import models, noise, optim, probes, views
from vgrad.group import Group, Members
from vgrad.plan import Plan, make_plan
from vgrad.step import TrainState, init_state, make_train_step, perturbation_zeros
from vgrad.views import DeviceData

Array = jax.Array


def count_params(net: Any, n_features: int) -> int:
    """The parameters of ``net`` on inputs of ``n_features`` (from shapes, nothing run)."""
    shapes = jax.eval_shape(lambda: net.init({"params": jax.random.key(0),
                                               "noise": jax.random.key(0)},
                                              jnp.zeros((1, n_features))))
    return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes["params"]))


#: The step probes built on per-example gradients (``vgrad.noise``).
PER_EXAMPLE = ("gradient_noise", "alpha")


def _no_per_example_grads(net: Any, layout: Any, batch: int, n_features: int, dtype: Any
                          ) -> str | None:
    """Why per-example gradients cannot be measured on ``net`` (None: they can): batch
    norm in training mode couples the examples, and only ``nn.Dense`` and ``nn.Conv``
    layers are tapped (``vgrad.noise``)."""
    x = jnp.zeros((batch, n_features), dtype)
    shapes = jax.eval_shape(lambda: noise.Tapped(net).init(
        {"params": jax.random.key(0), "noise": jax.random.key(0)}, x))
    if jax.tree.leaves(shapes.get("batch_stats", {})):
        return ("batch norm in training mode makes each example's loss depend on the "
                "others, so per-example gradients are not defined (delta_norm_own "
                "measures each example's own delta)")
    missing = noise.untapped(layout, shapes.get("perturbations", {}))
    if missing:
        return ("per-example gradients are computed for nn.Dense and nn.Conv layers "
                "(not grouped or masked convolutions) only, and "
                f"{', '.join(dict.fromkeys(missing))} "
                f"{'is' if len(set(missing)) == 1 else 'are'} not")
    return None


# --- random streams ---------------------------------------------------------------------------


def shuffle(key: Array, n: int) -> Array:
    """A random permutation of range(n) from one sort of random bits.

    ``jax.random.permutation`` guarantees uniformity with extra rounds and was about a
    third of the step time of small nets here; one argsort of 32 random bits is 5x
    cheaper, and ties (probability ~ n^2 / 2^33) only keep two examples in order.
    """
    return jnp.argsort(jax.random.bits(key, (n,), jnp.uint32))


class SeedKeys(NamedTuple):
    """Per-seed random streams, derived from the seed value alone, so that a seed draws
    the same numbers whatever job or group it trains in."""

    init: Array  # parameter initialisation
    shuffle: Array  # epoch e's order: fold_in(shuffle, e)
    noise: Array  # stochastic layers (RReLU) at step t: fold_in(noise, t)
    probe: Array  # stochastic layers in the probe-batch gradient at epoch boundaries


def seed_keys(seed: Array) -> SeedKeys:
    """The random streams of ``seed``."""
    return SeedKeys(*jax.random.split(jax.random.key(seed), 4))


def batch_indices(seed: int, epoch: int, n_train: int, batch_size: int) -> np.ndarray:
    """The training examples of every step of ``epoch`` for ``seed``, [steps, batch]:
    step i of the epoch trains on ``x_train[batch_indices(...)[i]]`` (the last partial
    batch is dropped). What an outside reference needs to replay a run's batches."""
    order = np.asarray(shuffle(jax.random.fold_in(seed_keys(jnp.int32(seed)).shuffle, epoch),
                               n_train))
    steps = n_train // batch_size
    return order[: steps * batch_size].reshape(steps, batch_size)


# --- the program ------------------------------------------------------------------------------


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
    traced functions, from those values (by the group).

    ``vmap`` is applied to the per-member pieces (step, probes, evaluation) inside the
    scans, not around them: the control flow stays unbatched, so its predicates are
    plainly shared by all members and tracing does not re-batch whole loop bodies.

    ``devices``: how many devices the member axis is split across (evaluation blocks
    are sized for the members of one device).
    """

    def __init__(self, group: Group, devices: int = 1):
        cfg = group.cfg
        self.group = group
        self.loss = cfg.loss.value
        ds = group.datasets[0]
        self.n_features = ds.n_features
        self.dtype = jnp.dtype(cfg.dtype)
        self.layout = models.layout(cfg, ds.n_features)
        self.names = self.layout.names
        template = jax.tree.map(lambda a: a[0], group.members())
        net = group.network(template)
        self.n_params = count_params(net, ds.n_features)
        self.plan: Plan = make_plan(cfg, len(ds.x_train), self.n_params, group.n_members)
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
        #: What the run leaves unmeasured, and why (the log and ``summary.json`` say it).
        self.notes: tuple[str, ...] = self.layout.notes
        per_example = [p for p in PER_EXAMPLE if p in self.step_probes]
        why = per_example and _no_per_example_grads(net, self.layout, cfg.batch_size,
                                                    ds.n_features, self.dtype)
        if why:
            self.step_probes = tuple(p for p in self.step_probes if p not in PER_EXAMPLE)
            self.notes += (f"{' and '.join(per_example)} not recorded: {why}",)
        # What the chosen probes need computed for them, beyond the step's outputs.
        self.step_needs = probes.needs(probes.STEP_PROBES, self.step_probes)
        # Activations an example holds in evaluation: its Dense outputs (at every time
        # step of a recurrent net), twice (the elementwise results beside them); for the
        # members on one device of the group's mesh.
        block = views.eval_block(2 * models.activation_units(cfg, ds.n_features),
                                 group.n_members // devices,
                                 self.dtype.itemsize)
        self.view = views.ViewSpec(
            self.layout, self.loss, probes.needs(probes.EPOCH_PROBES, self.epoch_probes),
            self.n_train, self.n_test, block, perturbation_zeros(net))

    @property
    def eval_block(self) -> int:
        """Examples per evaluation block."""
        return self.view.block

    # -- a member's data --

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

    def _tx(self, m: Members) -> optim.Transforms:
        return self.group.transforms(m, self.plan.total_steps)

    def _start_one(self, m: Members) -> TrainState:
        x = jax.ShapeDtypeStruct((self.batch_size, self.n_features), self.dtype)
        return init_state(self.group.network(m), self._tx(m), seed_keys(m.seed).init, x,
                          len(self.names), with_alpha="alpha" in self.step_needs,
                          with_initial="initial_signals" in self.view.needs)

    def _train_one(self, m: Members, state: TrainState, x: Array, y: Array, key: Array
                   ) -> tuple[TrainState, Any]:
        step = make_train_step(self.group.network(m), self._tx(m), self.loss, self.layout,
                               with_own_deltas="own_deltas" in self.step_needs,
                               with_taps="taps" in self.step_needs,
                               with_alpha="alpha" in self.step_needs)
        return step(state, x, y, key)

    def _train_plain(self, m: Members, state: TrainState, x: Array, y: Array, key: Array
                     ) -> tuple[TrainState, Any]:
        """The same step without its measurements (no delta points, taps or own deltas):
        a step ``record.every`` does not record."""
        step = make_train_step(self.group.network(m), self._tx(m), self.loss, self.layout,
                               with_deltas=False)
        return step(state, x, y, key)

    def _epoch_view(self, state: TrainState, m: Members, data: DeviceData
                    ) -> probes.EpochView:
        return views.epoch_view(self.view, self.group.network(m), state, self._data(data, m),
                                lambda: seed_keys(m.seed).probe,
                                m.knobs["record.sat_threshold"])

    def _epoch_stats_one(self, state: TrainState, m: Members, data: DeviceData
                         ) -> dict[str, Array]:
        stats = self._cast(probes.epoch_stats(self._epoch_view(state, m, data), self.layout,
                                              self.epoch_probes))
        # A diverged member's statistics are NaN from its divergence on.
        return _nan_where(state.diverged_at >= 0, stats)

    # -- the shapes of what the probes return (from their declarations, not traced) --

    def axis_sizes(self) -> dict[str, int]:
        """The lengths of the axes the probes declare: the model's, and the bins'."""
        return {**self.layout.axis_sizes(), **probes.BIN_AXES}

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

        def fired(o):
            if self.group.cfg.clip.name == "none":  # (nothing to compare: no kernels)
                return jnp.zeros(o.loss.shape, self.dtype)
            return jax.vmap(lambda oo: probes.clip_stats(oo, self.layout)["clip_fired"])(
                o).astype(self.dtype)

        def measure(out):
            return jax.vmap(lambda o: self._cast(
                probes.step_stats(o, self.layout, self.step_probes)))(out)

        def not_measured(_):
            return _nan_like(self.step_template((len(x),)))

        def recorded(state):
            state, out = jax.vmap(self._train_one)(members, state, x, y, noise)
            return state, measure(out), fired(out), out.grads

        def plain(state):
            state, out = jax.vmap(self._train_plain)(members, state, x, y, noise)
            return state, not_measured(out), fired(out), out.grads

        if plan.record_every == 1:
            state, stats, clip, grads = recorded(state)
        elif "alpha" in self.step_needs:  # (every step is a start point: all measure)
            state, out = jax.vmap(self._train_one)(members, state, x, y, noise)
            stats = jax.lax.cond(gstep % plan.record_every == 0, measure, not_measured,
                                 out)
            clip, grads = fired(out), out.grads
        else:
            # Only a recorded step computes its deltas and probes: record.every=K costs
            # the probes 1/K (both branches are compiled; the predicate is the same for
            # every member, so under vmap the cond stays a branch).
            state, stats, clip, grads = jax.lax.cond(gstep % plan.record_every == 0,
                                                     recorded, plain, state)
        return StepResult(state, _nan_where(~alive, stats), jnp.where(alive, clip, 0.0),
                          grads)

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
