"""The training loop: chunks of epochs as one compiled ``lax.scan``, vmapped over seeds.

This is the only module with Python control flow around training. A run is cut into
chunks of ``chunk_epochs`` epochs; one chunk is one call of one compiled program that

  for each epoch:   shuffle (one sort of random keys), then lax.scan over its steps:
                      train step -> probes -> write the step's row into a buffer
                    epoch probes (full-set evaluation, weights, probe batch)

for every seed at once (``jax.vmap``). Python sees only chunk boundaries, where it
pulls the chunk's records to the host (the one device->host sync of a chunk), updates
the progress bar and hands the records to the caller, which writes them.

Every chunk has the same shapes, so the chunk program compiles once: the epoch index
is a traced argument, epochs past the end of the run are skipped by a ``lax.cond`` on
it, and statistics that are not due at a step (``record.every``) are skipped by a
``lax.cond`` on the step index. Both predicates are the same for every seed, so under
``vmap`` they remain real branches rather than computing both sides.

``engine="python"`` runs the same vmapped step one dispatch per step: a debugging mode
(and the reference the scanned engine is tested against), tens of times slower.
"""

from __future__ import annotations

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
from omegaconf import OmegaConf

from vgrad import config, losses, model, optim, probes
from vgrad.data import Dataset
from vgrad.step import (
    TrainState,
    init_state,
    make_eval_fn,
    make_loss_fn,
    make_train_step,
    perturbation_zeros,
)

Array = jax.Array

#: Examples per block when evaluating on a full set (bounds activation memory).
EVAL_BLOCK = 4096
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
                                               "rrelu": jax.random.key(0)},
                                              jnp.zeros((1, n_features))))
    return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes["params"]))


