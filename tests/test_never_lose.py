"""Nothing a user owns is deleted, overwritten or hung on: folders a refused run was
pointed at, links planted where vgrad writes, damaged and foreign runs, runs too large
for memory, stuck processes, unresolved overrides, concurrent sweeps, name overrides."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
from conftest import LIGHT, TINY, one_error_line, run_dirs, script, sweep_locked_by

from vgrad import store
from vgrad.analysis import load_sweep
from vgrad.analysis.tables import sweep_command

REPO = Path(__file__).resolve().parent.parent



def tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under root: files by content, links by target, folders by name."""
    out: dict[str, bytes | str] = {}
    for p in sorted(Path(root).rglob("*")):
        key = str(p.relative_to(root))
        out[key] = (f"-> {p.readlink()}" if p.is_symlink() else "dir" if p.is_dir()
                    else p.read_bytes())
    return out


# --- 1. a refused run removes only what it created -----------------------------------------


def test_a_config_error_leaves_a_folder_of_logs_as_it_was(cli, tmp_path):
    """The issue's reproduction: the old clean-up deleted x/ recursively."""
    logs = tmp_path / "x" / "logs"
    (logs / "archive.log" / "deep").mkdir(parents=True)
    (logs / "archive.log" / "deep" / "d.bin").write_text("data")
    (logs / "app.log").write_text("keep")
    before = tree(tmp_path)
    code, _, err = cli("optim.lr=0", f"hydra.run.dir={logs}")
    assert code == 2
    one_error_line(err, "optim.lr=0")
    assert tree(tmp_path) == before


def test_a_config_error_in_the_current_folder_keeps_it(cli, tmp_path, monkeypatch):
    folder = tmp_path / "y"
    folder.mkdir()
    (folder / "notes.log").write_text("n")
    monkeypatch.chdir(folder)
    code, _, err = cli("optim.lr=0", "hydra.run.dir=.")
    assert code == 2
    one_error_line(err, "optim.lr")
    assert tree(tmp_path) == {"y": "dir", "y/notes.log": b"n"}


def test_a_data_error_undoes_only_what_hydra_wrote(cli, tmp_path):
    """Refused once its data is read: Hydra has written .hydra/ and the job log by then.
    A new folder goes, with the parents this run made; in a folder of the user's, the
    .hydra/ files Hydra overwrote get their bytes back and the user's log stays."""
    bad = ["data=mnist", f"data.path={tmp_path / 'no_such_folder'}"]
    code, _, err = cli(*bad, f"hydra.run.dir={tmp_path / 'new' / 'deep' / 'run'}")
    assert code == 2 and "data.path" in err
    assert not (tmp_path / "new").exists()

    old = tmp_path / "old"
    (old / ".hydra").mkdir(parents=True)
    (old / ".hydra" / "config.yaml").write_text("mine: 1\n")
    (old / "train.log").write_text("earlier lines\n")
    (old / "other.log").write_text("x")
    before = tree(old)
    code, _, err = cli(*bad, f"hydra.run.dir={old}")
    assert code == 2 and "data.path" in err
    after = tree(old)
    assert {k: v for k, v in after.items() if k != "train.log"} == {
        k: v for k, v in before.items() if k != "train.log"}
    assert after["train.log"].startswith(b"earlier lines\n")  # Hydra appends; never truncated


