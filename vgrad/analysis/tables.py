"""Run folders into tidy pandas tables.

``load_sweep(path)`` finds every run folder under ``path`` (a single run, a Hydra
multirun folder, or any tree of them: a run folder is one holding ``summary.json``) and
returns a :class:`Sweep` with

- ``runs``: one row per run x seed: ``run`` (the folder relative to ``path``), ``seed``,
  ``status``, ``diverged_at_step``, ``initial_*``/``final_*`` train and test loss and
  accuracy, timing, and the resolved config flattened to dotted columns (``act.name``,
  ``init.std``, ``depth``, ...). Configs are read from the run's files, never from
  folder names.
- ``steps()`` / ``epochs()``: one row per run x seed x step (or epoch) x layer, with
  every per-layer statistic of ``metrics.npz`` as a column; per-step (or per-epoch)
  scalars such as ``loss`` repeat on each layer's row, and statistics of hidden layers
  only (``act_*``) are NaN on the output layer's row.

Runs that did not end (``status: running``: killed or still going) or whose files are
unreadable or damaged (``metrics.npz`` lacking an array its ``summary.json`` declares, or
cut short) are skipped with a warning naming the run and what is wrong; failed runs are
kept in ``runs`` (status ``failed``, metrics NaN) and have no series; interrupted runs
(SIGINT or SIGTERM) are kept with what they trained (status ``interrupted``). A run's
arrays are read up to the epochs its ``summary.json`` says were done: the summary is
written last, so it is the one to trust if a kill fell between the two writes.
"""

from __future__ import annotations

import json
import os
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vgrad import store

_EVAL = ("train_loss", "train_acc", "test_loss", "test_acc")
#: Statuses of runs the analysis reads (``running`` is a run still going, or killed).
ENDED = ("completed", "diverged", "partial", "failed", "interrupted")


def find_runs(path: Path) -> list[Path]:
    """Every folder under ``path`` (itself included) that holds a ``summary.json``, in
    natural order (job 2 before job 10; numbered folders before named ones, so that
    sweeps gathered under one folder, ``tanh/0`` beside ``relu/0``, sort too)."""
    path = Path(path)
    return sorted({p.parent for p in path.rglob(store.SUMMARY)},
                  key=lambda p: [(0, int(s), "") if s.isdigit() else (1, 0, s)
                                 for s in p.parts])


@dataclass
class Run:
    """One run folder: its summary, and its metrics loaded on first use."""

    path: Path
    name: str
    summary: dict[str, Any]
    _metrics: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def status(self) -> str:
        return self.summary["status"]

    @property
    def metrics(self) -> dict[str, np.ndarray]:
        if self._metrics is None:
            self._metrics = (_trusted(store.read_metrics(self.path), self.summary)
                             if self.status != "failed" else {})
        return self._metrics

    @property
    def config(self) -> dict[str, Any]:
        return self.summary.get("config", {})

    def rows(self) -> list[dict[str, Any]]:
        """This run's rows of the runs table (one per seed)."""
        base = {k: v for k, v in store.flat_config(self.config).items()
                if k not in ("seed", "seeds")}
        timing = self.summary.get("timing", {})
        per_seed = self.summary.get("per_seed") or [
            {"seed": s, "diverged_at_step": None, "initial": {}, "final": {}}
            for s in _seeds_of(self.config)]
        rows = []
        for s in per_seed:
            row = {"run": self.name, "run_dir": str(self.path), "seed": s["seed"],
                   "status": self.status, "diverged": s["diverged_at_step"] is not None,
                   "diverged_at_step": s["diverged_at_step"], "error": self.summary.get("error")}
            for when in ("initial", "final"):
                for k in _EVAL:
                    value = s[when].get(k)
                    row[f"{when}_{k}"] = np.nan if value is None else value
            row.update({k: timing.get(k) for k in ("compile_s", "run_s", "steps_per_s")})
            row.update(base)
            rows.append(row)
        return rows


