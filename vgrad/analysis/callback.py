"""A Hydra callback that summarises a sweep when its last job ends.

Configured in ``conf/config.yaml`` (``hydra.callbacks.vgrad_sweep``), it runs in the
launching process whatever the launcher (basic, joblib, submitit): it writes the sweep's
runs table to ``<sweep dir>/runs.csv`` (whole, and never through a symbolic link planted
there) and logs the one command that draws the report (the console command
``vgrad-report``), quoted for a POSIX shell.
A sweep in which a job failed makes ``python -m vgrad.train`` exit with status 1.
"""

from __future__ import annotations

import logging
import shlex
import warnings
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vgrad.cli import REPORT

log = logging.getLogger("vgrad")

#: Sweep folders whose last summary found failed jobs (read by vgrad.train.main).
FAILED_SWEEPS: list[Path] = []


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_runs_table(Path(config.hydra.sweep.dir))


def write_runs_table(sweep_dir: Path) -> None:
    """Write ``<sweep>/runs.csv`` from the run folders under it and log the report
    command (also when a sweep stops early, for what it finished). A link at
    ``runs.csv`` or an unwritable folder is logged as one error line, never raised."""
    from vgrad import store
    from vgrad.analysis.tables import load_sweep

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sweep = load_sweep(sweep_dir)
            runs = sweep.runs
    except Exception as exc:  # a summary must never turn a finished sweep into a crash
        log.warning("could not summarise the sweep %s: %s", sweep_dir, exc)
        return
    for w in caught:
        log.warning("%s", w.message)
    if runs.empty:
        log.warning("no run of the sweep %s ended", sweep_dir)
        return
    table = sweep_dir / "runs.csv"
    try:
        store.write_text(table, runs.to_csv(index=False))
        written = True
    except store.LinkRefused as exc:  # its message names the link
        log.error("runs table not written: %s", exc)
        written = False
    except OSError as exc:
        log.error("could not write %s: %s", table, exc)
        written = False
    per_run = runs.drop_duplicates("run")
    failed = per_run[per_run["status"] == "failed"]
    if len(failed) or sweep.skipped:
        FAILED_SWEEPS.append(sweep_dir)
    log.info("sweep: %d runs (%s); runs table: %s", len(per_run),
             ", ".join(f"{k} {v}" for k, v in per_run["status"].value_counts().items()),
             table if written else "not written")
    arg = str(sweep_dir)
    if arg.startswith("-"):  # not an option of the command
        arg = f"./{arg}"
    log.info("report: %s %s", REPORT, shlex.quote(arg))
