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
   in step 3. (``_run_job`` takes its steps without its copies of the config: the same
   files, byte for byte; jobs it does not cover get ``run_job`` itself.) A job skipped
   because its folder holds an ended run of its config is left
   untouched, byte for byte. (A sweep killed during
   step 3 leaves job folders without ``.hydra/``: their ``summary.json`` holds the
   config, which is all that resuming and the analysis read.)

Hydra imports this module while scanning for plugins: vgrad is imported in ``launch``.
(No ``from __future__ import annotations``: Hydra's scanner runs the module before it
is in ``sys.modules``, where dataclasses look string annotations up.)
"""

import copy
import gc
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core import utils as hydra_utils
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (
    JobReturn,
    JobRuntime,
    JobStatus,
    configure_log,
    filter_overrides,
    run_job,
)
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
        self.pieces = _YamlPieces()  # (the yaml of this sweep's jobs)

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
        # Python's garbage collector scans every object of the process at each full
        # collection, and composing a sweep's jobs makes many that live through it
        # (thousands of config nodes a job): 10 full collections, 3 s, for 1,000 jobs.
        # What the process holds already (the modules, JAX's) is moved out of its sight
        # ("frozen") until the sweep ends, and while the jobs are composed (which makes
        # little garbage) it waits, then collects once. (A process that froze objects
        # itself keeps them frozen: the launcher freezes and unfreezes only when nothing
        # was.)
        enabled = gc.isenabled()
        freeze = gc.get_freeze_count() == 0
        if freeze:
            gc.freeze()
        try:
            gc.disable()
            with store.sweep_lock(sweep_dir):  # (taken already by vgrad's sweeper)
                try:
                    planned = self._plan(job_overrides, initial_job_idx, sweep_dir)
                finally:
                    if enabled:
                        gc.enable()
                        gc.collect()
                self._train(planned, sweep_dir)
                return [self._report(p) for p in planned]
        finally:
            if enabled:
                gc.enable()
            if freeze:
                gc.unfreeze()
            self.pieces = _YamlPieces()

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
                _hydra_config_is(cfg)  # (for ${hydra:...} in the job's own config)
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
            if self._why_run_job(p.config) is None:
                trained = p.run_dir in runner.OUTCOMES.trained
                ret = _run_job(self.hydra_context, self.task_function, p.config,
                               task=p.task if trained else None, pieces=self.pieces)
            else:
                ret = run_job(hydra_context=self.hydra_context,
                              task_function=self.task_function, config=p.config,
                              job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        except OSError as exc:  # Hydra could not write the job's folder (full, read-only)
            error = f"{type(exc).__name__}: {exc}"
            log.error("job %d: %s", p.idx, error)
            runner.OUTCOMES.failed.append((p.run_dir, error, False))
            ret = _untouched(p, "failed")
        assert self.config is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret

    def _why_run_job(self, config: DictConfig) -> str | None:
        """Why this job needs Hydra's own ``run_job`` rather than :func:`_run_job`, or
        None: a callback with job hooks (it may read what ``_run_job`` does not build),
        a job that changes the working directory, sets environment variables or
        overrides ``hydra.*`` keys itself."""
        assert self.hydra_context is not None
        hooked = [type(c).__name__ for c in self.hydra_context.callbacks.callbacks
                  if _hooks_jobs(c)]
        if hooked:
            return f"callbacks with job hooks: {', '.join(hooked)}"
        if _chdir(config):
            return "hydra.job.chdir"
        if config.hydra.job.env_set:
            return "hydra.job.env_set"
        assert self.config is not None  # (the sweep's: its hydra.* overrides are every job's)
        if (OmegaConf.to_container(config.hydra.overrides.hydra)  # (as written: unresolved)
                != OmegaConf.to_container(self.config.hydra.overrides.hydra)):
            return "the job overrides hydra.* keys"
        return None


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
        # Each distinct override is parsed and sorted once (the jobs of a sweep share
        # most of theirs): Hydra's parser takes ~0.1 ms an override, and an Override is
        # not changed by its use (its value() is a new object at every call).
        self.parsed: dict[str, Any] = {}
        self.chooses: dict[str, bool] = {}
        try:  # the repository Hydra composes with (the master's search path included)
            _, self.repo = loader._parse_overrides_and_create_caching_repo(
                master.hydra.job.config_name, list(master.hydra.overrides.hydra))
        except Exception:  # noqa: BLE001 (another Hydra: compose every job in full)
            self.repo = None

    def _chooses_group(self, override: Any) -> bool:
        line = override.input_line
        if line not in self.chooses:
            self.chooses[line] = override.package is not None or (
                self.repo.group_exists(override.key_or_group)
                and not isinstance(override.value(), dict))
        return self.chooses[line]

    def _parse(self, overrides: list[str]) -> list[Any]:
        """``OverridesParser.parse_overrides(overrides)``, each distinct line parsed once
        (a bad one raises as there: the first in the list)."""
        for line in overrides:
            if line not in self.parsed:
                self.parsed[line] = self.parser.parse_overrides([line])[0]
        return [self.parsed[line] for line in overrides]

    def compose(self, overrides: list[str]) -> DictConfig:
        from hydra._internal.config_loader_impl import (
            ConfigLoaderImpl,
            get_overrides_dirname,
        )

        parsed = self._parse(overrides) if self.repo is not None else None
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
    """The job's own config: a copy of ``cfg`` without its hydra node, as Hydra's
    ``run_job`` makes it (``deepcopy``, then ``del task["hydra"]``), without copying the
    hydra node (two thirds of the copy) only to delete it."""
    content = cfg.__dict__.get("_content")
    if not isinstance(content, dict) or "hydra" not in content:
        task = copy.deepcopy(cfg)
        with read_write(task), open_dict(task):
            del task["hydra"]
        return task
    cfg.__dict__["_content"] = {k: v for k, v in content.items() if k != "hydra"}
    try:
        return copy.deepcopy(cfg)
    finally:
        cfg.__dict__["_content"] = content


def _hydra_config_is(cfg: DictConfig) -> None:
    """Make ``HydraConfig.get()`` (and so the ``${hydra:...}`` resolver) read the job's
    hydra node, as ``HydraConfig.instance().set_config(cfg)`` does (it also makes the
    node read-only), without its copy of the node: ``HydraConfig.get()`` returns
    ``cfg.hydra`` itself, whose values and parent (``cfg``) are those of the copy."""
    OmegaConf.set_readonly(cfg.hydra, True)
    HydraConfig.instance().cfg = cfg  # type: ignore[assignment]


def _hooks_jobs(callback: Any) -> bool:
    """Whether a Hydra callback does anything on a job's start or end."""
    from hydra.experimental.callback import Callback

    return any(getattr(type(callback), name, None) is not getattr(Callback, name)
               for name in ("on_job_start", "on_job_end"))


