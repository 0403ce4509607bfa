"""Nothing finished is lost or overwritten: interrupts, kills, reruns, other sweeps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import LIGHT, TINY, run_dirs, sweep_locked_by

from vgrad import store

REPO = Path(__file__).resolve().parent.parent
#: A run of many one-epoch chunks, each written at once: long enough to interrupt.
LONG = ["epochs=300", "data.n_samples=128", "record.chunk_epochs=1", "record.save_every_s=0",
        "progress=false"]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix != ".log"}


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def epochs_written(run_dir: Path) -> int:
    try:
        return store.read_summary(run_dir).get("epochs_done", 0)
    except (OSError, ValueError):
        return 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, np.ndarray]:
    """The metrics of the ``LONG`` run, trained without interruption."""
    from conftest import cli_main

    run_dir = tmp_path_factory.mktemp("uninterrupted")
    assert cli_main(*LONG, f"hydra.run.dir={run_dir}") == 0
    return store.read_metrics(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_keeps_what_was_trained_and_the_command_continues_it(
        tmp_path, subprocess_env, sig, uninterrupted, cli):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "vgrad.train", *LONG, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env)
    wait_for(lambda: epochs_written(run_dir) >= 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig
    lines = [line for line in err.splitlines() if line.startswith("vgrad:")]
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err
    summary = store.read_summary(run_dir)
    assert summary["status"] == "interrupted"
    done = summary["epochs_done"]
    assert 2 <= done < 300
    metrics = store.read_metrics(run_dir)
    assert metrics["epoch"].tolist() == list(range(done + 1))
    assert (run_dir / store.CHECKPOINT).is_file()

    # The analysis reads an interrupted run, marked as such.
    from vgrad.analysis import load_sweep

    runs = load_sweep(run_dir).runs
    assert runs["status"].tolist() == ["interrupted"]

    # The same command again, in-process (the signal needed a process of its own; the
    # continuing does not, and the module's program for LONG is compiled already).
    code, out, err = cli(*LONG, f"hydra.run.dir={run_dir}")
    assert code == 0, err
    assert f"continuing {run_dir} from epoch {done}" in out + err
    assert store.read_summary(run_dir)["status"] == "completed"
    assert not (run_dir / store.CHECKPOINT).exists()
    resumed = store.read_metrics(run_dir)
    assert resumed.keys() == uninterrupted.keys()
    for k, v in uninterrupted.items():  # continuing changes no number
        np.testing.assert_array_equal(resumed[k], v, err_msg=k)


#: Two structures (50 and 6000 epochs): two programs of two jobs, the first finishing long
#: before the second, which is killed part-way. (Few probes and a write a second: the cost
#: was rewriting all the records of the long jobs at each of their 120 chunks; resuming
#: every probe's records exactly is the signal test's subject.)
KILLED_SWEEP = ["-m", "act=tanh,relu", "epochs=50,6000", "data.n_samples=128",
                "record.chunk_epochs=50", "record.every=10", "record.save_every_s=1",
                "progress=false", *LIGHT]


def kill_and_continue(cli, sweep: Path, args: list[str], env: dict, kill_group: bool) -> None:
    """Start the sweep ``args`` in a process, kill it (with its process group: a
    launcher's tasks too) once the short jobs ended and a long one saved 50 epochs, then
    run the same command again in-process: the killed jobs continue from their saved
    epochs, the finished ones stay byte for byte, every job ends, no temporary is left."""
    proc = subprocess.Popen([sys.executable, "-m", "vgrad.train", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=kill_group)

    def short_ones_done() -> bool:
        done = [d for d in run_dirs(sweep) if store.is_complete(d)]
        return len(done) == 2 and any(epochs_written(d) >= 50 for d in run_dirs(sweep)
                                      if not store.is_complete(d))

    wait_for(short_ones_done, proc)
    if kill_group:  # the launcher and its tasks, as a cluster would
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.kill()
    proc.wait()
    time.sleep(0.5 if kill_group else 0.0)
    finished = [d for d in run_dirs(sweep) if store.is_complete(d)]
    assert len(finished) == 2
    before = {d: files_of(d) for d in finished}
    # The same command again, in-process: the kill needed a process; continuing does not.
    code, out, err = cli(*args)
    assert code == 0, err
    assert "from epoch" in out + err  # the killed jobs continue
    for d, files in before.items():  # finished jobs are not touched
        assert files_of(d) == files, d
    assert all(store.is_complete(d) for d in run_dirs(sweep))
    assert len(run_dirs(sweep)) == 4
    assert not list(sweep.rglob(".*.tmp"))


@pytest.mark.slow
def test_a_killed_grouped_sweep_resumes_and_leaves_finished_jobs_alone(tmp_path, subprocess_env,
                                                                     cli):
    sweep = tmp_path / "sweep"
    kill_and_continue(cli, sweep, [*KILLED_SWEEP, f"hydra.sweep.dir={sweep}"], subprocess_env,
                      kill_group=False)


def test_a_killed_cluster_task_resumes_with_the_grouped_submitit_launcher(
        tmp_path, subprocess_env, cli):
    """hydra/launcher=vgrad_submitit (local executor): the sweep and its tasks killed
    while the long program trains; the same command again continues the killed jobs
    from their saved epochs and leaves the finished ones alone."""
    sweep = tmp_path / "sweep"
    kill_and_continue(cli, sweep, [*KILLED_SWEEP, "hydra/launcher=vgrad_submitit",
                                   "hydra.launcher.cluster=local", f"hydra.sweep.dir={sweep}"],
                      subprocess_env, kill_group=True)


def test_a_different_sweep_into_a_used_folder_keeps_every_earlier_run(cli, tmp_path):
    code, _, err = cli("-m", "act=sigmoid,tanh", *TINY, *LIGHT, f"hydra.sweep.dir={tmp_path}")
    assert code == 0, err
    before = {d.name: files_of(d) for d in run_dirs(tmp_path)}
    code, out, err = cli("-m", "act=relu,tanh", *TINY, *LIGHT, f"hydra.sweep.dir={tmp_path}")
    assert code == 0, err
    for name, files in before.items():  # sigmoid (0) and tanh (1) are untouched
        now = files_of(tmp_path / name)
        assert {k: v for k, v in now.items() if not k.startswith(".hydra")} == {
            k: v for k, v in files.items() if not k.startswith(".hydra")}
    acts = {d.name: store.read_summary(d)["config"]["act"]["name"] for d in run_dirs(tmp_path)}
    assert acts == {"0": "sigmoid", "1": "tanh", "2": "relu"}
    assert "goes to folder 2" in out + err


def test_an_extended_axis_reruns_only_the_new_jobs(cli, tmp_path):
    base = ["act=tanh,relu", *TINY, *LIGHT, f"hydra.sweep.dir={tmp_path}"]
    code, _, err = cli("-m", *base, "depth=1,2")
    assert code == 0, err
    before = {d.name: files_of(d) for d in run_dirs(tmp_path)}
    code, out, err = cli("-m", *base, "depth=1,2,3")  # renumbers: (relu, 1) was job 2, now 3
    assert code == 0, err
    assert out.count("already holds an ended run") + err.count("already holds an ended run") == 4
    for name, files in before.items():
        assert files_of(tmp_path / name) == files, name
    configs = {(store.read_summary(d)["config"]["act"]["name"],
                store.read_summary(d)["config"]["depth"]) for d in run_dirs(tmp_path)}
    assert len(run_dirs(tmp_path)) == 6 and len(configs) == 6


def test_a_named_folder_holding_another_config_is_refused(cli, tmp_path):
    args = [*TINY, *LIGHT, f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=mine"]
    code, _, err = cli("-m", "act=tanh", *args)
    assert code == 0, err
    before = files_of(tmp_path / "mine")
    code, _, err = cli("-m", "act=relu", *args)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "act.name=tanh->relu" in lines[0] and "mine" in lines[0]
    assert files_of(tmp_path / "mine") == before


def test_a_single_run_never_overwrites_another_configs_run(cli, tmp_path):
    code, _, err = cli(*TINY, *LIGHT, "act=tanh", f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    before = {k: v for k, v in files_of(tmp_path).items() if not k.startswith(".hydra")}
    for resume in ("true", "false"):
        code, _, err = cli(*TINY, *LIGHT, "act=relu", f"resume={resume}",
                           f"hydra.run.dir={tmp_path}")
        assert code == 2 and "holds a run of another config" in err
        now = {k: v for k, v in files_of(tmp_path).items() if not k.startswith(".hydra")}
        assert now == before


def test_a_sweep_folder_in_use_by_another_sweep_is_refused(cli, tmp_path):
    with sweep_locked_by(tmp_path, "vgrad sweep pid 12345"):
        code, _, err = cli("-m", "act=tanh", *TINY, f"hydra.sweep.dir={tmp_path}")
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "12345" in lines[0]
    assert not run_dirs(tmp_path)


def test_a_corrupt_run_is_retrained_not_taken_as_finished(cli, tmp_path):
    code, _, err = cli("-m", "act=tanh", *TINY, *LIGHT, f"hydra.sweep.dir={tmp_path}")
    assert code == 0, err
    metrics = tmp_path / "0" / store.METRICS
    metrics.write_bytes(metrics.read_bytes()[:100])  # truncated
    code, out, err = cli("-m", "act=tanh", *TINY, *LIGHT, f"hydra.sweep.dir={tmp_path}")
    assert code == 0, err
    assert "already holds" not in out + err
    assert store.npz_loads(metrics)


def test_rerunning_an_ended_run_keeps_it_and_resume_false_retrains_it(cli, tmp_path):
    args = [*TINY, *LIGHT, f"hydra.run.dir={tmp_path}"]
    code, _, err = cli(*args)
    assert code == 0, err
    metrics = tmp_path / store.METRICS
    first = (metrics.stat().st_mtime_ns, metrics.read_bytes())
    code, out, err = cli(*args)
    assert code == 0, err
    assert "already holds an ended run" in out + err
    assert (metrics.stat().st_mtime_ns, metrics.read_bytes()) == first
    code, _, err = cli(*args, "resume=false")
    assert code == 0, err
    assert metrics.stat().st_mtime_ns != first[0]
    assert metrics.read_bytes() == first[1]  # the same numbers, trained again


def test_an_interrupted_group_with_a_diverged_job_continues_with_uninterrupted_numbers(
        tmp_path):
    """A diverged seed's optimizer state runs on (NaN: momentum of an overflow) and is
    checkpointed as it is; an interrupted group holding it continues with the numbers of
    an uninterrupted one, and the diverged job stays frozen at its step."""
    import signal

    from conftest import DIVERGENT_CLI, compose_cfg

    from vgrad import runner
    from vgrad.group import group_jobs

    base = [*DIVERGENT_CLI, "optim.momentum=0.9", "epochs=4", "record.chunk_epochs=1",
            "record.save_every_s=0", *LIGHT]
    cfgs = {"diverges": compose_cfg(*base), "trains": compose_cfg(*base, "optim.lr=0.0001")}

    def jobs(folder: str) -> list:
        out = [runner.prepare(cfg, tmp_path / folder / name) for name, cfg in cfgs.items()]
        for job in out:  # (as the command does: an interrupted run is continued)
            job.resume = runner.resume_point(job.run_dir, job.cfg)
        return out

    runner.train_jobs(jobs("whole"))
    group = group_jobs(jobs("cut"))[0]
    assert len(group.jobs) == 2  # (one program: the learning rate is a value)
    with pytest.raises(runner.Interrupted):  # a signal noted after the first chunk
        runner.train_group(group, 0, lambda: signal.SIGINT)
    cut = tmp_path / "cut" / "diverges"
    assert store.read_summary(cut)["status"] == "interrupted"
    assert store.read_summary(cut)["diverged_at_step"] == [2]
    state = np.load(cut / store.CHECKPOINT)
    assert any(np.isnan(state[k]).any() for k in state.files)  # the dead seed's momentum
    again = jobs("cut")
    assert all(job.resume is not None and job.epochs_done == 1 for job in again)
    runner.train_jobs(again)
    for name in cfgs:
        whole, resumed = tmp_path / "whole" / name, tmp_path / "cut" / name
        assert store.read_summary(resumed)["status"] == store.read_summary(whole)["status"]
        a, b = store.read_metrics(whole), store.read_metrics(resumed)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(b[k], a[k], err_msg=f"{name}: {k}")
        for k, v in np.load(whole / "params.npz").items():
            np.testing.assert_array_equal(np.load(resumed / "params.npz")[k], v, err_msg=k)
