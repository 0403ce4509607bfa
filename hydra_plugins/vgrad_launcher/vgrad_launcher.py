"""vgrad's Hydra launcher: trains a sweep's jobs of one structure as one compiled program.

``hydra/launcher=vgrad`` (the default in ``conf/config.yaml``). Hydra hands a launcher
every job of a sweep at once (``Launcher.launch``); this one

1. composes every job's config and gives it a run folder: the folder of an earlier run
   of the same config if the sweep folder has one (so an extended or reordered sweep
   resumes by config, not by job number), else the job's own numbered folder, else,
   when that holds another config's run, the next free number (a folder holding a run
   is never overwritten); the sweep folder is locked against a concurrent sweep
   (``vgrad.store.sweep_lock``); links planted in a job folder refuse that job;
2. validates each job and skips those that already ended (resume);
3. groups the rest by program structure and trains each group as one program
   (``vgrad.runner.train_jobs``), one progress bar for the sweep;
4. runs Hydra's ``run_job`` for every job it trained (or that failed validation), as
   the basic launcher does, so that each job folder gets its ``.hydra/`` files and job
   log and Hydra's callbacks see the job; the task function reports the results trained
   in step 3. A job skipped because its folder holds an ended run of its config is left
   untouched, byte for byte. (A sweep killed during
   step 3 leaves job folders without ``.hydra/``: their ``summary.json`` holds the
   config, which is all that resuming and the analysis read.)

Hydra imports this module while scanning for plugins: vgrad is imported in ``launch``.
(No ``from __future__ import annotations``: Hydra's scanner runs the module before it
is in ``sys.modules``, where dataclasses look string annotations up.)
"""

import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger("vgrad")


@dataclass
class VgradLauncherConf:
    _target_: str = "hydra_plugins.vgrad_launcher.vgrad_launcher.VgradLauncher"
    # Most jobs one program trains (null: as many as the memory budget allows).
    max_jobs_per_program: Optional[int] = None  # noqa: UP045 (OmegaConf reads it)
    # Memory a program's members (jobs x seeds) may take, in GB: state, activations and
    # records; a larger group is split into batches that train one after the other.
    memory_budget_gb: float = 4.0


ConfigStore.instance().store(group="hydra/launcher", name="vgrad", node=VgradLauncherConf,
                             provider="vgrad")


@dataclass
class _Planned:
    """One job of the sweep: its composed config and where it goes."""

    idx: int
    config: DictConfig  # the whole config, hydra node included
    task: DictConfig  # the job's own config (without the hydra node)
    run_dir: Path
    refused: Optional[Exception] = None  # noqa: UP045
    ended: Optional[str] = None  # noqa: UP045 (the status of an earlier run, skipped)


