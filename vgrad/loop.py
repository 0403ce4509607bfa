"""The training loop: runs a group's chunks of epochs, one compiled call each.

This is the only module with Python control flow around training. It trains a
:class:`~vgrad.group.Group`: jobs of one structure, whose seeds are the *members* of one
program (a single run is a group of one job). A run is cut into chunks of
``chunk_epochs`` epochs (``vgrad.plan``); one chunk is one call of one compiled program
(``vgrad.program`` traces it, ``vgrad.compiled`` compiles and places it) that trains
every member at once. Python sees only chunk boundaries, where it pulls the chunk's
records to the host (the one device->host sync of a chunk), adds each job's share to
that job's :class:`~vgrad.records.Records` and hands them to the caller, which writes
them. It also continues interrupted jobs from their saved state, and stops early once
every member has diverged.

``engine="python"`` runs the same vmapped step one dispatch per step: a debugging mode
(and the reference the scanned engine is tested against), tens of times slower.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vgrad import layers
from vgrad.compiled import (
    Compiled,
    compile_program,
    device_data,
    member_mesh,
    shard_members,
    trains_on_one_device,
)
from vgrad.group import Group, Job, Members
from vgrad.records import Records, nan_after, saved_params
from vgrad.step import TrainState
from vgrad.views import DeviceData

log = logging.getLogger("vgrad")

Array = jax.Array


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
    for note in prog.notes:  # (what a module instrumented automatically lacks, ...)
        log.info("group %d: %s", group_id, note)
    first_epoch = group.jobs[0].epochs_done
    info = {"id": group_id, "jobs": len(group.jobs), "members": group.n_members,
            "compile_s": compiled.compile_s - compiled_before, "reused_program": reused,
            "notes": list(prog.notes)}

    t0 = time.perf_counter()
    state = compiled.start(members, data)
    if first_epoch:
        state = _join_state(state, group.jobs)
    slices = group.slices()
    jobs = [Records.begin(job.seeds, prog.names, prog.n_params, plan, mesh.devices.size, info,
                          job.resume) for job in group.jobs]
    keep = set(group.cfg.record.params)

    def save_params(when: str) -> None:
        flat = saved_params(prog.layout, jax.device_get((state.params, state.batch_stats)))
        for rec, m in zip(jobs, slices, strict=True):
            rec.params.update({f"{when}.{k}": v[m] for k, v in flat.items()})

    if "initial" in keep and not first_epoch:
        save_params("initial")
    run_s = time.perf_counter() - t0

    def records(done: bool, with_state: bool) -> list[Records]:
        diverged, nonfinite = jax.device_get((state.diverged_at, state.nonfinite_at_divergence))
        leaves = jax.device_get(jax.tree.leaves(state)) if with_state else None
        return [rec.at(np.asarray(diverged)[m], np.asarray(nonfinite)[m],
                       compiled.compile_s - compiled_before, run_s, done,
                       [np.asarray(x)[m] for x in leaves] if leaves is not None else None)
                for rec, m in zip(jobs, slices, strict=True)]

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
        for rec, m in zip(jobs, slices, strict=True):
            rec.add_chunk(steps, {k: v[m][:, local] for k, v in rows.items()},
                          {k: v[m][:, first_col:] for k, v in epoch_rows.items()})
            if taken is not None:
                # A diverged seed's snapshots after its divergence are NaN, as its metrics.
                snap = {k: v[m][:, : len(taken)] for k, v in snaps.items()}
                rec.add_snapshots(taken, nan_after(snap, taken, np.asarray(diverged)[m]))
        run_s += time.perf_counter() - t0
        last = epochs.stop == plan.epochs
        if not last and bool(np.all(diverged >= 0)):
            # Every member has diverged: the rest of the run would only record NaN.
            for rec in jobs:
                rec.add_skipped(range(epochs.stop, plan.epochs))
            if "final" in keep:
                save_params("final")
            yield records(True, with_state=False)
            return
        if last and "final" in keep:
            save_params("final")
        yield records(last, with_state=not last)


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
