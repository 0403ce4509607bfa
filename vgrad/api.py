"""Train from Python: one run or a sweep, without the command line (a notebook, a script).

    from vgrad import api

    run = api.train({"act": "relu", "init": "he_normal", "depth": 8, "epochs": 20})
    run.metrics["grad_norm"]          # [seeds, steps, layers], as in metrics.npz
    run.summary["per_seed"][0]["final"]

    sweep = api.sweep({"act": ["sigmoid", "tanh", "relu"], "depth": [2, 4, 8]},
                      {"epochs": 20, "seeds": 5})
    sweep.runs                        # one row per run x seed (vgrad.analysis.Sweep)

Overrides are what the command line takes, either as a list of strings
(``["act=relu", "optim.lr=0.01", "+experiment=visualize"]``) or as a mapping
(``{"act": "relu", "optim.lr": 0.01, "record.step_probes": ["global_norms"]}``: values
are written as Hydra overrides, strings quoted where Hydra needs it). The config is
composed from vgrad's own config folder (``vgrad.train.CONF_DIR``) with Hydra's compose
API, validated, trained and written to a run folder with the layout of the command
line's (``summary.json``, ``metrics.npz``, ``params.npz``, ``.hydra/config.yaml`` and
``overrides.yaml``; no ``hydra.yaml`` nor job log: no Hydra application runs), then read
back with :func:`vgrad.analysis.load_run` / :func:`vgrad.analysis.load_sweep`. The same
overrides give the same numbers as ``python -m vgrad.train`` (tested).

Nothing here reads ``sys.argv`` or starts a Hydra application, and Hydra's global state
is left as it was found: a notebook that initialised Hydra itself (``hydra.initialize``)
keeps its initialisation, and calls can be repeated. Bad input raises
:class:`vgrad.errors.ConfigError` (a ``ValueError`` whose message is the command line's
one line) before anything is written; a folder holding another config's run is refused
the same way. As on the command line, a folder that holds an ended run of the same config
is not trained again (``resume=false`` does), and an interrupted one is continued.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vgrad import config, runner, store
from vgrad.errors import ComposeError, ConfigError, describe

log = logging.getLogger("vgrad")

Overrides = Sequence[str] | Mapping[str, Any]

#: What vgrad's launcher gives a program's members by default (see
#: ``conf/hydra/launcher``): the memory budget of one program, in GB.
MEMORY_BUDGET_GB = 4.0

_PLAIN = re.compile(r"[A-Za-z0-9_.\-+/:@~]+")


def override_value(value: Any) -> str:
    """``value`` as it is written on the right of ``key=`` in a Hydra override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in ("null", "true", "false", "nan",
                                                         "inf", "-inf"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def as_overrides(overrides: Overrides | None) -> list[str]:
    """Overrides as command-line strings (a mapping: ``key=value`` each)."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of strings or a mapping, not the string "
                        f"{overrides!r} (write [{overrides!r}])")
    if isinstance(overrides, Mapping):
        return [f"{key}={override_value(value)}" for key, value in overrides.items()]
    return [str(o) for o in overrides]


def _refuse_hydra_overrides(overrides: list[str]) -> None:
    for arg in overrides:
        key = arg.split("=", 1)[0].lstrip("+~")
        if arg in ("-m", "--multirun") or key.startswith("hydra.") or key.startswith("hydra/"):
            raise ConfigError(key, arg.partition("=")[2] or None,
                              "no Hydra option here: vgrad.api runs no Hydra application "
                              "(pass run_dir= or sweep_dir=; sweep axes as sweep(axes, ...))")


@contextlib.contextmanager
def _hydra() -> Iterator[None]:
    """Hydra initialised on vgrad's config folder, and restored as it was afterwards."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    from vgrad.train import CONF_DIR  # (registers vgrad's schemas with Hydra)

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None, job_name="train"):
            yield
    finally:
        restore_gh_from_backup(backup)


