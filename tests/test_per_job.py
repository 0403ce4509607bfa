"""Hydra's per-job step in vgrad's launcher (``vgrad_launcher._run_job``): Hydra's own
``run_job`` less its copies of the config. A job's folder gets the same ``.hydra/``
files, byte for byte, and the same job log; the task function sees the same config and
``HydraConfig``; jobs that need ``run_job`` (a callback with job hooks, a changed working
directory, environment variables, ``hydra.*`` overrides of their own) get it. The time it
saves is measured in ``benchmarks/per_job_bench.py``."""

from __future__ import annotations

import gc
import logging
import re
import shutil
from pathlib import Path

import pytest
from conftest import CONF_DIR, LIGHT, run_dirs
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobStatus, run_job
from hydra.experimental.callback import Callback
from hydra.types import HydraContext
from omegaconf import OmegaConf, open_dict

from hydra_plugins.vgrad_launcher import vgrad_launcher
from hydra_plugins.vgrad_launcher.vgrad_launcher import Composer

#: Jobs as the sweeper hands them to the launcher, in the override forms the README
#: shows: group choices (``+group=``, ``group=``, ``~group``), values, ``+key=``,
#: ``++key=``, ``~key``, lists, quoted strings, a ``${hydra:...}`` interpolation, jobs
#: that override ``hydra.*`` keys (composed by Hydra in full), and invalid ones (Hydra's
#: step runs for them too: the task function records their error).
JOBS = [
    ["+experiment=visualize", "act=tanh", "optim.lr=0.003"],
    ["act=relu", "init=he_normal", "depth=3", "width=4"],
    ["+model.args.k=3", "++seed=7", "+model.args.drop=1", "~model.args.drop"],
    ["+experiment=visualize", "~experiment", "clip=global_norm", "clip.max=0.5"],
    ["model=custom", "model.target='my_model.SmallResNet'", "+model.args.blocks=4"],
    ["widths=[4,8]", "record.step_probes=[global_norms,gradient_noise]"],
    ["+tag=${hydra:job.num}", "+note='a b: c'"],
    ["hydra.job.name=other", "act=elu"],
    ["hydra.output_subdir=null", "act=elu"],
    ["hydra.output_subdir=meta", "hydra.verbose=true"],
    ["depth=0"],
]


def folder(run_dir: Path) -> dict[str, bytes | str]:
    """A job folder: every file by content, a log by its lines less their time stamps."""
    out: dict[str, bytes | str] = {}
    for p in sorted(run_dir.rglob("*")):
        key = str(p.relative_to(run_dir))
        if p.suffix == ".log":
            out[key] = re.sub(r"^\[[^]]*\]", "", p.read_text(), flags=re.M)
        elif p.is_file():
            out[key] = p.read_bytes()
    return out


def untimed(log: str) -> str:
    """A log less its numbers (seconds, steps per second)."""
    return re.sub(r"\d+(\.\d+)?", "#", log)


@pytest.fixture
def hydra_setup(tmp_path):
    """A composer of jobs, Hydra's context, and this process's logging put back after
    (each job configures logging into its folder, as Hydra does)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            master = compose("config", overrides=[f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                             return_hydra_config=True)
            loader = GlobalHydra.instance().config_loader()
            from hydra._internal.callbacks import Callbacks

            context = HydraContext(config_loader=loader, callbacks=Callbacks(master))
            yield Composer(loader, master), context
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
        for h in root.handlers:
            if h not in handlers:
                h.close()
        root.handlers[:] = handlers
        root.setLevel(level)


def seen_by_task(cfg) -> dict[str, str]:
    """What a task function sees: its config, Hydra's, ``${hydra:...}`` resolved."""
    hydra = HydraConfig.get()
    logging.getLogger("per_job_test").info("job %s in %s", hydra.job.num,
                                          hydra.runtime.output_dir)
    return {"cfg": OmegaConf.to_yaml(cfg),
            "hydra": OmegaConf.to_yaml(hydra),
            "tag": str(cfg.get("tag")),
            "struct": str(OmegaConf.is_struct(cfg)),
            "type": str(OmegaConf.get_type(cfg))}