def make_plan(cfg: Any, n_train: int, n_params: int) -> Plan:
    """The plan of a validated config.

    ``record.chunk_epochs=0`` picks the largest divisor of ``epochs`` whose work fits
    ``CHUNK_BUDGET``, so that every chunk has the same length and compiles once.
    """
    steps_per_epoch = n_train // cfg.batch_size  # the last partial batch is dropped
    chunk = cfg.record.chunk_epochs
    if chunk == 0:
        epoch_cost = steps_per_epoch * cfg.seeds * (6 * cfg.batch_size * n_params + STEP_OVERHEAD)
        fits = max(1, int(CHUNK_BUDGET // max(epoch_cost, 1)))
        chunk = max(d for d in range(1, cfg.epochs + 1) if cfg.epochs % d == 0 and d <= fits)
    return Plan(steps_per_epoch, cfg.epochs, min(chunk, cfg.epochs), cfg.record.every)


# --- data on the device -----------------------------------------------------------------------


class DeviceData(NamedTuple):
    """Inputs as jit arguments (never baked into the program as constants).

    Full sets are zero-padded to whole evaluation blocks; the padding is never trained
    on (batches index the first n_train rows) and is masked out of evaluations.
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


def device_data(ds: Dataset, probe_size: int, mesh: Mesh) -> DeviceData:
    """The dataset on every device of ``mesh`` (each holds a whole copy)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    arrays = (_pad_to_blocks(ds.x_train, EVAL_BLOCK), _pad_to_blocks(ds.y_train, EVAL_BLOCK),
              _pad_to_blocks(ds.x_test, EVAL_BLOCK), _pad_to_blocks(ds.y_test, EVAL_BLOCK),
              ds.x_train[:probe_size], ds.y_train[:probe_size])
    return DeviceData(*(jax.device_put(a, replicated) for a in arrays))


def seed_mesh(n_seeds: int) -> Mesh:
    """The devices the seed axis is split across: as many as divide ``n_seeds`` evenly
    (all of them when they do), so each device trains an equal share of the seeds."""
    devices = jax.devices()
    count = max(d for d in range(1, len(devices) + 1) if n_seeds % d == 0)
    return Mesh(np.array(devices[:count]), ("seeds",))


def shard_seeds(tree: Any, mesh: Mesh) -> Any:
    """Place (or, for ShapeDtypeStructs, describe) a [S, ...] pytree split along seeds."""
    sharding = NamedSharding(mesh, PartitionSpec("seeds"))

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


def mean_over_set(eval_batch: Callable, params: Any, batch_stats: Any, x: Array, y: Array,
                  n: int) -> tuple[Array, Array]:
    """Mean loss and accuracy over the first n rows of a block-padded set."""
    if n == 0:
        return jnp.float32(jnp.nan), jnp.float32(jnp.nan)
    if x.shape[0] <= EVAL_BLOCK:
        loss, correct = eval_batch(params, batch_stats, x[:n], y[:n])
        return loss.mean(), correct.mean(dtype=jnp.float32)
    blocks = x.shape[0] // EVAL_BLOCK
    loss, correct = jax.lax.map(
        lambda xy: eval_batch(params, batch_stats, *xy),
        (x.reshape(blocks, EVAL_BLOCK, -1), y.reshape(blocks, EVAL_BLOCK)))
    mask = jnp.arange(x.shape[0]).reshape(blocks, EVAL_BLOCK) < n
    return (jnp.where(mask, loss, 0).sum() / n,
            jnp.where(mask, correct, 0).sum(dtype=jnp.float32) / n)


# --- the program ------------------------------------------------------------------------------


class SeedKeys(NamedTuple):
    """Per-seed random streams, derived once from the seed value."""

    init: Array  # parameter initialisation
    shuffle: Array  # epoch e's order: fold_in(shuffle, e)
    noise: Array  # stochastic layers (RReLU) at step t: fold_in(noise, t)
    probe: Array  # stochastic layers in the probe-batch gradient at epoch boundaries


def seed_keys(seed: Array) -> SeedKeys:
    return SeedKeys(*jax.random.split(jax.random.key(seed), 4))


class StepResult(NamedTuple):
    """What one step of all seeds hands back to the loop."""

    state: TrainState
    stats: dict[str, Array]  # recorded statistics, [S, ...]; NaN if the step is not recorded
    clip_fired: Array  # [S] 1.0 where clipping changed the gradient (every step)
    grads: Any  # the gradient pytree, [S, ...] (kept only for full snapshots)


class Program:
    """The functions of one run's configuration, batched over seeds, before jit.

    ``vmap`` is applied to the per-seed pieces (step, probes, evaluation) inside the
    scans, not around them: the control flow stays unbatched, so its predicates are
    plainly shared by all seeds and tracing does not re-batch whole loop bodies.
    """

    def __init__(self, cfg: Any, ds: Dataset):
        loss = cfg.loss.value
        self.names = model.layer_names(cfg.depth)
        self.net = model.build(cfg, losses.out_dim(loss, ds.n_classes))
        self.n_params = count_params(self.net, ds.n_features)
        self.plan = make_plan(cfg, len(ds.x_train), self.n_params)
        self.tx = optim.make(cfg.clip, cfg.optim, len(ds.x_train), self.plan.total_steps)
        self.n_train, self.n_test = len(ds.x_train), len(ds.x_test)
        self.batch_size = cfg.batch_size
        self.sat_threshold = cfg.record.sat_threshold
        self.snapshot_every = cfg.record.full_grads_every
        self.matmul_precision = cfg.matmul_precision
        self.step_probes = tuple(cfg.record.step_probes)
        self.epoch_probes = tuple(cfg.record.epoch_probes)
        self.train_step = jax.vmap(make_train_step(self.net, self.tx, loss, self.names))
        self.eval_batch = make_eval_fn(self.net, loss)
        self.loss_fn = make_loss_fn(self.net, loss)
        self.zero_perturbations = perturbation_zeros(self.net)

    def start(self, seeds: Array, data: DeviceData) -> tuple[TrainState, SeedKeys]:
        """Initial states of all seeds and their random streams.

        The statistics at initialisation come from the first chunk (see ``chunk``), so
        that the epoch probes are compiled into one program only.
        """
        keys = jax.vmap(seed_keys)(seeds)
        x = data.x_train[: self.batch_size]
        state = jax.vmap(lambda k: init_state(self.net, self.tx, k, x, len(self.names)))(
            keys.init)
        return state, keys

    def _epoch_view(self, state: TrainState, probe_key: Array, data: DeviceData
                    ) -> probes.EpochView:
        params, batch_stats = state.params, state.batch_stats
        train = mean_over_set(self.eval_batch, params, batch_stats,
                              data.x_train, data.y_train, self.n_train)
        test = mean_over_set(self.eval_batch, params, batch_stats,
                             data.x_test, data.y_test, self.n_test)
        hidden = range(len(self.names) - 1)
        sown = dict.fromkeys(f"{k}_{i}" for k in ("activation", "slope", "slope_max")
                             for i in hidden)
        if "activation_stats" in self.epoch_probes:  # (only traced when asked for)
            variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats
                                              else {})}
            _, captured = self.net.apply(variables, data.x_probe, train=False, capture=True,
                                         mutable=["intermediates"])
            sown = {k: v[0] for k, v in captured["intermediates"].items()}
        probe_grads = None
        if {"histograms", "probe_bias_grad_norm"} & set(self.epoch_probes):
            perturbations = self.zero_perturbations(data.x_probe)
            probe_grads = jax.grad(lambda p: self.loss_fn(
                p, perturbations, batch_stats, data.x_probe, data.y_probe, probe_key)[0])(params)
        return probes.EpochView(
            params, *train, *test,
            acts=[sown[f"activation_{i}"] for i in hidden],
            slopes=[sown[f"slope_{i}"] for i in hidden],
            slope_max=[sown[f"slope_max_{i}"] for i in hidden],
            probe_grads=probe_grads, sat_threshold=self.sat_threshold)

    def _epoch_stats_one(self, state: TrainState, probe_key: Array, data: DeviceData
                         ) -> dict[str, Array]:
        stats = probes.epoch_stats(self._epoch_view(state, probe_key, data), self.names,
                                   self.epoch_probes)
        # A diverged seed's statistics are NaN from its divergence on.
        return _nan_where(state.diverged_at >= 0, stats)

    def epoch_stats(self, state: TrainState, keys: SeedKeys, data: DeviceData,
                    clipped_steps: Array | None = None) -> dict[str, Array]:
        """Statistics at an epoch boundary, [S, ...]; ``clip_frac`` is the fraction of the
        epoch's steps whose gradient clipping changed (NaN at initialisation: pass None
        or NaN ``clipped_steps``)."""
        stats = jax.vmap(self._epoch_stats_one, in_axes=(0, 0, None))(state, keys.probe, data)
        clip_frac = (jnp.full(state.diverged_at.shape, jnp.nan) if clipped_steps is None
                     else clipped_steps / self.plan.steps_per_epoch)
        stats["clip_frac"] = jnp.where(state.diverged_at >= 0, jnp.nan,
                                       clip_frac).astype(jnp.float32)
        return stats

    def permutations(self, keys: SeedKeys, epoch: Array) -> Array:
        """Each seed's order of the training set in ``epoch``, [S, n_train]."""
        return jax.vmap(lambda k: shuffle(jax.random.fold_in(k, epoch), self.n_train))(
            keys.shuffle)

    def step(self, state: TrainState, keys: SeedKeys, perms: Array, epoch: Array, i: Array,
             data: DeviceData) -> StepResult:
        """Step i of ``epoch`` for all seeds, and its statistics if the step is recorded."""
        plan = self.plan
        gstep = epoch * plan.steps_per_epoch + i
        idx = jax.lax.dynamic_slice_in_dim(perms, i * self.batch_size, self.batch_size, axis=1)
        noise = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys.noise, gstep)
        alive = state.diverged_at < 0
        state, out = self.train_step(state, data.x_train[idx], data.y_train[idx], noise)

        def measure(o):
            return jax.vmap(lambda oo: probes.step_stats(oo, self.names, self.step_probes))(o)

        if plan.record_every == 1:
            stats = measure(out)
        else:
            template = jax.eval_shape(measure, out)
            stats = jax.lax.cond(
                gstep % plan.record_every == 0, measure,
                lambda o: jax.tree.map(lambda t: jnp.full(t.shape, jnp.nan, t.dtype), template),
                out)
        fired = jax.vmap(lambda o: probes.clip_stats(o, self.names)["clip_fired"])(out)
        return StepResult(state, _nan_where(~alive, stats), jnp.where(alive, fired, 0.0),
                          out.grads)

    def chunk(self, state: TrainState, keys: SeedKeys, epoch0: Array, data: DeviceData,
              n_epochs: int) -> tuple[TrainState, dict[str, Array], dict[str, Array], Any]:
        """Train epochs epoch0 ... epoch0 + n_epochs - 1.

        Returns the new state, the statistics of every step ([S, n_epochs * P, ...]; NaN
        where a step is not recorded), those at the chunk's n_epochs + 1 epoch boundaries
        ([S, n_epochs + 1, ...]: the first, before any training, is measured only when
        epoch0 = 0 and NaN otherwise, as the previous chunk measured it) and, with
        ``record.full_grads_every=K``, the gradients of the chunk's steps that are
        multiples of K ([S, n_snapshots, ...] per parameter; None otherwise).

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
            perms = self.permutations(keys, epoch)

            def step_body(carry, i):
                state, snaps, clipped = carry
                res = self.step(state, keys, perms, epoch, i, data)
                if K:
                    snaps = keep_snapshot(snaps, epoch * P + i, res.grads)
                return (res.state, snaps, clipped + res.clip_fired), res.stats

            clipped = jnp.zeros(state.diverged_at.shape, jnp.float32)
            (state, snaps, clipped), rows = jax.lax.scan(step_body, (state, snaps, clipped),
                                                         jnp.arange(P))
            return state, snaps, clipped, rows

        rows_template = jax.eval_shape(lambda s, b: train_epoch(s, b, epoch0)[3], state, snaps)

        def measure(state, clipped):
            return self.epoch_stats(state, keys, data, clipped)

        stats_template = jax.eval_shape(measure, state, jnp.zeros(state.diverged_at.shape))

        def boundary(carry, k):
            state, snaps, clipped = carry  # clipped: steps clipped in the epoch just ended
            stats = jax.lax.cond((k > 0) | (epoch0 == 0), measure,
                                 lambda *_: _nan_like(stats_template), state, clipped)
            state, snaps, clipped, rows = jax.lax.cond(
                k < n_epochs, train_epoch,
                lambda s, b, _: (s, b, jnp.zeros_like(clipped), _nan_like(rows_template)),
                state, snaps, epoch0 + k)
            return (state, snaps, clipped), (rows, stats)

        no_steps = jnp.full(state.diverged_at.shape, jnp.nan, jnp.float32)  # at boundary 0
        (state, snaps, _), (rows, epochs) = jax.lax.scan(
            boundary, (state, snaps, no_steps), jnp.arange(n_epochs + 1))
        # [n_epochs + 1, P, S, ...] (the last boundary trains nothing) -> [S, n_epochs * P, ...]
        rows = jax.tree.map(lambda r: jnp.moveaxis(r[:-1].reshape((-1,) + r.shape[2:]), 0, 1),
                            rows)
        epochs = jax.tree.map(lambda e: jnp.moveaxis(e, 0, 1), epochs)  # -> [S, n_epochs + 1]
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

    The chunk program is compiled once per distinct chunk length (one, unless
    ``record.chunk_epochs`` does not divide ``epochs``); ``compile_s`` accumulates.
    """

    def __init__(self, prog: Program, seeds: Array, data: DeviceData, mesh: Mesh):
        self.program = prog
        self.mesh = mesh
        self.compile_s = 0.0
        # Every output has the seed axis first and stays split along it (without this,
        # XLA may replicate outputs that do not depend on the seed, such as zero biases).
        by_seed = NamedSharding(mesh, PartitionSpec("seeds"))
        def jit(fn: Callable, **kwargs: Any) -> Any:
            return jax.jit(_traced_at(prog.matmul_precision, fn), out_shardings=by_seed,
                           compiler_options=compiler_options(), **kwargs)

        self._chunk_jit = jit(prog.chunk, static_argnums=4, donate_argnums=0)
        self._chunks: dict[int, Any] = {}
        self.start = self._compile(jit(prog.start), seeds, data)
        self._state, self._keys = shard_seeds(jax.eval_shape(prog.start, seeds, data), mesh)
        self._data = data
        self.chunk(prog.plan.chunk_epochs)
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
                self._chunk_jit, self._state, self._keys, jnp.int32(0), self._data, n_epochs)
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
    programs 15-30% faster and they run as fast (measured on seed 000's net at 1 and
    100 seeds, and a 64-512x4-10 ReLU net: run times within 1%, while level 0 runs
    2.5x slower). Matrix products call Eigen/oneDNN kernels either way, and the rest
    is small fused loops. Other backends keep XLA's defaults.
    """
    return {"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else {}


_CACHE: dict[str, Compiled] = {}


def _cache_key(cfg: Any, ds: Dataset) -> str:
    """Everything that shapes the program: the config except the seed, the data values
    (only the data's shapes matter) and the keys that change nothing computed."""
    c = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for k in ("seed", "data", *config.VOLATILE):
        c.pop(k, None)
    shapes = [ds.x_train.shape, ds.x_test.shape, ds.n_classes]
    return json.dumps([c, shapes, jax.default_backend()], sort_keys=True, default=str)


def compile_program(cfg: Any, ds: Dataset, data: DeviceData, mesh: Mesh) -> Compiled:
    """The compiled programs of a configuration, reused by later runs of this process
    that share every shape-relevant setting (a sweep over seeds or data values)."""
    key = _cache_key(cfg, ds) + repr(mesh.devices.tolist())
    if key not in _CACHE:
        seeds = shard_seeds(jnp.arange(cfg.seeds, dtype=jnp.int32), mesh)
        _CACHE[key] = Compiled(Program(cfg, ds), seeds, data, mesh)
    return _CACHE[key]


# --- running ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Records:
    """Everything measured so far, as host numpy arrays (leading axis = seeds).

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
    seed_devices: int  # devices the seed axis was split across
    compile_s: float
    run_s: float
    done: bool  # all epochs accounted for (trained, or skipped after every seed diverged)

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
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]}


def _nan_rows(template: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: np.full((v.shape[0], n) + v.shape[2:], np.nan, v.dtype)
            for k, v in template.items()}


def flatten_params(tree: Any) -> dict[str, Any]:
    """``{"dense_0": {"kernel": x}}`` -> ``{"dense_0.kernel": x}``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(str(getattr(k, "key", k)) for k in path): v for path, v in leaves}