def compose(overrides: Overrides | None = None) -> DictConfig:
    """The config of ``python -m vgrad.train OVERRIDES`` (without Hydra's own node),
    validated; raises :class:`ConfigError` (or :class:`ComposeError` for what Hydra
    cannot compose: an unknown choice, key or type) with the command line's one line."""
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = as_overrides(overrides)
    _refuse_hydra_overrides(args)
    config.refuse_name_overrides(args)
    try:
        with _hydra():
            cfg = hydra_compose("config", overrides=args)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ComposeError(describe(exc)) from exc
    config.validate(cfg)
    return cfg


def _now_dir(kind: str) -> Path:
    """Where the command line puts a run or sweep by default (``conf/config.yaml``)."""
    now = datetime.now()
    return Path("outputs") / kind / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S-%f")


def _write_hydra_files(run_dir: Path, cfg: DictConfig, overrides: list[str]) -> None:
    """``.hydra/config.yaml`` and ``overrides.yaml``, as Hydra writes them."""
    from vgrad import guard

    hydra = store.refuse_link(run_dir / ".hydra")
    hydra.mkdir(parents=True, exist_ok=True)
    store.refuse_links(hydra, guard.HYDRA_FILES)
    store.write_text(hydra / "config.yaml", OmegaConf.to_yaml(cfg))
    store.write_text(hydra / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(overrides)))


def _check_folder(run_dir: Path) -> None:
    from vgrad import guard

    try:
        guard.check_folder(run_dir, "train.log")
    except store.LinkRefused as exc:
        raise ConfigError("run folder", str(run_dir), f"no links where vgrad writes ({exc})"
                          ) from None


def train(overrides: Overrides | None = None, run_dir: str | Path | None = None) -> Any:
    """Train one run (all its seeds in one program) and return it as a
    :class:`vgrad.analysis.Run` (``.summary``, ``.metrics``, ``.status``).

    ``overrides``: as on the command line (see the module's docstring). ``run_dir``: the
    run folder (default: ``outputs/runs/DATE/TIME`` under the current folder, as the
    command line). Raises :class:`ConfigError` on bad input before anything is written,
    :class:`vgrad.runner.Interrupted` after writing what was trained on SIGINT (Ctrl-C,
    a notebook's interrupt) or SIGTERM, and ``RuntimeError`` if the program crashed (its
    run folder then holds ``status: failed`` and the error).
    """
    from tqdm.auto import tqdm

    from vgrad.analysis import load_run

    args = as_overrides(overrides)
    cfg = compose(args)
    run_dir = Path(run_dir) if run_dir is not None else _now_dir("runs")
    _check_folder(run_dir)
    ended = runner.ended_before(run_dir, cfg)  # another config's run: refused
    if ended is not None and cfg.resume:
        log.info("%s already holds an ended run of this config (%s): not trained again",
                 run_dir, ended)
        return load_run(run_dir)
    job = runner.prepare(cfg, run_dir)  # raises ConfigError before anything is written
    if cfg.resume:
        job.resume = runner.resume_point(run_dir, cfg)
    _write_hydra_files(run_dir, cfg, args)
    bar = tqdm(total=cfg.epochs, unit="epoch", disable=not cfg.progress or None,
               desc=run_dir.name, leave=False, initial=job.epochs_done)
    try:
        status = runner.train_jobs([job], progress=lambda g, e: bar.update(e - bar.n))[run_dir]
    finally:
        bar.close()
    if status == "failed":
        error = runner.OUTCOMES.errors.get(run_dir, "the program crashed")
        raise RuntimeError(f"training failed: {error} (run folder {run_dir})")
    return load_run(run_dir)


