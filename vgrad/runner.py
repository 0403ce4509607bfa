"""Train jobs and write their run folders: where the loop's records become files.

Both entry points use it: a single run (``python -m vgrad.train``) is a group of one job,
and vgrad's Hydra launcher (``hydra_plugins/vgrad_launcher``) hands it every job of a
sweep, grouped by structure (``vgrad.group``).

A run folder is written after the first chunk, then at most every
``record.save_every_s`` seconds, and at the end (``vgrad.store`` writes each file
atomically, metrics before the summary, which readers trust). While a run goes, its
folder also holds ``checkpoint.npz``, the training state of the last written chunk, so
that running the same command again continues where a kill stopped it.

SIGINT (Ctrl-C) and SIGTERM stop training at the next chunk boundary: the chunks trained
so far are written with ``status: interrupted`` and :class:`Interrupted` is raised (the
command line turns it into one line and exit status 130 or 143). A second signal stops
at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from omegaconf import OmegaConf

from vgrad import config, data, loop, store, views
from vgrad.errors import ConfigError
from vgrad.group import Group, Job, group_jobs, resolved
from vgrad.records import Records, Resume

log = logging.getLogger("vgrad")


@dataclass
class Outcomes:
    """What happened to the jobs of this process, for the command line's last lines and
    exit status. (Kept here, not in ``vgrad.train``, which also runs as ``__main__``.)"""

    #: Jobs vgrad's launcher has trained: run folder -> status.
    trained: dict[Path, str] = field(default_factory=dict)
    #: The errors of jobs whose program crashed: run folder -> one line.
    errors: dict[Path, str] = field(default_factory=dict)
    #: Jobs that failed: run folder, one-line error, and whether it was bad input.
    failed: list[tuple[Path, str, bool]] = field(default_factory=list)
    #: Statuses of the jobs that ended (trained now or before).
    ended: list[str] = field(default_factory=list)
    #: The signal that stopped training, if one did.
    interrupted: list[Interrupted] = field(default_factory=list)


OUTCOMES = Outcomes()


class Interrupted(Exception):  # noqa: N818 (what happened, not an error)
    """Training stopped on a signal after writing what it had trained."""

    def __init__(self, signum: int, run_dirs: list[Path]):
        self.signum, self.run_dirs = signum, run_dirs
        name = signal.Signals(signum).name
        kept = (f"{len(run_dirs)} run(s) keep what they trained (status interrupted)"
                if run_dirs else "the jobs trained so far ended; the others did not start")
        super().__init__(f"{name}: stopped; {kept}; run the same command again to continue")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class DifferentRun(ConfigError):
    """A run folder already holds results of another config, or a ``summary.json`` vgrad
    cannot read as a run of this config: never overwritten."""

    def __init__(self, run_dir: Path, differences: list[str] | None, why: str = ""):
        if differences is not None:
            shown = ", ".join(differences[:4]) + (" ..." if len(differences) > 4 else "")
            why = f"it holds a run of another config ({shown})"
        super().__init__("run folder", str(run_dir),
                         f"an empty folder or one holding this config's run; {why}; choose "
                         "another hydra.run.dir or hydra.sweep.dir")


def foreign_summary(summary: Any) -> str | None:
    """Why a parsed ``summary.json`` is not one vgrad may overwrite or resume, or None."""
    if not isinstance(summary, dict) or not isinstance(summary.get("config"), dict):
        return f"its {store.SUMMARY} is not a vgrad run summary"
    if summary.get("status") not in store.STATUSES:
        return (f"its {store.SUMMARY} has status {summary.get('status')!r}, which vgrad "
                "does not write")
    return None


#: Seconds a second signal leaves the process to stop by itself before it is ended.
HARD_STOP_S = 2.0


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Callable[[], int | None]]:
    """While active, SIGINT and SIGTERM are noted rather than raised; yields a function
    returning the first signal received (None if none).

    A second signal acts at once: the previous handler is back (SIGINT raises
    KeyboardInterrupt, SIGTERM ends the process), and, should the main thread be stuck
    in native code where no Python handler runs (a program or a transfer that never
    returns), a watcher thread woken through ``signal.set_wakeup_fd`` ends the process
    after :data:`HARD_STOP_S` seconds. Whatever was written stays whole: every file is
    written atomically.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def note(signum: int, frame: Any) -> None:
        received.append(signum)
        signal.signal(signum, previous[signum])

    reader, writer = socket.socketpair()
    writer.setblocking(False)
    old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    left = threading.Event()  # the main thread left this block: it was not stuck
    threading.Thread(target=_end_on_second_signal, args=(reader, left), daemon=True,
                     name="vgrad-second-signal").start()
    for s in previous:
        signal.signal(s, note)
    try:
        yield lambda: received[0] if received else None
    finally:
        left.set()
        for s, handler in previous.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(old_fd)
        writer.close()  # ends the watcher
        reader.close()


