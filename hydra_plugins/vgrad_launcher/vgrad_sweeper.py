"""vgrad's Hydra sweeper: Hydra's basic sweeper, less its up-front check of every job
when vgrad's launcher runs the sweep.

``hydra/sweeper=vgrad`` (the default in ``conf/config.yaml``). Hydra's basic sweeper
composes every job's config once to check it ("validate_batch_is_legal") and the
launcher then composes it again to run it; composing costs about a quarter of a second
per job, a sizeable part of a grouped sweep that trains in seconds. vgrad's launcher
composes every job before it trains or writes anything, so a bad override still stops
the sweep before any work with Hydra's error; the sweeper leaves the check to it. Any
other launcher (basic, joblib, submitit) gets the basic sweeper's check, unchanged.
It also locks the sweep folder (``vgrad.store.sweep_lock``) before Hydra writes
``multirun.yaml`` into it, whatever the launcher. Everything else (the sweep syntax,
``max_batch_size``, ``hydra.sweeper.params``) is the basic sweeper's.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore

from hydra_plugins.vgrad_launcher.vgrad_launcher import VgradLauncher


@dataclass
class VgradSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.vgrad_launcher.vgrad_sweeper.VgradSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="vgrad", node=VgradSweeperConf,
                             provider="vgrad")


class VgradSweeper(BasicSweeper):
    def sweep(self, arguments: list[str]) -> Any:
        """Lock the sweep folder before Hydra writes ``multirun.yaml`` into it, so that a
        sweep refused because another one is writing there changes nothing of it; refuse
        links planted where the sweep writes its own files."""
        from omegaconf import OmegaConf

        from vgrad import store
        from vgrad.analysis.tables import record_command

        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        store.refuse_links(sweep_dir, ("multirun.yaml", "runs.csv"))
        if not isinstance(self.launcher, VgradLauncher):
            _refuse_links_in_jobs(sweep_dir, self.config)
        with store.sweep_lock(sweep_dir):
            # The sweep's command, kept beside Hydra's multirun.yaml (which each sweep
            # into the folder rewrites): the report lists every command.
            overrides = OmegaConf.to_container(self.config.hydra.overrides, resolve=False)
            record_command(sweep_dir, overrides.get("task", []), overrides.get("hydra", []))
            return super().sweep(arguments)

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        if isinstance(self.launcher, VgradLauncher):
            return  # it composes every job of the batch before it trains any
        super().validate_batch_is_legal(batch)


def _refuse_links_in_jobs(sweep_dir: Path, config: Any) -> None:
    """Other launchers (basic, joblib, submitit) let Hydra write each job's ``.hydra/``
    and log before vgrad sees the job, so links are refused for the whole sweep first:
    a job folder that is a link, or a link where Hydra or vgrad write inside one."""
    from vgrad import guard, store

    log_name = f"{config.hydra.job.name}.log"
    for folder in sorted(sweep_dir.iterdir()):
        if folder.is_symlink() and folder.name.isdigit():
            raise store.LinkRefused(folder)
        if folder.is_dir() and not folder.is_symlink():
            guard.check_folder(folder, log_name, config.hydra.output_subdir)