def sweep(axes: Mapping[str, Sequence[Any]], overrides: Overrides | None = None,
          sweep_dir: str | Path | None = None, *,
          memory_budget_gb: float = MEMORY_BUDGET_GB,
          max_jobs_per_program: int | None = None) -> Any:
    """Train every combination of ``axes`` (``{"act": ["tanh", "relu"], "depth": [2,
    4]}``: 4 jobs) with the fixed ``overrides``, and return the sweep as a
    :class:`vgrad.analysis.Sweep`.

    What ``python -m vgrad.train -m act=tanh,relu depth=2,4 OVERRIDES`` does with vgrad's
    launcher: jobs numbered in the command line's order (the last axis varies fastest),
    each with its own run folder ``<sweep_dir>/<n>``, trained grouped by structure
    (jobs that differ only in numbers share one compiled program, at most
    ``memory_budget_gb`` of members per program and ``max_jobs_per_program`` jobs),
    ``runs.csv`` written at the end, and the equivalent command recorded for the report.
    A sweep folder that already holds runs of some of these configs keeps them (they are
    not trained again, interrupted ones are continued) and other configs' runs are never
    overwritten: such a job takes the next free number.

    Every job is composed and validated before anything is written: bad input raises
    :class:`ConfigError` naming the job. A program that crashes records its jobs as
    ``status: failed`` (rows of ``Sweep.runs``) and the other programs go on.
    """
    from vgrad import group as vgroup
    from vgrad import guard
    from vgrad.analysis import callback, load_sweep

    fixed = as_overrides(overrides)
    names = list(axes)
    for name in names:
        values = axes[name]
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise TypeError(f"axes[{name!r}] must be a non-empty list of values, not "
                            f"{values!r}")
    combos = list(itertools.product(*(list(axes[n]) for n in names)))
    job_args = [fixed + [f"{n}={override_value(v)}" for n, v in zip(names, combo,
                                                                    strict=True)]
                for combo in combos]
    jobs = []
    for i, args in enumerate(job_args):
        where = f"(job {i}: {' '.join(args)})"
        try:
            jobs.append(runner.prepare(compose(args), Path("unplaced")))
        except ComposeError as exc:
            raise ComposeError(f"{exc} {where}") from exc.__cause__
        except ConfigError as exc:
            raise ConfigError(exc.key, exc.value, f"{exc.allowed} {where}") from None

    root = Path(sweep_dir) if sweep_dir is not None else _now_dir("sweeps")
    root.mkdir(parents=True, exist_ok=True)
    with store.sweep_lock(root):
        store.refuse_links(root, ("multirun.yaml", "runs.csv"))
        existing = runner.runs_in(root)
        used: set[str] = set()
        to_train = []
        for i, (job, args) in enumerate(zip(jobs, job_args, strict=True)):
            same = [name for name, c in existing.items() if name not in used
                    and isinstance(c, dict)
                    and not store.config_diff(c, job.config, ignore=config.VOLATILE)]
            if same:
                name = str(i) if str(i) in same else same[0]
            elif str(i) not in existing and str(i) not in used:
                name = str(i)
            else:
                name = str(runner.next_free_number(root, used | set(existing)))
            used.add(name)
            job.run_dir = root / name
            try:
                store.refuse_link(job.run_dir)
                guard.check_folder(job.run_dir, "train.log")
            except store.LinkRefused as exc:
                raise ConfigError("run folder", str(job.run_dir),
                                  f"no links where vgrad writes ({exc})") from None
            ended = runner.ended_before(job.run_dir, job.cfg)
            if ended is not None and job.cfg.resume:
                log.info("%s already holds an ended run of this config (%s): skipped",
                         job.run_dir, ended)
                continue
            if job.cfg.resume:
                job.resume = runner.resume_point(job.run_dir, job.cfg)
            to_train.append((job, args))
        for job, args in to_train:
            _write_hydra_files(job.run_dir, job.cfg, args)
        _record_command(root, fixed, names, axes)
        if to_train:
            trained = [job for job, _ in to_train]
            per_member = max(vgroup.member_bytes(job) for job in trained)
            max_members = max(1, int(memory_budget_gb * 1e9 // per_member))
            try:
                runner.train_jobs(trained, max_members, max_jobs=max_jobs_per_program)
            finally:
                callback.write_runs_table(root)
        else:
            callback.write_runs_table(root)
    return load_sweep(root)


def _record_command(root: Path, fixed: list[str], names: list[str],
                    axes: Mapping[str, Sequence[Any]]) -> None:
    """The equivalent ``python -m vgrad.train -m ...`` in the sweep's command history
    (``vgrad.analysis.tables.record_command``), which the report shows."""
    from vgrad.analysis.tables import record_command

    task = fixed + [f"{n}={','.join(override_value(v) for v in axes[n])}" for n in names]
    try:
        record_command(root, task, [f"hydra.sweep.dir={root}"])
    except (OSError, store.LinkRefused) as exc:
        log.warning("sweep command not recorded: %s", exc)