def _end_on_second_signal(reader: socket.socket, left: threading.Event) -> None:
    """Count SIGINT and SIGTERM as the C-level handler reports them; on the second, give
    the main thread :data:`HARD_STOP_S` seconds to leave, then end the process."""
    seen = 0
    while True:
        try:
            data = reader.recv(64)
        except OSError:
            return
        if not data:
            return
        for signum in data:
            if signum not in (signal.SIGINT, signal.SIGTERM):
                continue
            seen += 1
            if seen >= 2:
                if left.wait(HARD_STOP_S):
                    return
                name = signal.Signals(signum).name
                os.write(2, f"vgrad: {name} again: stopped at once; the runs keep the chunks "
                            "they wrote (run the same command again to continue)\n".encode())
                os._exit(128 + signum)


def use_compile_cache(path: str | None) -> None:
    """Point JAX's persistent compilation cache at ``path`` (None: leave it off).

    Every program is cached, however fast it compiled: vgrad's compile in seconds, and
    JAX's default (only programs slower than 1 s) would skip most of them.
    """
    if not path:
        return
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".vgrad-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError("compile_cache", path, f"a folder vgrad can write ({exc.strerror}); "
                          "set compile_cache=null to turn the cache off") from None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def device_info() -> dict[str, Any]:
    devices = jax.devices()
    return {"platform": devices[0].platform, "kind": devices[0].device_kind,
            "count": len(devices)}


# --- what a run folder already holds ----------------------------------------------------------


def _same_config(summary: dict[str, Any], cfg: Any) -> list[str]:
    return store.config_diff(config.with_added_keys(summary.get("config") or {}),
                             resolved(cfg), ignore=config.VOLATILE)


def runs_in(sweep_dir: Path) -> dict[str, Any]:
    """Folders of a sweep holding a ``summary.json``: name -> the config of its run (a
    dict), or, for a summary vgrad cannot read as a run (unreadable, unknown status), why
    not (a str: that folder is never taken). Failed runs are left out: a job may take
    their folder."""
    runs: dict[str, Any] = {}
    for path in sorted(Path(sweep_dir).glob(f"*/{store.SUMMARY}")):
        try:
            summary = store.read_summary(path.parent)
        except (OSError, ValueError):
            summary = None
        if (why := foreign_summary(summary)) is not None:
            runs[path.parent.name] = why
        elif summary["status"] != "failed":
            runs[path.parent.name] = summary["config"]
    return runs


def next_free_number(sweep_dir: Path, used: set[str]) -> int:
    """The first job number above every numbered folder of the sweep and every name
    already given to a job."""
    taken = {int(p.name) for p in Path(sweep_dir).iterdir() if p.name.isdigit()}
    taken |= {int(n) for n in used if n.isdigit()}
    return max(taken, default=-1) + 1


