"""The run-output contract (DESIGN.md section 4): ``summary.json`` and ``metrics.npz``.

Every file is written atomically (a temporary file in the same folder, then
``os.replace``), so a reader (or a killed run) never sees half a file; the run rewrites
both at every chunk boundary, so a killed run keeps the chunks it finished, with
``status: running`` telling that it did not end.

``metrics.npz`` is byte-for-byte reproducible: numpy's ``savez`` stamps each member
with the wall-clock time, so this writer uses a fixed zip timestamp instead. Arrays
load with ``numpy.load(path, allow_pickle=False)``; strings are stored as unicode.
JSON never holds NaN (not valid JSON): missing or non-finite numbers are ``null``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import io
import json
import math
import os
import platform
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from vgrad.records import Records

SUMMARY = "summary.json"
METRICS = "metrics.npz"
GRADS = "grads.npz"
#: Parameters of every seed at initialisation and at the end (record.params).
PARAMS = "params.npz"
#: The training state after the last written chunk, while a run has not ended: what a
#: re-run of the same command continues from (removed when the run ends).
CHECKPOINT = "checkpoint.npz"

#: Statuses a run folder can hold. ``running`` marks chunks written by a run that has not
#: ended (or was killed); ``interrupted`` a run stopped by SIGINT or SIGTERM after its
#: last chunk was written; the others are final.
STATUSES = ("running", "interrupted", "completed", "diverged", "partial", "failed")
#: Statuses of a run that trained to its end.
ENDED = ("completed", "diverged", "partial")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp alone gives 0600


class LinkRefused(ValueError):
    """A symbolic link stands where vgrad writes a file or folder of its own.

    A sweep folder shared with others, or unpacked from a received archive, may hold
    links planted at the names vgrad writes (``runs.csv``, ``report/index.html``, a
    lock file); writing through them would overwrite whatever file they point at, so
    vgrad refuses with one line instead, before it writes anything there.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        super().__init__(f"{self.path}: a symbolic link where vgrad writes a file of its "
                         "own; vgrad never writes through links (remove the link, or "
                         "choose another folder)")


def refuse_link(path: Path) -> Path:
    """``path``, unless it is a symbolic link (:class:`LinkRefused`)."""
    path = Path(path)
    if path.is_symlink():
        raise LinkRefused(path)
    return path


def refuse_links(folder: Path, names: tuple[str, ...]) -> None:
    """Refuse ``folder/name`` for every name that is a symbolic link (a name may be a
    glob pattern, e.g. ``run_*.png``). ``folder`` itself may be a link: callers refuse
    it where it is vgrad's own, not where the user named it."""
    folder = Path(folder)
    for name in names:
        for path in folder.glob(name) if any(c in name for c in "*?[") else [folder / name]:
            refuse_link(path)


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A run's config as dotted keys: ``{"act": {"name": "relu"}}`` -> ``{"act.name":
    "relu"}``; lists as JSON text (the runs table's columns, TensorBoard's hparams)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value))
        else:
            out[name] = value
    return out


