"""vgrad's grouped launcher for clusters: one submitit task per program, not per job.

``hydra/launcher=vgrad_submitit`` (``hydra.launcher.cluster=slurm``, the default, or
``local`` to run the tasks as processes of this machine). Hydra's submitit launcher
submits every job of a sweep as its own SLURM task, so each task compiles a program for
one job; this one plans and validates the sweep exactly as vgrad's launcher does
(folders, resume, refusals), groups its jobs by program structure and submits **one
task per group** (as a SLURM job array), each training its group as one program and
writing its jobs' folders. The launcher waits for the tasks, then writes each job's
``.hydra/`` files and runs Hydra's per-job step, as vgrad's launcher does. A task that
is killed (time limit, preemption) leaves its jobs' folders with their last saved
chunk; running the same sweep again resumes them where they stopped
(``record.save_every_s``), and skips the jobs that ended.

Hydra imports this module while scanning for plugins: vgrad and submitit are imported
when a sweep launches. (No ``from __future__ import annotations``: see vgrad_launcher.)
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from hydra_plugins.vgrad_launcher.vgrad_launcher import VgradLauncher

log = logging.getLogger("vgrad")


@dataclass
class VgradSubmititConf:
    _target_: str = "hydra_plugins.vgrad_launcher.vgrad_submitit.VgradSubmititLauncher"
    # slurm: a SLURM job array, one task per program; local: processes of this machine
    cluster: str = "slurm"
    # where submitit keeps each task's pickles and logs
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"
    timeout_min: int = 60
    cpus_per_task: Optional[int] = None  # noqa: UP045 (OmegaConf reads it)
    gpus_per_node: Optional[int] = None  # noqa: UP045
    mem_gb: Optional[int] = None  # noqa: UP045
    partition: Optional[str] = None  # noqa: UP045
    # at most this many tasks of the array run at once (null: SLURM's limit)
    array_parallelism: Optional[int] = None  # noqa: UP045
    # any other sbatch option, e.g. {account: abc, qos: high}
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    # as vgrad's launcher: most jobs per program, members' memory per program (GB)
    max_jobs_per_program: Optional[int] = None  # noqa: UP045
    memory_budget_gb: float = 4.0


ConfigStore.instance().store(group="hydra/launcher", name="vgrad_submitit",
                             node=VgradSubmititConf, provider="vgrad")


def train_group(tasks: list, max_jobs: Optional[int]) -> dict:  # noqa: UP045
    """One submitit task: prepare the group's jobs (configs and folders from the sweep)
    and train them as one program; each job's final status by run folder."""
    from vgrad import runner

    jobs = []
    for cfg, run_dir in tasks:
        job = runner.prepare(cfg, Path(run_dir))
        if cfg.resume:
            job.resume = runner.resume_point(Path(run_dir), cfg)
        jobs.append(job)
    return {str(k): v for k, v in runner.train_jobs(jobs, None, max_jobs=max_jobs).items()}


class VgradSubmititLauncher(VgradLauncher):
    def __init__(self, cluster: str = "slurm", submitit_folder: str = ".submitit/%j",
                 timeout_min: int = 60, cpus_per_task: Optional[int] = None,  # noqa: UP045
                 gpus_per_node: Optional[int] = None, mem_gb: Optional[int] = None,  # noqa: UP045
                 partition: Optional[str] = None,  # noqa: UP045
                 array_parallelism: Optional[int] = None,  # noqa: UP045
                 additional_parameters: Optional[dict] = None,  # noqa: UP045
                 max_jobs_per_program: Optional[int] = None,  # noqa: UP045
                 memory_budget_gb: float = 4.0) -> None:
        super().__init__(max_jobs_per_program, memory_budget_gb)
        if cluster not in ("slurm", "local", "debug"):
            raise ValueError(f"hydra.launcher.cluster={cluster!r}: expected slurm, local or "
                             "debug")
        self.cluster, self.folder = cluster, submitit_folder
        self.parameters = {"timeout_min": timeout_min, "cpus_per_task": cpus_per_task,
                           "gpus_per_node": gpus_per_node, "mem_gb": mem_gb,
                           "slurm_partition": partition,
                           "slurm_array_parallelism": array_parallelism,
                           "slurm_additional_parameters": dict(additional_parameters or {})}

    def _executor(self, sweep_dir: Path) -> Any:
        try:
            import submitit
        except ModuleNotFoundError:  # (one line, as for hydra/launcher=slurm)
            from vgrad.errors import LAUNCHERS_INSTALL

            raise SystemExit("hydra/launcher=vgrad_submitit needs submitit: "
                             f"{LAUNCHERS_INSTALL}") from None

        executor = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        given = {k: v for k, v in self.parameters.items() if v not in (None, {})}
        if self.cluster != "slurm":
            given = {k: v for k, v in given.items() if not k.startswith("slurm_")}
        executor.update_parameters(name=f"vgrad-{sweep_dir.name}", **given)
        return executor

    def _train_jobs(self, jobs: list[Any], sweep_dir: Path) -> None:
        """One task per group, submitted together (a job array), then awaited."""
        from vgrad import group as vgroup
        from vgrad import runner, store

        groups = vgroup.group_jobs(jobs, self._max_members(jobs), self.max_jobs)
        executor = self._executor(sweep_dir)
        with executor.batch():
            tasks = [executor.submit(train_group, [(job.cfg, str(job.run_dir))
                                                   for job in group.jobs], self.max_jobs)
                     for group in groups]
        log.info("%d jobs in %d program(s): submitted as %d %s task(s) (%s)", len(jobs),
                 len(groups), len(tasks), self.cluster,
                 ", ".join(str(t.job_id) for t in tasks))
        for gid, (task, group) in enumerate(zip(tasks, groups, strict=True)):
            try:
                results = task.result()
            except Exception as exc:  # a task killed or crashed: its folders say how far
                log.error("program %d of %d (task %s) failed: %s", gid + 1, len(groups),
                          task.job_id, str(exc).strip().splitlines()[-1] if str(exc) else exc)
                results = {}
                for job in group.jobs:
                    try:
                        status = store.read_summary(job.run_dir)["status"]
                    except (OSError, ValueError, KeyError):
                        status = "failed"
                    results[str(job.run_dir)] = ("interrupted" if status == "running"
                                                 else status)
            statuses = [results.get(str(job.run_dir), "failed") for job in group.jobs]
            log.info("program %d of %d (task %s): %d job(s): %s", gid + 1, len(groups),
                     task.job_id, len(group.jobs),
                     ", ".join(f"{s} {statuses.count(s)}" for s in sorted(set(statuses))))
            runner.OUTCOMES.trained.update({Path(k): v for k, v in results.items()})