def ended_before(run_dir: Path, cfg: Any) -> str | None:
    """The status of an ended run of the same config in ``run_dir`` whose files are
    whole, else None (train it, again if it is damaged). Raises :class:`DifferentRun` if
    the folder holds another config's run, or a ``summary.json`` that is not a vgrad
    run's (unreadable, or of a status vgrad does not write): never overwritten."""
    path = Path(run_dir) / store.SUMMARY
    if not path.exists() and not path.is_symlink():
        return None  # nothing there: train
    try:
        summary = store.read_summary(run_dir)
    except (OSError, ValueError):
        summary = None
    if (why := foreign_summary(summary)) is not None:
        raise DifferentRun(run_dir, None, why)
    status = summary["status"]
    if status != "failed" and (differences := _same_config(summary, cfg)):
        raise DifferentRun(run_dir, differences)
    if status not in store.ENDED:
        return None
    if (damage := store.run_damage(run_dir, summary)) is not None:
        log.warning("%s holds a damaged run of this config (%s): training it again",
                    run_dir, damage)
        return None
    return status


def resume_point(run_dir: Path, cfg: Any) -> Resume | None:
    """Where a run of this config that did not end (killed or interrupted) stopped, if
    its folder holds a loadable checkpoint that agrees with its summary."""
    try:
        summary = store.read_summary(run_dir)
        if summary["status"] not in ("running", "interrupted") or _same_config(summary, cfg):
            return None
        done, leaves = store.read_checkpoint(run_dir)
        if done != summary["epochs_done"] or done < 1:
            return None
        metrics = store.read_metrics(run_dir)
        grads = store.read_npz(run_dir / store.GRADS) if (
            (run_dir / store.GRADS).is_file()) else None
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None
    if store.metrics_damage(run_dir, summary) is not None:
        log.warning("%s: the run's metrics are damaged; training it from the start", run_dir)
        return None
    steps_done = done * summary["steps_per_epoch"]
    step = metrics["step"]
    keep = step < steps_done
    axes = summary["arrays"]
    step_stats = {k: v[:, keep] for k, v in metrics.items()
                  if axes.get(k, [])[:2] == ["seed", "step"]}
    epoch_stats = {k: v[:, : done + 1] for k, v in metrics.items()
                   if axes.get(k, [])[:2] == ["seed", "epoch"]}
    snapshot_step, snapshots = np.zeros(0, np.int64), {}
    if grads is not None:
        kept = grads["step"] < steps_done
        snapshot_step = grads["step"][kept]
        snapshots = {k: v[:, kept] for k, v in grads.items() if k != "step"}
    return Resume(done, leaves, step[keep], step_stats, epoch_stats, snapshot_step,
                       snapshots)


def prepare(cfg: Any, run_dir: Path) -> Job:
    """A validated job with its data loaded. Raises :class:`ConfigError` on bad input,
    a run too large for the machine's memory included."""
    config.validate(cfg)
    check_data_memory(cfg.data)
    ds = data.load(cfg.data)
    config.validate_data(cfg, len(ds.x_train), ds.n_classes)
    job = Job(cfg, Path(run_dir), ds)
    check_memory(job)
    return job


#: Copies of a generated dataset alive while it is made: scikit-learn's float64 arrays,
#: the shuffled split, the scaled float32 arrays.
DATA_COPIES = 4


def check_data_memory(node: Any) -> None:
    """Refuse a generated dataset larger than the host's memory before generating it."""
    floats = data.DATASETS[node.name].floats
    if floats is None:
        return
    need = 8 * DATA_COPIES * floats(node)
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        key = "data.n_samples" if "n_samples" in node else "data.n_train"
        raise ConfigError(key, node[key.split(".")[1]],
                          f"a dataset that fits in memory: generating it needs about "
                          f"{need / 1e9:,.1f} GB, the host's memory is {have / 1e9:,.1f} GB")


def _largest_knob(job: Job, have: int) -> tuple[str, Any]:
    """The key to name in a memory refusal: ``seeds`` when more than one is asked for,
    ``epochs`` when one epoch's records would fit (the run's length is what does not),
    else ``width``."""
    from vgrad.group import member_bytes

    cfg = job.cfg
    if cfg.seeds > 1:
        return "seeds", cfg.seeds
    one_epoch = Job(OmegaConf.merge(cfg, {"epochs": 1}), job.run_dir, job.data)
    if member_bytes(one_epoch) <= have:
        return "epochs", cfg.epochs
    return "width", cfg.width