def _trusted(metrics: dict[str, np.ndarray], summary: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays cut to the epochs ``summary.json`` says were done."""
    done, per_epoch = summary.get("epochs_done"), summary.get("steps_per_epoch")
    if done is None or per_epoch is None or "epoch" not in metrics:
        return metrics
    axes = summary.get("arrays", {})
    keep_steps = metrics["step"] < done * per_epoch if "step" in metrics else None
    out = {}
    for key, value in metrics.items():
        dims = axes.get(key, [])
        if key == "epoch":
            out[key] = value[: done + 1]
        elif key == "step" and keep_steps is not None:
            out[key] = value[keep_steps]
        elif dims[:2] == ["seed", "epoch"]:
            out[key] = value[:, : done + 1]
        elif dims[:2] == ["seed", "step"] and keep_steps is not None:
            out[key] = value[:, keep_steps]
        else:
            out[key] = value
    return out


class NotARun(ValueError):
    """A ``summary.json`` that is not a vgrad run's (no status vgrad writes, no config):
    a folder of someone else's inside a sweep folder, not a job of the sweep."""


def _check_summary(summary: Any) -> None:
    """Raise ValueError unless ``summary`` has what every reader relies on."""
    if not isinstance(summary, dict) or summary.get("status") not in store.STATUSES:
        raise NotARun("not a vgrad run summary (no known status)")
    if not isinstance(summary.get("config", {}), dict):
        raise NotARun("not a vgrad run summary (config is not a mapping)")
    if summary["status"] != "failed":
        for key, kind in (("per_seed", list), ("arrays", dict), ("layers", list)):
            if not isinstance(summary.get(key), kind):
                raise ValueError(f"not a vgrad run summary ({key} missing)")


def _seeds_of(config: dict[str, Any]) -> list[int]:
    first, n = config.get("seed", 0), config.get("seeds", 1)
    return list(range(first, first + n))


def load_run(path: str | Path, name: str | None = None) -> Run:
    """One run folder. Raises ValueError (naming the file) if its summary is unreadable or
    not a run summary, or if a run that trained has no readable metrics."""
    path = Path(path)
    try:
        try:
            summary = json.loads((path / store.SUMMARY).read_text())
        except (ValueError, UnicodeDecodeError) as exc:  # not JSON: someone else's file
            raise NotARun(f"not a vgrad run summary ({exc})") from None
        _check_summary(summary)
    except NotARun as exc:
        raise NotARun(f"{path / store.SUMMARY}: {exc}") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path / store.SUMMARY}: {exc}") from None
    run = Run(path, name if name is not None else path.name, summary)
    if run.status in ENDED and run.status != "failed" and (
            damage := store.metrics_damage(path, summary)) is not None:
        raise ValueError(f"{path / store.METRICS}: {damage}")
    return run


@dataclass
class Sweep:
    """Every ended run under a folder, as tables."""

    root: Path
    runs_list: list[Run]
    #: Run folders that did not end or are damaged: (folder, why).
    skipped: list[tuple[Path, str]]
    #: Folders whose ``summary.json`` is not a vgrad run's (left alone, not runs of the
    #: sweep): (folder, why).
    foreign: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def runs(self) -> pd.DataFrame:
        rows = [row for run in self.runs_list for row in run.rows()]
        return pd.DataFrame(rows)

    def run(self, name: str) -> Run:
        return next(r for r in self.runs_list if r.name == name)

    def steps(self, every: int = 1) -> pd.DataFrame:
        """Per-step statistics, one row per run x seed x recorded step x layer
        (``every`` keeps every n-th recorded step, to bound memory on big sweeps)."""
        return self._series("step", every)

    def epochs(self) -> pd.DataFrame:
        """Per-epoch statistics, one row per run x seed x epoch boundary x layer."""
        return self._series("epoch", 1)

    def _series(self, axis: str, every: int) -> pd.DataFrame:
        frames = [series(run, axis, every) for run in self.runs_list if run.status != "failed"]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def times(self, every: int = 1) -> pd.DataFrame:
        """Recurrent runs' ||dL/dh_t|| (``time_delta_norm``), one row per run x seed x
        recorded step x recurrent layer x time step t (1 ... T)."""
        frames = [time_series(run, every) for run in self.runs_list if run.status != "failed"]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def command(self) -> str | None:
        """The command line that made a Hydra multirun folder (from its multirun.yaml)."""
        return sweep_command(self.root)

    def commands(self) -> list[str]:
        """Every command that swept into the folder, oldest first (``sweep_commands``)."""
        return sweep_commands(self.root)