def _chdir(config: DictConfig) -> bool:
    """Whether Hydra's ``run_job`` changes into the job's folder (``hydra.job.chdir``;
    unset: as the version base says, 1.2 and later not)."""
    from hydra import version

    chdir = config.hydra.job.chdir
    return chdir if chdir is not None else not version.base_at_least("1.2")


def _yaml(container: Any) -> str:
    """``OmegaConf.to_yaml`` of a config, from its ``OmegaConf.to_container(...,
    enum_to_str=True)``."""
    import yaml
    from omegaconf._utils import get_omega_conf_dumper

    return yaml.dump(container, default_flow_style=False, allow_unicode=True,
                     sort_keys=False, Dumper=get_omega_conf_dumper())


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _plain(value: Any, seen: set[int]) -> bool:
    """Whether a container holds only dicts, lists and scalars, none of them twice
    (what ``OmegaConf.to_container`` makes: yaml then writes no anchors)."""
    kind = type(value)
    if kind is dict or kind is list:
        if id(value) in seen:
            return False
        seen.add(id(value))
        if kind is list:
            return all(_plain(v, seen) for v in value)
        return all(type(k) in _SCALARS and _plain(v, seen) for k, v in value.items())
    return kind in _SCALARS


def _nest(path: tuple[str, ...], mapping: dict[str, Any]) -> dict[str, Any]:
    """``mapping`` under the keys of ``path``: ``{a: {b: mapping}}`` for ``(a, b)``."""
    for key in reversed(path):
        mapping = {key: mapping}
    return mapping


def _head(path: tuple[str, ...], depth: int = 0) -> str:
    """The lines yaml opens ``_nest(path, ...)`` with, from ``depth``: ``a:``, ``  b:``."""
    return "".join(f"{'  ' * (depth + i)}{key}:\n" for i, key in enumerate(path))


class _YamlPieces:
    """``_yaml`` of a sweep's job configs, entry by entry, each distinct entry dumped
    once: the jobs of a sweep share most of their config (and of Hydra's), and PyYAML
    took ~5 ms a job for the two files.

    A block mapping's yaml is its entries' yaml one after the other: each entry starts
    on a line of its own at the mapping's indentation, and how PyYAML writes it depends
    only on that indentation and the entry (no anchors: ``_plain``; no block scalars:
    OmegaConf's dumper quotes or writes plain). So ``{k1: v1, k2: v2}`` is
    ``yaml({k1: v1}) + yaml({k2: v2})``, and ``{hydra: {k1: v1, ...}}`` is ``hydra:``
    followed by each ``yaml({hydra: {k: v}})`` less that first line; likewise one level
    further down (``hydra.runtime``'s entries, ``optim``'s). An entry is known by where
    it is, its key and its ``repr`` (which tells apart what yaml writes differently:
    types, floats, quotes); each piece is checked to open with the lines of where it
    is. Anything else is dumped whole. (Tested against ``_yaml``.)
    """

    #: Entries are split down to this depth (1: the top level's entries only).
    DEPTH = 3

    def __init__(self) -> None:
        self.pieces: dict[tuple[tuple[str, ...], str, str], str] = {}

    def dump(self, mapping: dict[str, Any], under: str | None = None) -> str:
        """``_yaml(mapping)``, or ``_yaml({under: mapping})``."""
        path = () if under is None else (under,)
        whole = _nest(path, mapping)
        if not _plain(whole, set()):
            return _yaml(whole)
        entries = self._entries(path, mapping)
        return _yaml(whole) if entries is None else _head(path) + entries

    def _entries(self, path: tuple[str, ...], mapping: dict[str, Any]
                 ) -> str | None:
        """The yaml of ``_nest(path, mapping)`` less the lines of ``path``, or None
        (not a mapping to split: empty, or with keys other than strings)."""
        if not mapping or not all(type(k) is str for k in mapping):
            return None
        head = _head(path)
        out = []
        for key, value in mapping.items():
            if type(value) is dict and len(path) + 1 < self.DEPTH:
                inner = self._entries((*path, key), value)
                if inner is not None:  # (its pieces open with this key's line)
                    out.append(_head((key,), len(path)) + inner)
                    continue
            name = (path, key, repr(value))
            piece = self.pieces.get(name)
            if piece is None:
                piece = _yaml(_nest(path, {key: value}))
                if not piece.startswith(head):  # (a key yaml writes otherwise)
                    return None
                piece = self.pieces[name] = piece[len(head):]
            out.append(piece)
        return "".join(out)