def test_a_run_of_another_config_keeps_its_hydra_files(cli, tmp_path):
    code, _, err = cli(*TINY, *LIGHT, "act=tanh", f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    before = {k: v for k, v in tree(tmp_path).items() if k != "train.log"}
    code, _, err = cli(*TINY, *LIGHT, "act=relu", f"hydra.run.dir={tmp_path}")
    assert code == 2
    one_error_line(err, "holds a run of another config")
    assert {k: v for k, v in tree(tmp_path).items() if k != "train.log"} == before


# --- 2. links ----------------------------------------------------------------------------------


def test_links_planted_in_a_sweep_folder_are_refused_and_their_targets_kept(cli, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in ("a", "b", "c"):
        (victim / name).write_text(f"user's {name}")
    sweep = tmp_path / "S"
    sweep.mkdir()
    for name, target in ((".vgrad.lock", "a"), ("runs.csv", "b"), ("multirun.yaml", "c")):
        (sweep / name).symlink_to(victim / target)
        code, _, err = cli("-m", "act=tanh", *TINY, *LIGHT, f"hydra.sweep.dir={sweep}")
        assert code == 2, err
        one_error_line(err, name, "symbolic link")
        assert tree(victim) == {n: f"user's {n}".encode() for n in ("a", "b", "c")}
        assert not run_dirs(sweep)
        (sweep / name).unlink()


def test_a_linked_job_folder_or_file_refuses_that_job_only(cli, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "summary.json").write_text("user's")
    sweep = tmp_path / "S"
    sweep.mkdir()
    (sweep / "0").symlink_to(victim)  # the job folder itself
    (sweep / "1").mkdir()
    (sweep / "1" / "metrics.npz").symlink_to(victim / "summary.json")  # a file in it
    code, _, err = cli("-m", "act=tanh,relu,sigmoid", *TINY, *LIGHT, f"hydra.sweep.dir={sweep}")
    assert code == 1
    assert (victim / "summary.json").read_text() == "user's"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.is_symlink()
                  and p.name != ".vgrad") == ["1", "2", "3"]  # job 0 went to the next free
    # number; job 1 was refused (.vgrad/: the sweep's command history)
    assert sorted(p.name for p in (sweep / "1").iterdir()) == ["metrics.npz"]
    acts = {store.read_summary(sweep / n)["config"]["act"]["name"] for n in ("2", "3")}
    assert acts == {"tanh", "sigmoid"}
    one_error_line(err, "1/metrics.npz", "symbolic link")


def test_a_single_run_refuses_a_link_where_it_writes(cli, tmp_path):
    victim = tmp_path / "victim.json"
    victim.write_text("user's")
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").symlink_to(victim)
    code, _, err = cli(*TINY, *LIGHT, f"hydra.run.dir={run}")
    assert code == 2
    one_error_line(err, "summary.json", "symbolic link")
    assert victim.read_text() == "user's"
    assert sorted(p.name for p in run.iterdir()) == ["summary.json"]


def test_atomic_writes_refuse_links_and_leave_no_temporary(tmp_path):
    target = tmp_path / "target"
    target.write_text("user's")
    (tmp_path / "out.json").symlink_to(target)
    with pytest.raises(store.LinkRefused, match="out.json"):
        store.write_json(tmp_path / "out.json", {"a": 1})
    assert target.read_text() == "user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "target"]


def test_stale_temporaries_of_others_are_not_removed(tmp_path):
    (tmp_path / ".notes.tmp").write_text("a user's")
    (tmp_path / f".{store.SUMMARY}.abc123.tmp").write_text("half a write")
    store.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp"]


# --- 3. memory and signals -------------------------------------------------------------------


def test_a_run_far_larger_than_memory_is_refused_at_once(cli, tmp_path):
    """The issue's reproduction hung for ever, deaf to signals; the estimate refuses it
    before anything is compiled or allocated (about 1.2 TB for this one)."""
    big = ["seeds=10000", "width=512", "depth=20", "epochs=1", "progress=false"]
    code, _, err = cli(*big, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2
    line = one_error_line(err, "seeds=10000", "GB", "memory")
    assert "fewer seeds" in line
    assert not (tmp_path / "run").exists()
    code, _, err = cli("-m", *big, f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert code == 2 and "seeds=10000" in err and "Traceback" not in err
    assert store.read_summary(tmp_path / "sweep" / "0")["status"] == "failed"


def test_an_allocation_that_fails_anyway_is_one_line_and_a_failed_run(cli, tmp_path,
                                                                       monkeypatch):
    import jax

    from vgrad import loop

    def out_of_memory(group, engine="scan", group_id=0):
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory allocating 1099511627776 bytes.\n"
            "BufferAssignment OOM Debugging.\n(many more lines)")
        yield  # (a generator, as loop.run is)

    monkeypatch.setattr(loop, "run", out_of_memory)
    code, out, err = cli(*TINY, *LIGHT, f"hydra.run.dir={tmp_path}")
    assert code == 1
    line = one_error_line(err, "RESOURCE_EXHAUSTED", "fewer seeds")
    assert "BufferAssignment" not in line and "Traceback" not in out
    summary = store.read_summary(tmp_path)
    assert summary["status"] == "failed" and "RESOURCE_EXHAUSTED" in summary["error"]


def test_a_second_signal_ends_a_process_stuck_in_native_code(tmp_path):
    """The main thread blocked in C (here: libc sleep with the signals masked for it, as
    a transfer or a program that never returns would be) runs no Python handler; the
    watcher ends the process after the second signal."""
    script = textwrap.dedent("""
        import ctypes, signal, sys
        from vgrad import runner
        with runner.stop_on_signals():
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            print("stuck", flush=True)
            ctypes.CDLL(None).sleep(120)
        print("not reached", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "stuck"
        for _ in range(2):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.3)
        t0 = time.monotonic()
        code = proc.wait(timeout=30)
        waited = time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
    assert code == 130
    assert waited < 15
    err = [line for line in proc.stderr.read().splitlines() if line.strip()]
    assert len(err) == 1 and "SIGINT again" in err[0]


# --- 4. damaged and foreign runs -------------------------------------------------------------


#: The sweep ``trained`` runs (and the tests rerun on its damaged copies): few probes, as
#: what is damaged and retrained is the subject, not what is measured.
TRAINED = ["act=tanh,relu", *TINY, *LIGHT]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-job sweep to copy and damage."""
    from conftest import cli_main

    root = tmp_path_factory.mktemp("trained") / "S"
    code = cli_main("-m", *TRAINED, f"hydra.sweep.dir={root}")
    assert code == 0
    return root


def damaged_copy(trained: Path, tmp_path: Path) -> Path:
    sweep = tmp_path / "S"
    shutil.copytree(trained, sweep, symlinks=True)
    return sweep


def drop(run: Path, name: str) -> None:
    arrays = store.read_metrics(run)
    del arrays[name]
    store.write_npz(run / store.METRICS, arrays)


def cut(run: Path, name: str) -> None:
    arrays = store.read_metrics(run)
    arrays[name] = arrays[name][:, :-3]
    store.write_npz(run / store.METRICS, arrays)


@pytest.mark.parametrize("damage", ["layer_names", "step", "epoch", "cut loss"])
def test_a_damaged_run_is_skipped_by_readers_and_retrained(damage, trained, tmp_path, cli):
    sweep = damaged_copy(trained, tmp_path)
    bad = sweep / "1"
    if damage == "cut loss":
        cut(bad, "loss")
    else:
        drop(bad, damage)
    name = damage.split()[-1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sw = load_sweep(sweep)
    assert [r.name for r in sw.runs_list] == ["0"]
    message = " ".join(str(w.message) for w in caught)
    assert str(bad) in message and name in message
    sw.steps(), sw.epochs()  # the readable run reads

    proc = script("scripts/plot_sweep.py", str(sweep), "--x", "act", "--out",
                  str(tmp_path / "fig"))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "error: layer_names" not in proc.stderr

    kept = (sweep / "0" / store.METRICS).read_bytes()
    code, out, err = cli("-m", *TRAINED, f"hydra.sweep.dir={sweep}")
    assert code == 0, err
    assert "damaged run" in out + err
    assert store.metrics_damage(bad, store.read_summary(bad)) is None  # trained again
    assert store.read_metrics(bad)["loss"].shape == store.read_metrics(sweep / "0")["loss"].shape
    assert (sweep / "0" / store.METRICS).read_bytes() == kept  # the whole run untouched


def test_a_truncated_params_file_is_retrained(trained, tmp_path, cli):
    sweep = damaged_copy(trained, tmp_path)
    params = sweep / "0" / store.PARAMS
    params.write_bytes(params.read_bytes()[:200])
    code, out, err = cli("-m", *TRAINED, f"hydra.sweep.dir={sweep}")
    assert code == 0, err
    assert store.npz_loads(params)
    assert set(store.read_npz(params)) == set(store.read_npz(trained / "0" / store.PARAMS))


def test_a_summary_of_unknown_status_is_another_runs_folder(trained, tmp_path, cli):
    sweep = damaged_copy(trained, tmp_path)
    summary = store.read_summary(sweep / "0")
    summary["status"] = "archived"
    store.write_json(sweep / "0" / store.SUMMARY, summary)
    before = tree(sweep / "0")
    code, out, err = cli("-m", *TRAINED, f"hydra.sweep.dir={sweep}")
    assert code == 0, err
    assert tree(sweep / "0") == before  # never overwritten
    assert store.read_summary(sweep / "2")["config"]["act"]["name"] == "tanh"

    code, _, err = cli(*TINY, *LIGHT, "act=tanh", f"hydra.run.dir={sweep / '0'}")
    assert code == 2
    one_error_line(err, "archived")
    assert tree(sweep / "0") == before


# --- 5. overrides are read as written ---------------------------------------------------------


def test_a_sweep_with_hydra_job_num_subdirs_is_reported(cli, tmp_path):
    from vgrad.analysis import write_report

    code, _, err = cli("-m", "act=tanh,relu", *TINY, *LIGHT, f"hydra.sweep.dir={tmp_path}",
                       "hydra.sweep.subdir=run_${hydra.job.num}")
    assert code == 0, err
    assert sorted(p.name for p in run_dirs(tmp_path)) == ["run_0", "run_1"]
    assert "'hydra.sweep.subdir=run_${hydra.job.num}'" in sweep_command(tmp_path)
    page = write_report(tmp_path, jobs=1).read_text()
    assert "run_${hydra.job.num}" in page


def test_environment_variables_stay_unexpanded_in_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("VGRAD_SECRET", "s3cr3t")
    (tmp_path / "multirun.yaml").write_text(textwrap.dedent("""
        hydra:
          overrides:
            hydra: ['hydra.mode=MULTIRUN', 'hydra.sweep.dir=${oc.env:VGRAD_SECRET}']
            task: ['data.path=${oc.env:VGRAD_SECRET}', 'act=tanh,relu']
        act: {name: tanh}
    """))
    command = sweep_command(tmp_path)
    assert "s3cr3t" not in command
    assert "'data.path=${oc.env:VGRAD_SECRET}'" in command and "act=tanh,relu" in command


# --- 7. a refused concurrent sweep changes nothing ---------------------------------------------


def test_a_refused_concurrent_sweep_keeps_the_running_sweeps_multirun_yaml(cli, tmp_path):
    (tmp_path / "multirun.yaml").write_text("the running sweep's\n")
    with sweep_locked_by(tmp_path, "vgrad sweep pid 12345"):
        code, _, err = cli("-m", "act=tanh", *TINY, f"hydra.sweep.dir={tmp_path}")
    assert code == 2
    one_error_line(err, "12345")
    assert (tmp_path / "multirun.yaml").read_text() == "the running sweep's\n"


# --- 9 and 10. overrides that would silently train something else ---------------------------


@pytest.mark.parametrize("overrides,key", [
    (["act=tanh", "act.name=relu"], "act.name=relu"),
    (["init=normal", "init.name=he_normal"], "init.name=he_normal"),
    (["data.name=moons"], "data.name=moons"),
    (["optim=sgd", "optim.name=adam"], "optim.name=adam"),
    (["model.name=rnn"], "model.name=rnn"),
    (["data.input_q=inf"], "data.input_q=inf"),
])
@pytest.mark.parametrize("mode", ["run", "sweep"])
def test_overrides_that_would_train_something_else_are_refused(cli, tmp_path, overrides, key,
                                                                mode):
    where = (["-m", f"hydra.sweep.dir={tmp_path / 'out'}"] if mode == "sweep"
             else [f"hydra.run.dir={tmp_path / 'out'}"])
    code, _, err = cli(*where, *overrides, *TINY)
    assert code == 2
    if mode == "run" or "name" in key:
        one_error_line(err, key)
        assert not (tmp_path / "out").exists()
    else:  # a job of a sweep is recorded as failed, with its error
        assert key in err and "Traceback" not in err


# --- found by an independent fault probe of the fixes above -----------------------------------


def test_an_unresolvable_interpolation_leaves_the_folder_as_it_was(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("VGRAD_NO_SUCH_VARIABLE", raising=False)
    folder = tmp_path / "logs"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("another tool's\n")
    (folder / "app.log").write_text("keep")
    before = tree(tmp_path)
    code, _, err = cli(*TINY, "width=${oc.env:VGRAD_NO_SUCH_VARIABLE}",
                       f"hydra.run.dir={folder}")
    assert code == 2
    one_error_line(err, "VGRAD_NO_SUCH_VARIABLE")
    assert tree(tmp_path) == before


def test_hydras_output_subdir_is_guarded_where_it_is(cli, tmp_path):
    victim = tmp_path / "victim.yaml"
    victim.write_text("user's")
    run = tmp_path / "run"
    (run / "meta").mkdir(parents=True)
    (run / "meta" / "config.yaml").symlink_to(victim)
    code, _, err = cli(*TINY, *LIGHT, f"hydra.run.dir={run}", "hydra.output_subdir=meta")
    assert code == 2
    one_error_line(err, "meta/config.yaml", "symbolic link")
    assert victim.read_text() == "user's"

    (run / "meta" / "config.yaml").unlink()
    (run / "meta" / "config.yaml").write_text("mine\n")
    before = tree(run)
    code, _, err = cli(*TINY, *LIGHT, "batch_size=1000", f"hydra.run.dir={run}",
                       "hydra.output_subdir=meta")  # refused once the data is loaded
    assert code == 2 and "batch_size" in err
    assert tree(run) == before


def test_other_launchers_refuse_links_in_job_folders_before_hydra_writes(cli, tmp_path):
    victim = tmp_path / "victim.yaml"
    victim.write_text("user's")
    sweep = tmp_path / "S"
    (sweep / "0" / ".hydra").mkdir(parents=True)
    (sweep / "0" / ".hydra" / "config.yaml").symlink_to(victim)
    code, _, err = cli("-m", "act=tanh,relu", *TINY, *LIGHT, "hydra/launcher=basic",
                       f"hydra.sweep.dir={sweep}")
    assert code == 2
    one_error_line(err, "0/.hydra/config.yaml", "symbolic link")
    assert victim.read_text() == "user's"
    assert not run_dirs(sweep)


def test_a_damaged_interrupted_run_is_trained_from_the_start_not_failed(trained, tmp_path):
    import numpy as np

    from vgrad import runner
    from vgrad.analysis.tables import load_run

    sweep = damaged_copy(trained, tmp_path)
    run = sweep / "0"
    summary = store.read_summary(run)
    summary["status"] = "interrupted"
    store.write_json(run / store.SUMMARY, summary)
    store.write_checkpoint(run, summary["epochs_done"], [np.zeros(1)])
    cfg = load_run(run).config
    from omegaconf import OmegaConf

    assert runner.resume_point(run, OmegaConf.create(cfg)) is not None  # whole: resumes
    cut(run, "loss")
    assert runner.resume_point(run, OmegaConf.create(cfg)) is None  # damaged: from the start


@pytest.mark.parametrize("override,key", [("data.n_samples=3000000000", "data.n_samples"),
                                          ("epochs=100000000", "epochs")])
def test_memory_refusals_name_the_knob_that_does_not_fit(cli, tmp_path, override, key):
    code, _, err = cli(override, "progress=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2
    one_error_line(err, f"{key}=", "GB")
    assert not (tmp_path / "run").exists()


def test_a_signal_as_a_group_ends_stops_the_sweep_before_the_next(monkeypatch, tmp_path):
    import contextlib

    from conftest import compose_cfg

    from vgrad import runner

    jobs = [runner.prepare(compose_cfg(*TINY, *LIGHT, f"depth={d}"), tmp_path / str(d))
            for d in (1, 2)]  # two structures: two programs
    ended: list[int] = []

    @contextlib.contextmanager
    def signal_after_first_group():
        yield lambda: signal.SIGINT if ended else None

    monkeypatch.setattr(runner, "stop_on_signals", signal_after_first_group)
    with pytest.raises(runner.Interrupted, match="SIGINT: stopped; the jobs trained so far"):
        runner.train_jobs(jobs, on_group=lambda gid, group, statuses, s: ended.append(gid))
    assert ended == [0]
    assert store.read_summary(tmp_path / "1")["status"] == "completed"
    assert not (tmp_path / "2").exists()


def test_a_foreign_file_named_summary_json_is_not_a_failed_job(cli, tmp_path):
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "summary.json").write_text("precious")
    code, _, err = cli("-m", "act=tanh", *TINY, *LIGHT, f"hydra.sweep.dir={tmp_path}")
    assert code == 0, err
    assert (tmp_path / "0" / "summary.json").read_text() == "precious"
    assert store.read_summary(tmp_path / "1")["status"] == "completed"