def time_series(run: Run, every: int = 1) -> pd.DataFrame:
    """One recurrent run's ||dL/dh_t|| as a long table (empty for other models)."""
    m = run.metrics
    if "time_delta_norm" not in m:
        return pd.DataFrame()
    value = m["time_delta_norm"][:, ::every].astype(np.float64)  # [S, steps, R, T]
    S, N, R, T = value.shape
    seeds = [r["seed"] for r in run.rows()]
    return pd.DataFrame({
        "run": run.name,
        "seed": np.repeat(seeds, N * R * T),
        "step": np.tile(np.repeat(m["step"][::every], R * T), S),
        "layer": np.tile(np.repeat([f"rnn_{r}" for r in range(R)], T), S * N),
        "t": np.tile(np.arange(1, T + 1), S * N * R),
        "time_delta_norm": value.reshape(-1),
    })


def series(run: Run, axis: str = "step", every: int = 1) -> pd.DataFrame:
    """One run's per-``axis`` statistics ("step" or "epoch") as a long table.

    Which arrays are per step or per epoch, per layer or per hidden layer, is read from
    the axis names the run recorded (``summary.json``'s ``arrays``).
    """
    m, axes = run.metrics, run.summary.get("arrays", {})
    if axis not in m:
        return pd.DataFrame()
    index = m[axis][::every]
    names = [str(n) for n in m["layer_names"]]
    seeds = [r["seed"] for r in run.rows()]
    S, T, L = len(seeds), len(index), len(names)
    columns: dict[str, np.ndarray] = {}
    for key, dims in axes.items():
        if key not in m or dims[:2] != ["seed", axis] or dims[2:] not in (
                [], ["layer"], ["hidden"], ["recurrent"]):
            continue  # histograms, blocks, time steps: tables of their own
        value = m[key][:, ::every].astype(np.float64)
        if len(dims) == 2:  # a scalar per step or epoch: repeat on each layer's row
            value = np.repeat(value[:, :, None], L, axis=2)
        elif dims[2] in ("hidden", "recurrent"):  # the first layers: NaN for the rest
            pad = np.full((S, T, L - value.shape[2]), np.nan)
            value = np.concatenate([value, pad], axis=2)
        columns[key] = value.reshape(-1)
    return pd.DataFrame({
        "run": run.name,
        "seed": np.repeat(seeds, T * L),
        axis: np.tile(np.repeat(index, L), S),
        "layer": np.tile(names, S * T),
        "layer_index": np.tile(np.arange(L), S * T),
        **columns,
    })


def load_sweep(path: str | Path) -> Sweep:
    """Every run under ``path``; runs that did not end are skipped with a warning."""
    root = Path(path)
    runs, skipped, foreign = [], [], []
    for folder in find_runs(root):
        name = str(folder.relative_to(root)) if folder != root else folder.name
        try:
            run = load_run(folder, name)
        except NotARun as exc:
            foreign.append((folder, str(exc)))
            continue
        except ValueError as exc:
            skipped.append((folder, str(exc)))
            continue
        if run.status not in ENDED:
            skipped.append((folder, f"status {run.status!r}: the run did not end"))
            continue
        runs.append(run)
    for folder, why in skipped + foreign:
        warnings.warn(f"skipping run {folder}: {why}", stacklevel=2)
    return Sweep(root, runs, skipped, foreign)