def atomic_write(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` whole or not at all: a temporary file in the same
    folder, then ``os.replace``, which replaces a link rather than following it (and a
    link at ``path`` is refused before anything is written)."""
    path = refuse_link(Path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, _MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: The lock file of a sweep folder, held while a sweep writes into it.
LOCK = ".vgrad.lock"
_HELD: dict[Path, int] = {}  # sweep folders this process has locked: how many times


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path) -> Iterator[None]:
    """Hold ``<sweep>/.vgrad.lock`` while a sweep writes into the folder: a second sweep
    into it stops with one line (:class:`vgrad.errors.ConfigError`) before it writes
    anything, ``multirun.yaml`` included. Re-entrant within a process (vgrad's sweeper
    takes it before Hydra writes ``multirun.yaml``, its launcher again). The lock file
    is opened without following links: one planted there is refused."""
    from vgrad.errors import ConfigError

    key = Path(sweep_dir).absolute()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    path = key / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, _MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LinkRefused(path) from None
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            raise ConfigError("hydra.sweep.dir", str(key), "a folder no other sweep is "
                              f"writing to ({holder or 'another process'} is)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"vgrad sweep pid {os.getpid()}".encode(), 0)
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path, obj: Any) -> None:
    atomic_write(Path(path), (json.dumps(_json_safe(obj), indent=2) + "\n").encode())


def write_text(path: Path, text: str) -> None:
    """A text file (UTF-8), written atomically; a link at ``path`` is refused."""
    atomic_write(Path(path), text.encode())


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """``numpy.savez`` with fixed member timestamps (identical arrays, identical bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arrays[name]), allow_pickle=False)
    atomic_write(Path(path), buf.getvalue())


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / SUMMARY).read_text())


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an npz file (``numpy.load`` with pickles refused)."""
    with np.load(Path(path), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def read_metrics(run_dir: Path) -> dict[str, np.ndarray]:
    return read_npz(Path(run_dir) / METRICS)


def is_complete(run_dir: Path) -> bool:
    """True when the folder holds a run that ended (completed, diverged or partial)."""
    try:
        return read_summary(run_dir)["status"] in ENDED
    except (OSError, ValueError, KeyError, TypeError):
        return False


def npz_loads(path: Path) -> bool:
    """Whether ``path`` is a whole, readable npz file (every member's checksum holds)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None and bool(zf.namelist())
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return False


#: The files vgrad writes into a run folder (what a run refuses to find as links).
RUN_FILES = (SUMMARY, METRICS, GRADS, PARAMS, CHECKPOINT)


def npz_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Each array's shape, read from the npy headers of an npz file without loading the
    data; None when the file is missing or not a readable npz."""
    try:
        with zipfile.ZipFile(path) as zf:
            shapes = {}
            for name in zf.namelist():
                with zf.open(name) as f:
                    major, _ = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if major == 1 else
                            np.lib.format.read_array_header_2_0)
                    shape = read(f)[0]
                shapes[name.removesuffix(".npy")] = tuple(shape)
            return shapes
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return None


def metrics_damage(run_dir: Path, summary: Mapping[str, Any]) -> str | None:
    """What is wrong with a run's ``metrics.npz`` against what its ``summary.json``
    declares (every array of ``arrays``, with the lengths of its axes), or None.

    A file cut short or edited loses arrays or steps; readers would otherwise fail on
    it far from the cause, and a rerun would take the run as ended.
    """
    path = Path(run_dir) / METRICS
    if not npz_loads(path) or (shapes := npz_shapes(path)) is None:
        return "missing or unreadable"
    declared = summary.get("arrays") or {}
    for name, axes in declared.items():
        if name not in shapes:
            return f"no array {name!r} (declared in {SUMMARY})"
        if len(shapes[name]) != len(axes):
            return (f"{name} has {len(shapes[name])} axes, {SUMMARY} declares "
                    f"{len(axes)} ({', '.join(axes)})")
    lengths = {"seed": len(summary.get("seeds") or []),
               "step": shapes.get("step", (None,))[0],
               "epoch": shapes.get("epoch", (None,))[0],
               "layer": shapes.get("layer_names", (None,))[0]}
    for name, axes in declared.items():
        for axis, n in zip(axes, shapes[name], strict=True):
            if lengths.get(axis) is not None and n != lengths[axis]:
                return (f"{name} has {n} entries along {axis}, expected "
                        f"{lengths[axis]}")
    done = summary.get("epochs_done")
    if done is not None and lengths["epoch"] is not None and lengths["epoch"] < done + 1:
        return (f"{lengths['epoch']} epoch boundaries recorded, {SUMMARY} says "
                f"{done} epoch(s) were done")
    every = ((summary.get("config") or {}).get("record") or {}).get("every")
    per_epoch = summary.get("steps_per_epoch")
    if None not in (done, every, per_epoch, lengths["step"]):
        expected = len(range(0, done * per_epoch, every))
        if lengths["step"] < expected:
            return (f"{lengths['step']} recorded steps, {SUMMARY} says "
                    f"{expected} were recorded")
    return None


def run_damage(run_dir: Path, summary: Mapping[str, Any]) -> str | None:
    """What is wrong with an ended run's files (metrics, and the parameters and full
    gradients its config asked for), or None: a damaged run is trained again."""
    if (why := metrics_damage(run_dir, summary)) is not None:
        return f"{METRICS}: {why}"
    record = (summary.get("config") or {}).get("record") or {}
    wanted = [(PARAMS, bool(record.get("params"))),
              (GRADS, bool(record.get("full_grads_every")))]
    for name, expected in wanted:
        path = Path(run_dir) / name
        if (expected or path.exists()) and not npz_loads(path):
            return f"{name} missing or unreadable"
    return None


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete the temporary files of vgrad's own writes that a killed process left
    behind (``.summary.json.XXXX.tmp`` ...), nothing else."""
    for name in RUN_FILES:
        for tmp in Path(run_dir).glob(f".{name}.*.tmp"):
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink(missing_ok=True)


def write_checkpoint(run_dir: Path, epochs_done: int, leaves: list[np.ndarray]) -> None:
    """The training state's leaves (``jax.tree.leaves`` order), [S, ...] each."""
    arrays = {f"leaf_{i:04d}": np.asarray(x) for i, x in enumerate(leaves)}
    arrays["epochs_done"] = np.asarray(epochs_done, np.int64)
    write_npz(Path(run_dir) / CHECKPOINT, arrays)


def read_checkpoint(run_dir: Path) -> tuple[int, list[np.ndarray]]:
    with np.load(Path(run_dir) / CHECKPOINT, allow_pickle=False) as z:
        leaves = [z[k] for k in sorted(k for k in z.files if k.startswith("leaf_"))]
        return int(z["epochs_done"]), leaves


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], ignore: tuple[str, ...] = ()
                ) -> list[str]:
    """The dotted keys whose values differ between two resolved configs, as
    ``key=old->new`` (keys in ``ignore`` and their subkeys left out)."""
    def flat(c: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(c, Mapping):
            return {prefix[:-1]: c}
        out: dict[str, Any] = {}
        for k, v in c.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out

    a, b = flat(old), flat(new)
    keys = sorted(set(a) | set(b))
    return [f"{k}={a.get(k, '(none)')}->{b.get(k, '(none)')}" for k in keys
            if a.get(k) != b.get(k) and k.split(".")[0] not in ignore]


@functools.cache
def versions() -> dict[str, str]:
    """Versions of Python and the libraries a run's numbers depend on (read once)."""
    names = ["vgrad", "jax", "jaxlib", "flax", "optax", "hydra-core", "numpy"]
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def status_of(diverged_at: np.ndarray) -> str:
    """``completed`` if no seed diverged, ``diverged`` if all did, else ``partial``."""
    diverged = np.asarray(diverged_at) >= 0
    return "diverged" if diverged.all() else "partial" if diverged.any() else "completed"


# --- from loop records to the contract ----------------------------------------------------


def metrics_arrays(rec: Records) -> dict[str, np.ndarray]:
    """The ``metrics.npz`` arrays of a :class:`vgrad.records.Records`."""
    from vgrad.probes import HIST_EDGES

    arrays = {
        "step": rec.step.astype(np.int64),
        "epoch": rec.epoch.astype(np.int64),
        "layer_names": np.array(rec.layer_names, dtype=np.str_),
        "diverged_at_step": rec.diverged_at.astype(np.int64),
        "nonfinite_grads": rec.nonfinite_at_divergence.astype(np.int64),
        "hist_edges": np.asarray(HIST_EDGES, dtype=np.float32),
    }
    arrays.update(rec.step_stats)
    arrays.update(rec.epoch_stats)
    for name, (_, values) in _probe_edges(rec).items():  # (the Jacobian spectrum's bins)
        arrays[name] = np.asarray(values, dtype=np.float32)
    return arrays


def _probe_edges(rec: Records) -> dict[str, tuple[str, np.ndarray]]:
    """The bin edges the recorded probes declare beside their arrays."""
    from vgrad.probes import edges

    return edges([*rec.step_stats, *rec.epoch_stats])


def array_axes(rec: Records) -> dict[str, list[str]]:
    """The axis names of every array of ``metrics.npz``, from the probes' declarations,
    so that readers need not guess from shapes: seed, step, epoch, layer (all Dense
    layers), hidden (hidden layers), block (residual blocks), bin and edge (histogram
    bins and edges), sv_bin and sv_edge (the Jacobian spectrum's)."""
    from vgrad import probes

    declared = {**probes.outputs(probes.STEP_PROBES, None), **probes.epoch_outputs(None)}
    axes = {"step": ["step"], "epoch": ["epoch"], "layer_names": ["layer"],
            "hist_edges": ["edge"], "diverged_at_step": ["seed"],
            "nonfinite_grads": ["seed", "layer"]}
    for name, (axis, _) in _probe_edges(rec).items():
        axes[name] = [axis]
    for time, stats in (("step", rec.step_stats), ("epoch", rec.epoch_stats)):
        for name in stats:
            axes[name] = ["seed", time, *declared[name]]
    return axes


_EVAL_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc")


def seed_summaries(rec: Records) -> list[dict[str, Any]]:
    """Per seed: its value, first non-finite step, and metrics at init and at the end."""
    def at(s: int, e: int) -> dict[str, float]:
        return {k: float(rec.epoch_stats[k][s, e]) for k in _EVAL_KEYS}

    out = []
    for s, seed in enumerate(rec.seeds):
        diverged = int(rec.diverged_at[s])
        out.append({
            "seed": int(seed),
            "diverged_at_step": diverged if diverged >= 0 else None,
            # Non-finite gradient entries per layer at that step: where the blow-up started.
            "nonfinite_grads_at_divergence": (
                dict(zip(rec.layer_names, rec.nonfinite_at_divergence[s].tolist(), strict=True))
                if diverged >= 0 else None),
            "initial": at(s, 0),
            "final": at(s, -1),
        })
    return out


def grads_arrays(rec: Records) -> dict[str, np.ndarray]:
    """The ``grads.npz`` arrays: ``step`` [N] and one [S, N, ...] array per parameter,
    keyed ``<layer>.<parameter>`` (``dense_0.kernel``, ``dense_0.bias``, ``bn_0.scale``)."""
    return {"step": rec.snapshot_step.astype(np.int64), **rec.snapshots}


def make_summary(rec: Records, config: dict[str, Any], status: str, device: dict[str, Any]
                 ) -> dict[str, Any]:
    """The ``summary.json`` of a run in progress (status running) or ended."""
    steps = rec.plan.steps_per_epoch * rec.epochs_done
    group = dict(rec.group)
    notes = group.pop("notes", [])
    return {
        "status": status,
        "config": config,
        "layers": list(rec.layer_names),
        "seeds": [int(s) for s in rec.seeds],
        "diverged_at_step": [d["diverged_at_step"] for d in seed_summaries(rec)],
        "per_seed": seed_summaries(rec),
        "epochs_done": rec.epochs_done,
        "arrays": array_axes(rec),  # axis names of each array of metrics.npz
        "steps_per_epoch": rec.plan.steps_per_epoch,
        "n_params": rec.n_params,
        # What the run leaves unmeasured, and why (a probe that cannot run on this model).
        "notes": list(notes),
        "timing": {
            "compile_s": rec.compile_s,
            "run_s": rec.run_s,
            "steps_per_s": steps / rec.run_s if rec.run_s > 0 else None,
            "seed_steps_per_s": steps * len(rec.seeds) / rec.run_s if rec.run_s > 0 else None,
            # The group of jobs this run was trained with, as one program (vgrad.group):
            # its id in the sweep, its jobs and members (jobs x seeds); compile_s and
            # run_s above are the group's, shared by its jobs.
            "group": group,
        },
        "versions": dict(versions()),
        "device": {**device, "seed_devices": rec.seed_devices},
    }