def machine_memory() -> tuple[int, str]:
    """The memory a run's members share, in bytes, and what it is: the accelerators'
    (all of them: members are spread over the devices), else the host's RAM."""
    devices = jax.devices()
    if devices[0].platform != "cpu":
        limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
        if all(limits):
            return int(sum(limits)), f"{len(devices)} x {devices[0].device_kind}"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "the host's memory"


def check_memory(job: Job) -> None:
    """Refuse, before anything is compiled or allocated, a run whose estimated memory
    (``vgrad.group.member_bytes`` times its seeds) exceeds the machine's: such a run
    would not fail at once but swap, unresponsive, until the kernel ends it."""
    from vgrad.group import member_bytes

    cfg = job.cfg
    itemsize = 8 if cfg.dtype == "float64" else 4
    # Evaluation blocks shrink until all members' activations fit views.EVAL_BYTES per
    # device (one example per block at least).
    evaluation = member_bytes(job) - member_bytes(job, evaluation=False)
    devices = len(jax.devices())
    need = (member_bytes(job, evaluation=False) * cfg.seeds
            + max(min(evaluation * cfg.seeds, views.EVAL_BYTES * devices),
                  evaluation * cfg.seeds // views.EVAL_BLOCK)) * itemsize // 4
    have, what = machine_memory()
    if need > have:
        key, value = _largest_knob(job, have)
        raise ConfigError(key, value, f"a run that fits in memory: {cfg.seeds} seed(s) of this "
                          f"net need about {need / 1e9:,.1f} GB (state, activations, "
                          f"records), {what} is {have / 1e9:,.1f} GB; train fewer seeds per "
                          "run (sweep over seed=...) or a smaller net")


# --- writing ------------------------------------------------------------------------------


class RunFolder:
    """Writes one job's run folder from its records."""

    def __init__(self, job: Job, device: dict[str, Any]):
        self.job, self.device = job, device
        self.config = job.config
        self.board = None
        self.export_s = 0.0
        self.params_written: set[str] = set()
        store.remove_stale_temporaries(job.run_dir)
        if job.cfg.tensorboard:
            from vgrad.tensorboard import TensorBoardExport

            self.board = TensorBoardExport(job.run_dir, job.seeds.tolist(), config=job.config)

    def write(self, rec: Records, status: str) -> None:
        run_dir = self.job.run_dir
        store.write_npz(run_dir / store.METRICS, store.metrics_arrays(rec))
        if rec.snapshot_parts:
            store.write_npz(run_dir / store.GRADS, store.grads_arrays(rec))
        if rec.params and set(rec.params) != self.params_written:
            saved = {}
            if self.job.resume is not None and (run_dir / store.PARAMS).is_file():
                saved = store.read_npz(run_dir / store.PARAMS)  # the initial ones
            store.write_npz(run_dir / store.PARAMS, {**saved, **rec.params})
            self.params_written = set(rec.params)
        ended = status not in ("running", "interrupted")
        if not ended and rec.state is not None:
            store.write_checkpoint(run_dir, rec.epochs_done, rec.state)
        summary = store.make_summary(rec, self.config, status, self.device)
        summary["timing"]["export_s"] = self.export_s
        store.write_json(run_dir / store.SUMMARY, summary)
        if ended:
            (run_dir / store.CHECKPOINT).unlink(missing_ok=True)

    def export(self, rec: Records) -> None:
        if self.board is not None:
            t0 = time.perf_counter()
            self.board.update(rec)
            self.export_s += time.perf_counter() - t0

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def train_group(group: Group, group_id: int = 0, stop: Callable[[], int | None] = lambda: None,
                progress: Callable[[Group, int], None] = lambda g, e: None) -> list[str]:
    """Train a group and write each job's folder; the jobs' final statuses.

    ``progress(group, epochs_done)`` is called at every chunk boundary. Raises
    :class:`Interrupted` when ``stop()`` reports a signal.
    """
    device = device_info()
    folders = [RunFolder(job, device) for job in group.jobs]
    save_every = group.cfg.record.save_every_s
    saved: float | None = None
    statuses = ["running"] * len(group.jobs)
    try:
        for recs in loop.run(group, group_id=group_id):
            done, signum = recs[0].done, stop()
            for folder, rec in zip(folders, recs, strict=True):
                folder.export(rec)
            now = time.monotonic()
            if done or signum or saved is None or now - saved >= save_every:
                for i, (folder, rec) in enumerate(zip(folders, recs, strict=True)):
                    statuses[i] = (store.status_of(rec.diverged_at) if done else
                                   "interrupted" if signum else "running")
                    folder.write(rec, statuses[i])
                saved = now
            progress(group, recs[0].epochs_done)
            if signum and not done:
                raise Interrupted(signum, [job.run_dir for job in group.jobs])
    finally:
        for folder in folders:
            folder.close()
    return statuses


def train_jobs(jobs: list[Job], max_members: int | None = None,
               progress: Callable[[Group, int], None] = lambda g, e: None,
               on_group: Callable[[int, Group, list[str], float], None] | None = None,
               max_jobs: int | None = None) -> dict[Path, str]:
    """Train jobs grouped by structure; each job's final status by run folder.

    A group that crashes records its jobs as ``failed`` with the error and the other
    groups go on. ``on_group(id, group, statuses, seconds)`` is called after each group.
    """
    results: dict[Path, str] = {}
    if jobs:
        use_compile_cache(jobs[0].cfg.compile_cache)
    if os.environ.get("JAX_ENABLE_X64", "").lower() in ("1", "true") and any(
            job.cfg.dtype == "float32" for job in jobs):
        log.warning("JAX_ENABLE_X64 is set, but each run computes in its own dtype: "
                    "dtype=float64 for double precision")
    with stop_on_signals() as stop:
        groups = group_jobs(jobs, max_members, max_jobs)
        for gid, group in enumerate(groups):
            t0 = time.perf_counter()
            try:
                statuses = train_group(group, gid, stop, progress)
            except Interrupted:
                raise
            except Exception as exc:  # a crash is recorded; the other groups go on
                error = f"{type(exc).__name__}: {_first_line(exc)}"
                out_of_memory = _out_of_memory(exc)
                if out_of_memory:
                    error += (f" (the program's {group.n_members} members did not fit "
                              "in memory: train fewer seeds or jobs per program)")
                log.error("group %d (%d jobs) failed: %s", gid, len(group.jobs), error,
                          exc_info=not out_of_memory)  # an allocation needs no traceback
                for job in group.jobs:
                    write_failure(job.run_dir, job.cfg, error)
                    OUTCOMES.errors[job.run_dir] = error
                statuses = ["failed"] * len(group.jobs)
            for job, status in zip(group.jobs, statuses, strict=True):
                results[job.run_dir] = status
            if on_group is not None:
                on_group(gid, group, statuses, time.perf_counter() - t0)
            if gid + 1 < len(groups) and (signum := stop()) is not None:
                raise Interrupted(signum, [])  # the signal came as the group ended
    return results


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: Python's, or XLA's (``RESOURCE_EXHAUSTED``)."""
    return isinstance(exc, MemoryError) or "RESOURCE_EXHAUSTED" in str(exc)


def write_failure(run_dir: Path, cfg: Any, error: str) -> None:
    """Record a job that could not run: ``status: failed`` with its error. When even
    that cannot be written (a full disk, a read-only folder), say so in the log."""
    try:
        store.write_json(Path(run_dir) / store.SUMMARY, {
            "status": "failed",
            "error": error,
            "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
            if not isinstance(cfg, dict) else cfg,
            "versions": dict(store.versions()),
        })
    except OSError as exc:
        log.error("could not record the failure of %s: %s", run_dir, exc)


_WATCHED: set[int] = set()  # parents already watched by this process


def watch_parent() -> None:
    """Exit when the process that started this one dies (a worker of a parallel sweep
    whose launcher was killed would otherwise idle forever, holding its memory). Called
    for every job a worker runs; it starts one watcher per parent."""
    parent = os.getppid()
    if parent in _WATCHED:
        return
    _WATCHED.add(parent)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="vgrad-watch-parent", daemon=True).start()