def _command_line(task: list[str], hydra: list[str]) -> str:
    """``python -m vgrad.train -m ...`` from a sweep's task and hydra overrides, each
    shell-quoted, as written (``hydra.mode=...``, which ``-m`` sets, left out)."""
    hydra_args = [o for o in hydra if not str(o).startswith("hydra.mode=")]
    return " ".join(["python -m vgrad.train -m", *map(shlex.quote, map(str, task)),
                     *map(shlex.quote, map(str, hydra_args))])


def sweep_command(root: Path) -> str | None:
    """``python -m vgrad.train -m ...`` rebuilt from a multirun folder's multirun.yaml
    (the latest sweep into the folder: Hydra rewrites it; see ``sweep_commands``)."""
    from omegaconf import OmegaConf

    path = Path(root) / "multirun.yaml"
    if not path.is_file():
        return None
    # As written, never resolved: ``hydra.sweep.subdir=run_${hydra.job.num}`` is Hydra's
    # own idiom, and ``${oc.env:VAR}`` must not put a variable's value into a page.
    try:
        overrides = OmegaConf.to_container(OmegaConf.load(path).hydra.overrides,
                                           resolve=False)
    except Exception:  # noqa: BLE001 (a damaged multirun.yaml: no command, not a crash)
        return None
    return _command_line(overrides.get("task", []), overrides.get("hydra", []))


#: Where each sweep into a folder appends its command (``record_command``).
COMMANDS = Path(".vgrad") / "commands.jsonl"


def record_command(sweep_dir: str | Path, overrides_task: list[str],
                   overrides_hydra: list[str]) -> Path:
    """Append the command of a sweep into ``sweep_dir`` to ``sweep_dir/.vgrad/
    commands.jsonl``, one JSON line (``command``, ``task``, ``hydra``, ``time``) written
    by one ``write`` in append mode, so that concurrent sweeps never interleave within a
    line. Hydra rewrites ``multirun.yaml`` on every sweep into a folder; this keeps them
    all. The overrides are taken as written (unresolved: ``${...}`` kept) and the
    command shell-quoted as ``sweep_command`` gives it. A symbolic link at ``.vgrad`` or
    at the file is refused (:class:`vgrad.store.LinkRefused`), never written through.
    Returns the file's path."""
    from datetime import datetime, timezone

    folder = store.refuse_link(Path(sweep_dir) / COMMANDS.parent)
    path = store.refuse_link(Path(sweep_dir) / COMMANDS)
    folder.mkdir(parents=True, exist_ok=True)
    task, hydra = [str(o) for o in overrides_task], [str(o) for o in overrides_hydra]
    line = json.dumps({"command": _command_line(task, hydra), "task": task, "hydra": hydra,
                       "time": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                      ensure_ascii=False) + "\n"
    # O_NOFOLLOW: a link planted between the check and the open is refused too (ELOOP).
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if path.is_symlink():
            raise store.LinkRefused(path) from exc
        raise
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    return path


def sweep_commands(root: str | Path) -> list[str]:
    """Every command that swept into ``root``, oldest first: the lines of
    ``.vgrad/commands.jsonl`` (a damaged line is skipped; a linked file is not read),
    then the command of ``multirun.yaml`` if it is not the last of them (a sweep by a
    vgrad that kept no history); just that one where there is no history; [] for a
    folder no sweep wrote (a single run)."""
    path = Path(root) / COMMANDS
    commands: list[str] = []
    if path.is_file() and not path.is_symlink() and not path.parent.is_symlink():
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("command"), str):
                commands.append(entry["command"])
    latest = sweep_command(Path(root))
    if latest is not None and (not commands or commands[-1] != latest):
        commands.append(latest)
    return commands


def axis_column(frame: pd.DataFrame, axis: str) -> str:
    """The column of a sweep axis: ``act`` means ``act.name``; ``depth`` is ``depth``."""
    for candidate in (axis, f"{axis}.name"):
        if candidate in frame.columns:
            return candidate
    options = sorted(c for c in frame.columns if "." in c or c.isidentifier())
    raise KeyError(f"no sweep axis {axis!r}; columns are {', '.join(options)}")