class VgradLauncher(Launcher):
    def __init__(self, max_jobs_per_program: int | None = None,
                 memory_budget_gb: float = 4.0) -> None:
        self.max_jobs = max_jobs_per_program
        self.memory_budget = memory_budget_gb * 1e9
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
               ) -> Sequence[JobReturn]:
        from hydra.core.utils import setup_globals

        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        from vgrad import store

        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with store.sweep_lock(sweep_dir):  # (taken already by vgrad's sweeper)
            planned = self._plan(job_overrides, initial_job_idx, sweep_dir)
            self._train(planned, sweep_dir)
            return [self._report(p) for p in planned]

    # -- 1. configs and folders --

    def _plan(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int,
              sweep_dir: Path) -> list[_Planned]:
        from vgrad import config as vconfig
        from vgrad import guard, runner, store

        assert self.config is not None and self.hydra_context is not None
        log.info("Launching %d jobs, grouped by program structure", len(job_overrides))
        existing = runner.runs_in(sweep_dir)
        used: set[str] = set()
        planned = []
        original = HydraConfig.instance().cfg
        composer = Composer(self.hydra_context.config_loader, self.config)
        try:
            for i, overrides in enumerate(job_overrides):
                idx = initial_job_idx + i
                log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
                cfg = composer.compose(list(overrides))
                with open_dict(cfg):
                    cfg.hydra.job.id = idx
                    cfg.hydra.job.num = idx
                HydraConfig.instance().set_config(cfg)
                task = _task_config(cfg)
                own = OmegaConf.to_container(task, resolve=True, enum_to_str=True)
                default = str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
                same = [name for name, c in existing.items() if name not in used
                        and isinstance(c, dict)
                        and not store.config_diff(c, own, ignore=vconfig.VOLATILE)]
                refused: Optional[Exception] = None  # noqa: UP045
                if same:
                    name = default if default in same else same[0]
                elif default not in existing and default not in used:
                    name = default
                elif default == str(idx):  # numbered folders: take the next free number
                    name = str(runner.next_free_number(sweep_dir, used))
                elif default not in existing:  # (jobs the user's subdir gives one folder)
                    name = default
                elif isinstance(existing[default], str):  # not a vgrad run's summary
                    name = default
                    refused = runner.DifferentRun(sweep_dir / name, None, existing[name])
                else:
                    name = default
                    refused = runner.DifferentRun(
                        sweep_dir / name, store.config_diff(existing[name], own,
                                                            ignore=vconfig.VOLATILE))
                try:  # links planted where Hydra or vgrad write: that job is refused
                    store.refuse_link(sweep_dir / name)
                    guard.check_folder(sweep_dir / name, f"{cfg.hydra.job.name}.log",
                                       cfg.hydra.output_subdir)
                except store.LinkRefused as exc:
                    refused = exc
                used.add(name)
                if name != default:
                    why = ("its earlier run" if same else f"{default} holds another run"
                           if default in existing else f"{default} went to an earlier job")
                    log.info("\t#%d goes to folder %s (%s)", idx, name, why)
                    with read_write(cfg.hydra), open_dict(cfg.hydra):
                        cfg.hydra.sweep.subdir = name
                planned.append(_Planned(idx, cfg, task, sweep_dir / name, refused))
        finally:
            HydraConfig.instance().cfg = original
        return planned

    # -- 2 and 3. validate, skip what ended, train the rest in groups --

    def _train(self, planned: list[_Planned], sweep_dir: Path) -> None:
        from vgrad import runner
        from vgrad.errors import ConfigError

        jobs = []
        for p in planned:
            if p.refused is not None:
                continue
            cfg = p.task
            try:
                ended = runner.ended_before(p.run_dir, cfg)
                if cfg.resume and ended is not None:
                    p.ended = ended  # left as it is, .hydra/ included
                    continue
                job = runner.prepare(cfg, p.run_dir)
            except ConfigError:
                continue  # the task function records the error
            if cfg.resume:
                job.resume = runner.resume_point(p.run_dir, cfg)
                if job.resume is not None:
                    log.info("continuing %s from epoch %d", p.run_dir, job.resume.epochs_done)
            jobs.append(job)
        if not jobs:
            return
        self._train_jobs(jobs, sweep_dir)

    def _train_jobs(self, jobs: list[Any], sweep_dir: Path) -> None:
        """Train the prepared jobs in groups, in this process."""
        from vgrad import group as vgroup
        from vgrad import runner
        from vgrad.analysis import callback

        max_members = self._max_members(jobs)
        groups = vgroup.group_jobs(jobs, max_members, self.max_jobs)
        log.info("%d jobs to train in %d program(s)", len(jobs), len(groups))
        log.debug("at most %s members (jobs x seeds) per program", max_members)
        with _SweepBar(len(jobs), enabled=bool(self.config.get("progress", True))) as bar:
            def on_group(gid: int, group: Any, statuses: list[str], seconds: float) -> None:
                from vgrad.train import describe_net

                t = _group_timing(group)
                bar.bar.clear()  # the log line on a line of its own; the bar redrawn below
                seeds = {job.cfg.seeds for job in group.jobs}
                size = (f"{len(group.jobs)} job(s) x {seeds.pop()} seed(s)" if len(seeds) == 1
                        else f"{len(group.jobs)} jobs, {group.n_members} seeds in all")
                log.info("program %d of %d: %s of %s, compiled in %.1f s, trained in %.1f s: "
                         "%s", gid + 1, len(groups), size,
                         describe_net(group.jobs[0].cfg, group.jobs[0].data, act=len(
                             {job.cfg.act.name for job in group.jobs}) == 1),
                         t.get("compile_s", 0.0), t.get("run_s", 0.0),
                         ", ".join(f"{s} {statuses.count(s)}" for s in sorted(set(statuses))))
                log.debug("program %d: %d members", gid + 1, group.n_members)
                bar.group_done(group)

            try:
                results = runner.train_jobs(jobs, max_members, bar.progress, on_group,
                                            max_jobs=self.max_jobs)
            except runner.Interrupted:
                callback.write_runs_table(sweep_dir)
                raise
        runner.OUTCOMES.trained.update(results)

    def _max_members(self, jobs: list[Any]) -> int | None:
        from vgrad import group as vgroup

        per_member = max(vgroup.member_bytes(job) for job in jobs)
        return max(1, int(self.memory_budget // per_member))

    # -- 4. Hydra's own per-job step --

    def _report(self, p: _Planned) -> JobReturn:
        from vgrad import runner

        assert self.hydra_context is not None and self.task_function is not None
        if p.refused is not None:  # never touch a folder holding another config's run
            runner.OUTCOMES.failed.append((p.run_dir, str(p.refused), True))
            return _untouched(p, "failed")
        if p.ended is not None:  # an earlier run of this config: its folder stays as it is
            log.info("%s already holds an ended run of this config (%s): skipped "
                     "(resume=false trains it again)", p.run_dir, p.ended)
            runner.OUTCOMES.ended.append(p.ended)
            return _untouched(p, p.ended)
        try:
            ret = run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                          config=p.config, job_dir_key="hydra.sweep.dir",
                          job_subdir_key="hydra.sweep.subdir")
        except OSError as exc:  # Hydra could not write the job's folder (full, read-only)
            error = f"{type(exc).__name__}: {exc}"
            log.error("job %d: %s", p.idx, error)
            runner.OUTCOMES.failed.append((p.run_dir, error, False))
            ret = _untouched(p, "failed")
        assert self.config is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret


class Composer:
    """Hydra's composition of a sweep's jobs (``load_sweep_config``), done once per set
    of config-group choices.

    Hydra composes every job from scratch (its defaults tree, every config file, then
    the job's overrides): ~0.25 s a job, minutes for a sweep of thousands of short runs
    where training takes seconds. A job's overrides are of two kinds, as Hydra's own
    ``defaults_list.Overrides`` sorts them: those that choose config groups (``act=tanh``,
    ``+experiment=visualize``, ``~group``, ``group@pkg=...``) shape the defaults tree;
    the others (``optim.lr=0.01``, ``+model.args.k=3``, ``++x=1``, ``~key``) are applied
    to the composed config afterwards, by ``ConfigLoaderImpl._apply_overrides_to_config``.
    So the config of a job is that of its group choices, composed once by Hydra, with
    its other overrides applied by Hydra's own function and ``hydra.overrides.task`` and
    ``hydra.job.override_dirname`` set as Hydra sets them; tests compare the result with
    ``load_sweep_config`` for every override form the README shows. A job overriding
    ``hydra.*`` keys, or anything this shortcut does not recognise, is composed by
    Hydra in full.
    """

    def __init__(self, loader: Any, master: DictConfig) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        self.loader, self.master = loader, master
        self.parser = OverridesParser.create()
        self.bases: dict[tuple[str, ...], DictConfig] = {}
        try:  # the repository Hydra composes with (the master's search path included)
            _, self.repo = loader._parse_overrides_and_create_caching_repo(
                master.hydra.job.config_name, list(master.hydra.overrides.hydra))
        except Exception:  # noqa: BLE001 (another Hydra: compose every job in full)
            self.repo = None

    def _chooses_group(self, override: Any) -> bool:
        if override.package is not None:
            return True
        return (self.repo.group_exists(override.key_or_group)
                and not isinstance(override.value(), dict))

    def compose(self, overrides: list[str]) -> DictConfig:
        from hydra._internal.config_loader_impl import (
            ConfigLoaderImpl,
            get_overrides_dirname,
        )

        parsed = self.parser.parse_overrides(overrides) if self.repo is not None else None
        if parsed is None or any(o.is_hydra_override() or o.is_sweep_override()
                                 for o in parsed):
            return self.loader.load_sweep_config(self.master, overrides)
        groups = [o for o in parsed if self._chooses_group(o)]
        values = [o for o in parsed if not self._chooses_group(o)]
        key = tuple(o.input_line for o in groups)
        if key not in self.bases:
            self.bases[key] = self.loader.load_sweep_config(self.master, list(key))
        cfg = copy.deepcopy(self.bases[key])
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        with open_dict(cfg.hydra):
            cfg.hydra.overrides.task = [o.input_line for o in parsed]
            dirname = cfg.hydra.job.config.override_dirname
            cfg.hydra.job.override_dirname = get_overrides_dirname(
                overrides=parsed, kv_sep=dirname.kv_sep, item_sep=dirname.item_sep,
                exclude_keys=dirname.exclude_keys)
        OmegaConf.copy_cache(from_config=self.master, to_config=cfg)
        return cfg


def _untouched(p: _Planned, status: str) -> JobReturn:
    """The result of a job whose folder this sweep leaves alone (no ``run_job``)."""
    ret = JobReturn(overrides=list(p.config.hydra.overrides.task), cfg=p.task,
                    hydra_cfg=p.config, working_dir=os.getcwd(),
                    task_name=p.config.hydra.job.name, status=JobStatus.COMPLETED)
    ret.return_value = status
    return ret


def _task_config(cfg: DictConfig) -> DictConfig:
    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def _group_timing(group: Any) -> dict[str, float]:
    from vgrad import store

    try:
        return store.read_summary(group.jobs[0].run_dir)["timing"]
    except (OSError, ValueError, KeyError):
        return {}


class _SweepBar:
    """One progress bar for the sweep: jobs trained out of jobs to train, with an ETA;
    "compiling" until a program's first chunk reports."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="job", disable=not enabled or None, leave=False,
                        desc="compiling",
                        bar_format="{l_bar}{bar}| {n:.1f}/{total} jobs [{elapsed}<{remaining}]")
        self.finished = 0.0
        self.compiling = True

    def progress(self, group: Any, epochs_done: int) -> None:
        first = group.jobs[0].epochs_done
        epochs = group.cfg.epochs
        fraction = (epochs_done - first) / max(epochs - first, 1)
        if self.compiling:
            self.bar.set_description("", refresh=False)
            self.compiling = False
        self.bar.n = self.finished + len(group.jobs) * fraction
        self.bar.refresh()

    def group_done(self, group: Any) -> None:
        self.finished += len(group.jobs)
        self.bar.n = self.finished
        if self.finished < self.bar.total:  # the next program compiles
            self.bar.set_description("compiling", refresh=False)
            self.compiling = True
        self.bar.refresh()

    def __enter__(self) -> "_SweepBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()
