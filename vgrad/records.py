"""What a run measured, on the host: one :class:`Records` per job, grown chunk by chunk.

The loop (``vgrad.loop``) starts each job's records empty or from its interrupted run
(:class:`Resume`), adds every chunk's rows (:meth:`Records.add_chunk`) and hands the
records as they stand to the caller at every chunk boundary (:meth:`Records.at`); the
writers (``vgrad.store``, ``vgrad.runner``, ``vgrad.tensorboard``) read them. Every array
has the seeds first.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from vgrad import layers
from vgrad.plan import Plan


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


def _no_steps() -> np.ndarray:
    return np.zeros(0, np.int64)


@dataclasses.dataclass(eq=False)
class Records:
    """Everything measured so far for one job, as host numpy arrays (leading axis =
    seeds).

    The chunks' pieces are joined only when an array is first read (and again after a
    chunk is added), so that following a run chunk by chunk costs nothing until its
    records are written.
    """

    seeds: np.ndarray  # [S] seed values
    layer_names: list[str]
    n_params: int
    plan: Plan
    seed_devices: int = 1  # devices the member axis was split across
    group: dict[str, Any] = dataclasses.field(default_factory=dict)  # id, jobs, members
    step_parts: list[np.ndarray] = dataclasses.field(default_factory=list)  # global steps
    step_stat_parts: list[dict[str, np.ndarray]] = dataclasses.field(
        default_factory=list)  # [S, T_chunk, ...] per chunk
    epoch_parts: list[dict[str, np.ndarray]] = dataclasses.field(
        default_factory=list)  # [S, E_chunk, ...] per chunk
    snapshot_step_parts: list[np.ndarray] = dataclasses.field(default_factory=list)
    snapshot_parts: list[dict[str, np.ndarray]] = dataclasses.field(
        default_factory=list)  # "dense_0.kernel" -> [S, N_chunk, ...]
    diverged_at: np.ndarray = dataclasses.field(default_factory=_no_steps)  # [S], -1 = never
    nonfinite_at_divergence: np.ndarray = dataclasses.field(
        default_factory=_no_steps)  # [S, L]
    compile_s: float = 0.0
    run_s: float = 0.0
    done: bool = False  # all epochs accounted for (trained, or skipped after every seed diverged)
    state: list[np.ndarray] | None = None  # the TrainState's leaves after the last chunk
    #: Parameters to save (record.params): "initial.dense_0.kernel" -> [S, ...], and the
    #: "final." ones once the run is done.
    params: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @classmethod
    def begin(cls, seeds: np.ndarray, layer_names: list[str], n_params: int, plan: Plan,
              seed_devices: int = 1, group: dict[str, Any] | None = None,
              resume: Resume | None = None) -> Records:
        """A job's records before its first chunk: empty, or those of its interrupted run."""
        rec = cls(seeds, layer_names, n_params, plan, seed_devices, dict(group or {}))
        if resume is not None:
            rec.add_chunk(resume.step, resume.step_stats, resume.epoch_stats)
            if resume.snapshots:
                rec.add_snapshots(resume.snapshot_step, resume.snapshots)
        return rec

    # -- growing --

    def add_chunk(self, steps: np.ndarray, step_stats: dict[str, np.ndarray],
                  epoch_stats: dict[str, np.ndarray]) -> None:
        """A chunk's recorded steps [T], their statistics [S, T, ...] and its epoch
        boundaries' statistics [S, E, ...]."""
        self.step_parts.append(steps)
        self.step_stat_parts.append(step_stats)
        self.epoch_parts.append(epoch_stats)
        self._forget_joined()

    def add_snapshots(self, steps: np.ndarray, snapshots: dict[str, np.ndarray]) -> None:
        """A chunk's full gradient snapshots: steps [N], "dense_0.kernel" -> [S, N, ...]."""
        self.snapshot_step_parts.append(steps)
        self.snapshot_parts.append(snapshots)
        self._forget_joined()

    def add_skipped(self, epochs: range) -> None:
        """``epochs`` never trained (every seed had diverged): their rows, all NaN."""
        steps = self.plan.recorded_steps(epochs)
        self.add_chunk(steps, _nan_rows(self.step_stat_parts[-1], len(steps)),
                       _nan_rows(self.epoch_parts[-1], len(epochs)))

    def at(self, diverged_at: np.ndarray, nonfinite_at_divergence: np.ndarray,
           compile_s: float, run_s: float, done: bool,
           state: list[np.ndarray] | None = None) -> Records:
        """These records as they stand, with the run's status: a copy that later chunks
        leave unchanged."""
        return dataclasses.replace(
            self, step_parts=list(self.step_parts), step_stat_parts=list(self.step_stat_parts),
            epoch_parts=list(self.epoch_parts),
            snapshot_step_parts=list(self.snapshot_step_parts),
            snapshot_parts=list(self.snapshot_parts), diverged_at=diverged_at,
            nonfinite_at_divergence=nonfinite_at_divergence, compile_s=compile_s,
            run_s=run_s, done=done, state=state, group=self.group, params=dict(self.params))

    def _forget_joined(self) -> None:
        for name in ("step", "step_stats", "epoch_stats", "snapshot_step", "snapshots"):
            self.__dict__.pop(name, None)

    # -- reading --

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


def nan_after(snaps: dict[str, np.ndarray], steps: np.ndarray, diverged_at: np.ndarray
              ) -> dict[str, np.ndarray]:
    """Snapshots after a seed's divergence step are NaN (the seed is frozen there; the
    divergence step's own gradient is kept, as its metrics are)."""
    after = (diverged_at[:, None] >= 0) & (steps[None, :] > diverged_at[:, None])
    return {k: np.where(after.reshape(after.shape + (1,) * (v.ndim - 2)), np.nan, v)
            for k, v in snaps.items()}


def saved_params(layout: layers.Layout, variables: tuple[Any, Any]) -> dict[str, np.ndarray]:
    """Parameters and batch-norm statistics keyed as in ``grads.npz`` (``dense_0.kernel``,
    ``bn_0.scale``, ``bn_0.mean`` ...), [M, ...] each."""
    params, batch_stats = variables
    return {k: np.asarray(v) for k, v in {
        **layers.flat_params(layout, params, lead=1),
        **layers.flat_params(layout, batch_stats or {}, lead=1)}.items()}