def test_a_job_folder_is_hydras_run_jobs_own(hydra_setup, tmp_path):
    composer, context = hydra_setup
    for idx, job in enumerate(JOBS):
        got = {}
        for path in ("fast", "hydra"):
            cfg = composer.compose(list(job))
            with open_dict(cfg):
                cfg.hydra.job.id = cfg.hydra.job.num = idx
            if path == "fast":
                ret = vgrad_launcher._run_job(context, seen_by_task, cfg)
            else:
                ret = run_job(seen_by_task, cfg, "hydra.sweep.dir", "hydra.sweep.subdir",
                              context)
            run_dir = tmp_path / "sweep" / str(idx)
            assert ret.status == JobStatus.COMPLETED, (job, ret._return_value)
            got[path] = (folder(run_dir), ret.return_value, ret.overrides, ret.task_name,
                         ret.working_dir, OmegaConf.to_yaml(ret.cfg))
            shutil.rmtree(run_dir)
        assert got["fast"] == got["hydra"], job
        files, seen = got["fast"][:2]
        name = f"{cfg.hydra.job.name}.log"
        assert f"job {idx} in {run_dir}" in files[name], job  # the job's log
        subdir = (None if "hydra.output_subdir=null" in job else "meta"
                  if "hydra.output_subdir=meta" in job else ".hydra")
        assert {k for k in files if k != name} == (
            set() if subdir is None else
            {f"{subdir}/config.yaml", f"{subdir}/hydra.yaml", f"{subdir}/overrides.yaml"})
        if "+tag=${hydra:job.num}" in job:
            assert seen["tag"] == str(idx)


class JobHooks(Callback):
    """A callback with job hooks: the launcher leaves its jobs to Hydra's run_job."""

    jobs: list[str] = []

    def on_job_start(self, config, **kwargs) -> None:
        JobHooks.jobs.append(str(HydraConfig.instance().cfg.hydra.runtime.output_dir))