def run(cfg: Any, ds: Dataset, engine: str = "scan") -> Iterator[Records]:
    """Train ``cfg.seeds`` seeds on ``ds``; yield the records at every chunk boundary.

    The last yielded value has ``done=True``. The caller owns all I/O.
    """
    if engine not in ("scan", "python"):
        raise ValueError(f"engine={engine!r}: expected scan or python")
    mesh = seed_mesh(cfg.seeds)
    data = device_data(ds, cfg.record.probe_size, mesh)
    compiled = compile_program(cfg, ds, data, mesh)
    prog, plan = compiled.program, compiled.program.plan
    seeds = shard_seeds(jnp.arange(cfg.seed, cfg.seed + cfg.seeds, dtype=jnp.int32), mesh)

    t0 = time.perf_counter()
    state, keys = compiled.start(seeds, data)
    epoch_parts: list[dict[str, np.ndarray]] = []
    step_parts: list[dict[str, np.ndarray]] = []
    steps_done: list[np.ndarray] = []
    snap_parts: list[dict[str, np.ndarray]] = []
    snap_steps: list[np.ndarray] = []
    run_s = time.perf_counter() - t0

    def records(done: bool) -> Records:
        diverged, nonfinite = jax.device_get((state.diverged_at, state.nonfinite_at_divergence))
        return Records(
            np.asarray(seeds), prog.names, prog.n_params, plan, list(steps_done),
            list(step_parts), list(epoch_parts), np.asarray(diverged), np.asarray(nonfinite),
            list(snap_steps), list(snap_parts), mesh.devices.size, compiled.compile_s, run_s,
            done)

    for c in range(plan.n_chunks):
        epochs = plan.chunk_epochs_of(c)
        chunk = compiled.chunk(len(epochs))  # compiles only for a new chunk length
        t0 = time.perf_counter()
        if engine == "scan":
            state, rows, epoch_rows, snaps = chunk(state, keys, jnp.int32(epochs.start), data)
        else:
            state, rows, epoch_rows, snaps = _python_chunk(compiled, state, keys, epochs, data)
        # Host sync: the chunk's records come to the host.
        rows, epoch_rows, snaps, diverged = jax.device_get(
            (rows, epoch_rows, snaps, state.diverged_at))
        steps = plan.recorded_steps(epochs)
        local = steps - epochs.start * plan.steps_per_epoch
        step_parts.append({k: v[:, local] for k, v in rows.items()})
        steps_done.append(steps)
        # Column 0 holds the statistics at initialisation (measured by the first chunk).
        epoch_parts.append({k: v[:, (0 if c == 0 else 1):] for k, v in epoch_rows.items()})
        if snaps is not None:
            first, stop = (epochs.start * plan.steps_per_epoch, epochs.stop * plan.steps_per_epoch)
            every = prog.snapshot_every
            taken = np.arange(-(-first // every) * every, stop, every, dtype=np.int64)
            snap_parts.append({k: v[:, : len(taken)] for k, v in flatten_params(snaps).items()})
            snap_steps.append(taken)
        run_s += time.perf_counter() - t0
        last = c == plan.n_chunks - 1
        if not last and bool(np.all(diverged >= 0)):
            # Every seed has diverged: the rest of the run would only record NaN.
            rest = range(epochs.stop, plan.epochs)
            steps_left = plan.recorded_steps(rest)
            step_parts.append(_nan_rows(step_parts[-1], len(steps_left)))
            steps_done.append(steps_left)
            epoch_parts.append(_nan_rows(epoch_parts[-1], len(rest)))
            yield records(True)
            return
        yield records(last)


def _python_chunk(compiled: Compiled, state: TrainState, keys: SeedKeys, epochs: range,
                  data: DeviceData) -> tuple[TrainState, dict, dict, Any]:
    """The debugging engine: the same step, one jitted dispatch per step."""
    prog = compiled.program
    P, K = prog.plan.steps_per_epoch, prog.snapshot_every
    rows: list[dict] = []
    epoch_rows: list[dict] = []
    snaps: list[Any] = []
    initial = compiled.epoch_stats(state, keys, data)
    if epochs.start > 0:
        initial = jax.tree.map(lambda v: jnp.full_like(v, jnp.nan), initial)
    epoch_rows.append(initial)
    for epoch in epochs:
        perms = compiled.permutations(keys, jnp.int32(epoch))
        clipped = 0.0
        for i in range(P):
            res = compiled.step(state, keys, perms, jnp.int32(epoch), jnp.int32(i), data)
            state = res.state
            rows.append(res.stats)
            clipped = clipped + res.clip_fired
            if K and (epoch * P + i) % K == 0:
                snaps.append(res.grads)
        epoch_rows.append(compiled.epoch_stats(state, keys, data, clipped))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs, axis=1), *snaps) if K else None
    return state, _stack_rows(rows), _stack_rows(epoch_rows), stacked


def _stack_rows(parts: list[dict[str, Array]]) -> dict[str, Array]:
    return {k: jnp.stack([p[k] for p in parts], axis=1) for k in parts[0]}