def _save(text: str, filename: str, output_dir: Path) -> None:
    """Hydra's ``_save_config``, given the text."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(str(output_dir / filename), "w", encoding="utf-8") as file:
        file.write(text)


def _run_job(hydra_context: HydraContext, task_function: TaskFunction,
             config: DictConfig, task: DictConfig | None = None,
             pieces: "_YamlPieces | None" = None) -> JobReturn:
    """Hydra's ``run_job`` for a job of a sweep (``hydra.sweep.dir``/``subdir``), less
    its copies of the config: ~40 ms a job, most of what a grouped sweep of short runs
    spent per job. The same steps in the same order, with the same effects: the job's
    folder, its job log (``hydra.job_logging``), ``.hydra/config.yaml``, ``hydra.yaml``
    and ``overrides.yaml`` (the same bytes: both dump the same containers with
    OmegaConf's dumper; tested against ``run_job``), ``HydraConfig.get()`` and
    ``${hydra:...}`` giving the job's hydra node, the callbacks' ``on_job_start`` and
    ``on_job_end``, the task function called with a copy of the job's own config. What
    it does not do, ``VgradLauncher._why_run_job`` leaves to ``run_job``: changing the
    working directory, setting environment variables, callbacks with job hooks.

    ``task``: the job's own config, given to the task function in place of a fresh copy
    of ``config`` without its hydra node (the launcher's, for a job it trained: the task
    function only reports it). ``pieces``: the yaml of the sweep's earlier jobs.
    """
    callbacks = hydra_context.callbacks
    orig_hydra_cfg = HydraConfig.instance().cfg
    _hydra_config_is(config)  # (for ${hydra:...} in the folder's name)
    output_dir = str(OmegaConf.select(config, "hydra.sweep.dir"))
    subdir = str(OmegaConf.select(config, "hydra.sweep.subdir"))
    output_dir = os.path.join(output_dir, subdir)
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = os.path.abspath(output_dir)
    try:
        ret = JobReturn()
        task_cfg = _task_config(config) if task is None else task
        ret.cfg = task_cfg
        ret.hydra_cfg = config  # (run_job's: a copy of the hydra node; read by nothing)
        overrides = OmegaConf.to_container(config.hydra.overrides.task)
        assert isinstance(overrides, list)
        ret.overrides = overrides
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        ret.working_dir = os.getcwd()
        configure_log(config.hydra.job_logging, config.hydra.verbose)
        if config.hydra.output_subdir is not None:
            hydra_output = Path(config.hydra.runtime.output_dir) / Path(
                config.hydra.output_subdir)
            # One container of the whole config for config.yaml (the job's own keys) and
            # hydra.yaml ({hydra: ...}): what run_job dumps from its two copies.
            container = OmegaConf.to_container(config, resolve=False, enum_to_str=True)
            assert isinstance(container, dict)
            hydra = container.pop("hydra")
            pieces = pieces or _YamlPieces()
            _save(pieces.dump(container), "config.yaml", hydra_output)
            _save(pieces.dump(hydra, under="hydra"), "hydra.yaml", hydra_output)
            _save(OmegaConf.to_yaml(config.hydra.overrides.task), "overrides.yaml",
                  hydra_output)
        callbacks.on_job_start(config=config, task_function=task_function)
        try:
            ret.return_value = task_function(task_cfg)
            ret.status = JobStatus.COMPLETED
        except Exception as e:  # noqa: BLE001 (as run_job: the sweeper reports it)
            ret.return_value = e
            ret.status = JobStatus.FAILED
        ret.task_name = JobRuntime.instance().get("name")
        getattr(hydra_utils, "_flush_loggers", lambda: None)()  # (Hydra's private step)
        callbacks.on_job_end(config=config, job_return=ret)
        return ret
    finally:
        HydraConfig.instance().cfg = orig_hydra_cfg


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