@pytest.fixture
def paths(monkeypatch):
    """Counts the jobs that go through ``_run_job`` and through Hydra's ``run_job``."""
    from hydra.core.plugins import Plugins

    Plugins.instance()  # (its first scan runs the launcher's module again: before patching)
    counts = {"fast": 0, "hydra": 0}

    def counted(name, real):
        def count(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return count

    monkeypatch.setattr(vgrad_launcher, "_run_job", counted("fast", vgrad_launcher._run_job))
    monkeypatch.setattr(vgrad_launcher, "run_job", counted("hydra", vgrad_launcher.run_job))
    return counts


#: A tiny sweep of 4 jobs in several override forms: one program.
SWEEP = ["-m", "+experiment=visualize", "act=tanh,relu", "optim.lr=0.01,0.02",
         "+model.args.k=3", "++seed=3", "+model.args.drop=1", "~model.args.drop",
         "epochs=1", "seeds=1", "data.n_samples=128", "progress=false", *LIGHT]


def test_a_sweeps_job_folders_are_those_hydras_run_job_writes(cli, tmp_path, monkeypatch,
                                                              paths):
    sweep = tmp_path / "sweep"
    code, _, err = cli(*SWEEP, f"hydra.sweep.dir={sweep}")
    assert code == 0, err
    assert paths == {"fast": 4, "hydra": 0}
    fast = {d.name: folder(d) for d in run_dirs(sweep)}
    shutil.rmtree(sweep)
    # (the class of Hydra's plugin scan, which ran the module again: not the one imported)
    monkeypatch.setattr(vgrad_launcher.VgradLauncher, "_why_run_job",
                        lambda self, config: "the test")
    code, _, err = cli(*SWEEP, f"hydra.sweep.dir={sweep}")
    assert code == 0, err
    assert paths == {"fast": 4, "hydra": 4}
    hydras = {d.name: folder(d) for d in run_dirs(sweep)}
    assert fast.keys() == hydras.keys() == {"0", "1", "2", "3"}
    for name, files in fast.items():
        for key in (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"):
            assert files[key] == hydras[name][key], (name, key)
        # The job log holds the same lines (the task function's report; times aside).
        assert untimed(files["train.log"]) == untimed(hydras[name]["train.log"]), name
        assert "completed in" in files["train.log"]


@pytest.mark.parametrize("overrides", [
    ["+hydra.callbacks.job_hooks._target_=test_per_job.JobHooks"],
    ["hydra.job.chdir=true"],
    ["+hydra.job.env_set.VGRAD_PER_JOB_TEST=a"],
])
def test_jobs_that_need_hydras_run_job_get_it(cli, tmp_path, paths, overrides):
    # Invalid jobs (depth=0): Hydra's step runs for them all the same, and nothing compiles.
    JobHooks.jobs.clear()
    sweep = tmp_path / "sweep"
    code, _, err = cli("-m", "depth=0", "act=tanh,relu", "progress=false", *overrides,
                       f"hydra.sweep.dir={sweep}")
    assert code == 2, err
    assert paths == {"fast": 0, "hydra": 2}
    for run_dir in (sweep / "0", sweep / "1"):
        assert (run_dir / ".hydra" / "hydra.yaml").is_file()
    if "job_hooks" in overrides[0]:
        assert JobHooks.jobs == [str(sweep / "0"), str(sweep / "1")]


def test_what_leaves_a_job_to_hydras_run_job(hydra_setup):
    composer, context = hydra_setup
    launcher = vgrad_launcher.VgradLauncher()
    launcher.hydra_context, launcher.config = context, composer.master
    assert launcher._why_run_job(composer.compose(["act=tanh"])) is None
    assert launcher._why_run_job(composer.compose(["hydra.job.name=x"])) == (
        "the job overrides hydra.* keys")
    assert launcher._why_run_job(composer.compose(["+hydra.job.env_set.A=b"])) == (
        "hydra.job.env_set")
    assert launcher._why_run_job(composer.compose(["hydra.job.chdir=true"])) == (
        "hydra.job.chdir")
    context.callbacks.callbacks.append(JobHooks())
    assert launcher._why_run_job(composer.compose(["act=tanh"])) == (
        "callbacks with job hooks: JobHooks")


def test_a_plain_sweep_takes_the_fast_path(cli, tmp_path, paths):
    code, _, err = cli("-m", "depth=0", "act=tanh,relu", "progress=false",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert code == 2, err
    assert paths == {"fast": 2, "hydra": 0}
    # The garbage collector, held while the jobs were composed, is back as it was.
    assert gc.isenabled() and gc.get_freeze_count() == 0
    code, _, err = cli("-m", "act=tanh,bogus", f"hydra.sweep.dir={tmp_path / 'bad'}")
    assert code == 2 and "act=bogus" in err
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_the_job_config_is_copied_without_its_hydra_node(hydra_setup):
    """``_task_config`` gives what ``run_job``'s deepcopy-and-delete gives."""
    import copy

    composer, _ = hydra_setup
    for job in JOBS:
        cfg = composer.compose(list(job))
        ours = vgrad_launcher._task_config(cfg)
        theirs = copy.deepcopy(cfg)
        with open_dict(theirs):
            del theirs["hydra"]
        assert OmegaConf.to_yaml(ours) == OmegaConf.to_yaml(theirs)
        assert ours._metadata == theirs._metadata
        assert "hydra" in cfg and "hydra" not in ours
        assert OmegaConf.is_struct(ours) == OmegaConf.is_struct(theirs)
        assert OmegaConf.is_readonly(ours) == OmegaConf.is_readonly(theirs)


#: Values yaml writes in many ways: quoted or not, folded, flow style, keys quoted.
ODD = {
    "int": 1, "float": 1e-20, "big": 1e20, "neg_zero": -0.0, "nan": float("nan"),
    "inf": float("inf"), "bool": True, "none": None, "one": "1", "true": "true",
    "null_str": "null", "empty": "", "sci": "1e-3", "colon": "a: b", "hash": "a #b",
    "dash": "- a", "star": "*a", "long": " ".join(["word"] * 40), "lines": "a\nb\n\nc",
    "unicode": "σ²—ü", "quote": "it's \"so\"", "interp": "${hydra:job.num}",
    "missing": "???", "true_key": {"true": 1, "1": 2, "a: b": 3, "x" * 200: 4},
    "int_keys": {1: "a", 2: {3: "b"}}, "empty_dict": {}, "empty_list": [],
    "lists": [[1, 2], [], [{"a": 1, "b": [None, {}]}]], "dicts": [{"a": {"b": {"c": 1}}}],
    "deep": {"a": {"b": {"c": {"d": [1, "2", 3.0]}}, "e": "f"}, "g": {}},
}


def test_yaml_pieces_are_yamls_own():
    import copy
    import itertools

    pieces = vgrad_launcher._YamlPieces()  # (one for all: pieces are reused)
    variants = [ODD, {**ODD, "int": 2, "deep": {"a": {"b": 1}}},
                {"deep": ODD["deep"], "int": 1}, {"only": {"a": ODD}}, {"x": 1.0}, {"x": 1},
                {"x": True}, {"x": "1"}, {"x": "1.0"}, {"a": {"x": 1.0}}, {"a": {"x": 1}}]
    for mapping, under in itertools.product(variants, (None, "hydra", "true")):
        want = vgrad_launcher._yaml(mapping if under is None else {under: mapping})
        assert pieces.dump(copy.deepcopy(mapping), under) == want, (mapping, under)
    shared = [1, 2]  # (the same list twice: yaml writes an anchor; dumped whole)
    mapping = {"a": shared, "b": {"c": shared}}
    assert pieces.dump(mapping) == vgrad_launcher._yaml(mapping)
    assert "&id001" in pieces.dump(mapping)


def test_yaml_pieces_of_job_configs_are_run_jobs_files(hydra_setup):
    composer, _ = hydra_setup
    pieces = vgrad_launcher._YamlPieces()
    for _ in range(2):  # (the second time from pieces of the first)
        for job in JOBS:
            cfg = composer.compose(list(job))
            container = OmegaConf.to_container(cfg, enum_to_str=True)
            hydra = container.pop("hydra")
            assert pieces.dump(container) == OmegaConf.to_yaml(
                vgrad_launcher._task_config(cfg)), job
            assert pieces.dump(hydra, under="hydra") == OmegaConf.to_yaml(
                OmegaConf.masked_copy(cfg, "hydra")), job
