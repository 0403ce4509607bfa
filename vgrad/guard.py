"""A single run's folder, guarded: refused before Hydra writes into it, and, when a run
is refused later, cleaned of exactly what this process created, nothing more.

Hydra makes a run's folder and writes ``.hydra/`` and the job log into it before vgrad's
task function starts. :class:`RunGuard`, a Hydra callback (``hydra.callbacks.vgrad_run``
in ``conf/config.yaml``), runs just before that, in ``on_run_start``:

1. it validates the config and looks at the folder (a link where vgrad or Hydra will
   write, a run of another config), and refuses the run there: nothing is created or
   overwritten. Hydra turns a callback's ``Exception`` into a warning and goes on, so the
   refusal travels as :class:`Refused`, a ``BaseException`` (as ``SystemExit`` does),
   which ``vgrad.train.main`` prints as one line;
2. it notes what the folder held, so that a run refused once its data is loaded (a
   missing dataset folder, a batch larger than the training set) can :func:`undo`
   Hydra's writes: the files and folders this process created are removed, the
   ``.hydra/`` files it overwrote get their old bytes back, and nothing else is touched
   (a folder of the user's, its logs included, stays as it was).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from vgrad import store

#: What Hydra writes into a run folder's ``.hydra/`` (``hydra.output_subdir``).
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
#: The folder of TensorBoard events (``tensorboard=true``; ``vgrad.tensorboard``).
TENSORBOARD = "tensorboard"


class Refused(BaseException):  # noqa: N818 (a refusal, raised through Hydra's callbacks)
    """A run refused before Hydra wrote anything; ``error`` says why, on one line."""

    def __init__(self, error: Exception):
        self.error = error
        super().__init__(str(error))


@dataclass
class Snapshot:
    """What a run folder held before Hydra wrote into it."""

    run_dir: Path
    #: Folders that did not exist (the run folder and its missing parents), deepest first.
    created: list[Path] = field(default_factory=list)
    #: The names of the folder's entries.
    entries: set[str] = field(default_factory=set)
    #: ``.hydra/`` existed; the bytes of the files of it that Hydra rewrites.
    hydra_existed: bool = False
    hydra_files: dict[str, bytes] = field(default_factory=dict)
    #: The job log Hydra opens in the folder (``<job name>.log``).
    log_name: str = ""
    #: Hydra's folder of config files (``hydra.output_subdir``; None: none written).
    subdir: str | None = ".hydra"


#: Snapshots of the run folders of this process, by absolute path.
SNAPSHOTS: dict[Path, Snapshot] = {}


def snapshot(run_dir: Path, log_name: str, subdir: str | None = ".hydra") -> Snapshot:
    """Note what ``run_dir`` holds now (before Hydra writes into it)."""
    run_dir = Path(run_dir).absolute()
    snap = Snapshot(run_dir, log_name=log_name, subdir=subdir)
    folder = run_dir
    while not folder.exists() and not folder.is_symlink():
        snap.created.append(folder)
        folder = folder.parent
    if run_dir.is_dir():
        snap.entries = {p.name for p in run_dir.iterdir()}
        if subdir is None:
            SNAPSHOTS[run_dir] = snap
            return snap
        hydra = run_dir / subdir
        snap.hydra_existed = hydra.is_dir()
        for name in HYDRA_FILES:
            if (hydra / name).is_file():
                snap.hydra_files[name] = (hydra / name).read_bytes()
    SNAPSHOTS[run_dir] = snap
    return snap


def undo(run_dir: Path) -> None:
    """Remove what this process created in ``run_dir`` since its snapshot, restore the
    ``.hydra/`` files it overwrote; without a snapshot, touch nothing."""
    snap = SNAPSHOTS.pop(Path(run_dir).absolute(), None)
    if snap is None or not snap.run_dir.is_dir() or snap.run_dir.is_symlink():
        return
    hydra = snap.run_dir / (snap.subdir or ".hydra")
    if snap.subdir is not None and hydra.is_dir() and not hydra.is_symlink():
        for name in HYDRA_FILES:
            path = hydra / name
            if path.is_symlink() or not path.is_file():
                continue
            if name in snap.hydra_files:
                if path.read_bytes() != snap.hydra_files[name]:
                    path.write_bytes(snap.hydra_files[name])  # in place: mode and links
            else:
                path.unlink()
        if not snap.hydra_existed:
            with contextlib.suppress(OSError):
                hydra.rmdir()  # only if empty: nothing else of anyone's is removed
    log = snap.run_dir / snap.log_name
    if (snap.log_name and snap.log_name not in snap.entries and log.is_file()
            and not log.is_symlink()):
        log.unlink()
    for folder in snap.created:  # deepest first, each only if empty
        with contextlib.suppress(OSError):
            folder.rmdir()


def check_folder(run_dir: Path, log_name: str, subdir: str | None = ".hydra") -> None:
    """Refuse links where Hydra or vgrad write inside a run folder
    (:class:`vgrad.store.LinkRefused`): Hydra's ``subdir`` (``hydra.output_subdir``)
    and its files, the job log, vgrad's files, the TensorBoard folders. The run folder
    itself may be a link: it is the user's choice (``hydra.run.dir``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    if subdir is not None and store.refuse_link(run_dir / subdir).is_dir():
        store.refuse_links(run_dir / subdir, HYDRA_FILES)
    for name in (*store.RUN_FILES, log_name, TENSORBOARD):
        store.refuse_link(run_dir / name)
    if (run_dir / TENSORBOARD).is_dir():  # tensorboard/<label>/seed_<s>/
        store.refuse_links(run_dir / TENSORBOARD, ("*", "*/seed_*"))


class RunGuard(Callback):
    """Validates a single run and guards its folder before Hydra writes into it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from vgrad import config as vconfig
        from vgrad import runner

        run_dir = Path(str(config.hydra.run.dir))
        log_name = f"{config.hydra.job.name}.log"
        task = copy.deepcopy(config)
        with read_write(task), open_dict(task):
            del task["hydra"]
        subdir = config.hydra.output_subdir
        try:
            check_folder(run_dir, log_name, subdir)
            vconfig.validate(task)
            runner.ended_before(run_dir.absolute(), task)  # another config's run: refuse
        except Exception as exc:  # noqa: BLE001 (bad input of any kind: an unresolvable
            raise Refused(exc) from None  # ${...}, a wrong value, a link, another run)
        snapshot(run_dir, log_name, subdir)
