"""The console commands installed with the package (vgrad-train, vgrad-report,
vgrad-plot-run, vgrad-plot-sweep), and the first lines a user reads: the log names the
net and its headline number, says when it is compiling, names each job's overrides,
keeps internal figures out of INFO, and ends with a command that works as printed."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import TINY

from vgrad import cli

REPO = Path(__file__).resolve().parent.parent

#: [project.scripts] of pyproject.toml.
ENTRY_POINTS = {"vgrad-train": "vgrad.train:main", "vgrad-report": "vgrad.cli:report_main",
                "vgrad-plot-run": "vgrad.cli:plot_run_main",
                "vgrad-plot-sweep": "vgrad.cli:plot_sweep_main"}

#: Probes enough for the headline number (delta_norm) and one run figure (gradients),
#: few for a fast compile.
PROBES = ["record.step_probes=[global_norms,kernel_grad_stats,delta_norm]",
          "record.epoch_probes=[evaluation]"]


def command(name: str) -> Path:
    """The installed console command ``name`` (beside this Python)."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        pytest.skip(f"{name} is not installed beside {sys.executable} (pip install -e .)")
    return path


def run(argv: list[str], env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    """A console command (``argv[0]`` its name) run as a user runs it, from outside the
    repository."""
    return subprocess.run([str(command(argv[0])), *argv[1:]], capture_output=True, text=True,
                          env=env, timeout=300, **kwargs)


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, so that tqdm draws its bar into it."""

    def isatty(self) -> bool:
        return True


def frames(text: str) -> list[str]:
    """What a progress bar drew, one redraw each."""
    return [f for f in text.replace("\n", "\r").split("\r") if f.strip()]


# ---------------------------------------------------------------- installed commands


def test_the_console_commands_are_installed_with_the_package():
    try:
        dist = importlib.metadata.distribution("vgrad")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vgrad is not installed (pip install -e .)")
    points = {ep.name: ep for ep in dist.entry_points if ep.group == "console_scripts"}
    assert {name: ep.value for name, ep in points.items()} == ENTRY_POINTS, \
        "the installed entry points are stale: pip install -e ."
    for ep in points.values():
        assert callable(ep.load())


def test_the_scripts_in_the_repository_run_the_same_functions():
    for name, main in (("report", cli.report_main), ("plot_run", cli.plot_run_main),
                       ("plot_sweep", cli.plot_sweep_main)):
        spec = importlib.util.spec_from_file_location(f"script_{name}",
                                                      REPO / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.main is main


def test_every_command_answers_help_by_its_own_name(subprocess_env, tmp_path):
    helps = {}
    for name in ENTRY_POINTS:
        proc = run([name, "--help"], subprocess_env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        helps[name] = proc.stdout
    for name in ("vgrad-report", "vgrad-plot-run", "vgrad-plot-sweep"):
        assert helps[name].startswith(f"usage: {name} "), helps[name]
        assert f"example: {name} outputs/" in helps[name]
    # vgrad-train's help (python -m vgrad.train's) names the commands that read its outputs.
    assert "vgrad-report SWEEP" in helps["vgrad-train"]
    assert "vgrad-plot-run RUN" in helps["vgrad-train"]


def test_python_m_vgrad_cli_runs_a_command_or_says_how(tmp_path, capsys):
    assert cli.main([]) == 2
    assert "usage: python -m vgrad.cli {report,plot-run,plot-sweep}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["report", str(tmp_path / "missing")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"vgrad-report: error: {tmp_path / 'missing'}: no such folder"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, subprocess_env) -> tuple[Path, str]:
    """A two-job sweep trained by ``vgrad-train -m`` from outside the repository: its
    folder and its log."""
    root = tmp_path_factory.mktemp("console")
    proc = run(["vgrad-train", "-m", "act=tanh,relu", *TINY, *PROBES,
                f"hydra.sweep.dir={root / 'my sweep'}"], subprocess_env, cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root / "my sweep", proc.stdout + proc.stderr


def test_the_sweep_log_names_each_job_and_ends_with_a_working_report_command(
        sweep, subprocess_env, tmp_path):
    folder, log = sweep
    for job, act in enumerate(("tanh", "relu")):
        lines = [line for line in log.splitlines() if f"job {job} (act={act} " in line]
        assert any("seed 0: final train loss" in line for line in lines), log
        assert any(f"outputs: {folder / str(job)}" in line for line in lines), log
        assert any("at step 0 the first layer's ||delta|| is" in line for line in lines), log
    assert "program 1 of 1: 2 job(s) x 1 seed(s) of 2-5-5-5-5-1" in log
    assert "members" not in log  # the memory budget's figures are DEBUG lines
    assert "scripts/" not in log
    (hint,) = [line.split("report: ", 1)[1] for line in log.splitlines() if "report: " in line]
    argv = shlex.split(hint)
    assert argv == ["vgrad-report", str(folder)]
    proc = run([*argv, "--jobs", "1"], subprocess_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(folder / "report" / "index.html")
    assert (folder / "report" / "index.html").is_file()


def test_the_plot_commands_draw_a_sweep_and_a_run(sweep, subprocess_env, tmp_path):
    folder, _ = sweep
    proc = run(["vgrad-plot-sweep", str(folder), "--x", "act", "--out", str(tmp_path / "s")],
               subprocess_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "s" / "bars_act.png").is_file()
    proc = run(["vgrad-plot-run", str(folder / "0"), "--out", str(tmp_path / "r")],
               subprocess_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert list((tmp_path / "r").glob("*.png"))


def test_the_commands_name_themselves_in_their_one_line_errors(sweep, subprocess_env,
                                                                tmp_path):
    folder, _ = sweep
    blocked = tmp_path / "file"
    blocked.write_text("a file where a folder is needed")
    for argv, code, needle in (
            (["vgrad-report", str(tmp_path / "missing")], 2, "no such folder"),
            (["vgrad-plot-run", str(tmp_path)], 2, "not a run folder"),
            (["vgrad-plot-sweep", str(folder), "--x", "colour"], 2, "no sweep axis 'colour'"),
            (["vgrad-plot-sweep", str(folder), "--x", "act", "--out", str(blocked / "x")], 1,
             f"cannot write {blocked / 'x'}")):
        proc = run(argv, subprocess_env, cwd=tmp_path)
        assert proc.returncode == code, proc.stderr
        assert "Traceback" not in proc.stderr
        errors = [line for line in proc.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and errors[0].startswith(f"{argv[0]}: error: "), proc.stderr
        assert needle in errors[0]


# ---------------------------------------------------------------- a first run's log


def test_a_first_run_names_its_net_says_it_compiles_and_gives_its_headline(
        cli, tmp_path, monkeypatch, subprocess_env):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)  # the epoch bar draws here
    code, out, _ = cli("epochs=2", "data.n_samples=128", "progress=true", *PROBES,
                       f"hydra.run.dir={tmp_path / 'run'}")
    monkeypatch.undo()
    assert code == 0, terminal.getvalue()
    assert "sigmoid 2-5-5-5-5-1 on circles (128 train / 0 test examples, 2 classes), " \
           "1 seed" in out
    (headline,) = [line for line in out.splitlines() if "||delta||" in line]
    assert "at step 0 the first layer's ||delta|| is " in headline
    assert "x the last layer's (dense_0 / dense_4)" in headline
    drawn = frames(terminal.getvalue())
    assert "compiling" in drawn[0], drawn
    assert "compiling" not in drawn[-1], drawn
    (hint,) = [line.split("figures: ", 1)[1] for line in out.splitlines() if "figures: " in line]
    argv = shlex.split(hint)
    assert argv == ["vgrad-plot-run", str(tmp_path / "run")]
    proc = run(argv, subprocess_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert list((tmp_path / "run" / "figures").glob("*.png"))


def test_the_sweep_bar_says_compiling_until_each_program_reports(monkeypatch):
    from hydra_plugins.vgrad_launcher.vgrad_launcher import _SweepBar

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    group = SimpleNamespace(jobs=[SimpleNamespace(epochs_done=0)], cfg=SimpleNamespace(epochs=4))
    with _SweepBar(2, enabled=True) as bar:
        assert "compiling" in frames(terminal.getvalue())[-1]
        bar.progress(group, 2)
        assert "compiling" not in frames(terminal.getvalue())[-1]
        bar.progress(group, 4)
        bar.group_done(group)  # a second program comes: it compiles
        assert "compiling" in frames(terminal.getvalue())[-1]
        bar.progress(group, 2)
        assert "compiling" not in frames(terminal.getvalue())[-1]
        assert "1.5/2 jobs" in frames(terminal.getvalue())[-1]


def test_many_seeds_are_logged_in_one_line():
    """More than MAX_SEED_LINES seeds: one line with the median and range of each final
    metric over the seeds and the diverged count (a 512-seed job logged 512 lines)."""
    from vgrad.train import MAX_SEED_LINES, seeds_line

    n = MAX_SEED_LINES + 4
    per_seed = [{"seed": i, "diverged_at_step": 7 if i == 3 else None,
                 "final": {"train_loss": float(i), "train_acc": 0.5, "test_loss": None,
                           "test_acc": None}} for i in range(n)]
    line = seeds_line(per_seed)
    assert line.startswith(f"{n} seeds: final train loss {np.median(range(n)):.4f} "
                           f"[0.0000, {n - 1:.4f}]"), line
    assert "test" not in line and line.endswith("1 diverged (first at step 7)")
