"""The report and plot scripts never write through a link planted in a sweep folder, never
leave their workers behind, end on Ctrl-C or an unwritable folder with one line, and log
a report command that a shell reads back as the sweep's folder."""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import TINY, cli_main, script

from vgrad import store
from vgrad.analysis import write_report
from vgrad.analysis.callback import write_runs_table

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real sweep of three runs (tests copy it before changing anything in it)."""
    root = tmp_path_factory.mktemp("trained")
    assert cli_main("-m", "act=tanh,relu,sigmoid", *TINY, f"hydra.sweep.dir={root}") == 0
    return root


def copy_of(trained: Path, dest: Path, runs: int = 3) -> Path:
    """The sweep at ``dest``, its three runs cut or repeated to make ``runs`` run folders
    (``0``, ``1``, ...)."""
    shutil.copytree(trained, dest, symlinks=True)
    for n in range(runs, 3):
        shutil.rmtree(dest / str(n))
    for n in range(3, runs):
        shutil.copytree(trained / str(n % 3), dest / str(n), symlinks=True)
    return dest


def script_main(name: str, args: list[str], monkeypatch) -> int | None:
    """``scripts/NAME.py ARGS`` in-process (its ``main``): the exit status returned."""
    spec = importlib.util.spec_from_file_location(f"vgrad_script_{name}",
                                                  REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [f"scripts/{name}.py", *args])  # argparse's prog
    return module.main(args)


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


class Logged(logging.Handler):
    """The records the ``vgrad`` logger emits while attached."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logged():
    logger, handler = logging.getLogger("vgrad"), Logged()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(level)


# ---------------------------------------------------------------- links planted


def test_the_runs_table_is_not_written_through_a_link(trained, tmp_path, logged):
    sweep = copy_of(trained, tmp_path / "sweep")
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file\n")
    (sweep / "runs.csv").unlink()
    (sweep / "runs.csv").symlink_to(victim)
    write_runs_table(sweep)  # logs, never raises: the sweep has ended
    assert victim.read_text() == "the user's own file\n"
    assert (sweep / "runs.csv").is_symlink()
    errors = [r.getMessage() for r in logged if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "symbolic link" in errors[0]
    assert str(sweep / "runs.csv") in errors[0] and "\n" not in errors[0]
    assert any(r.getMessage().startswith("report: vgrad-report") for r in logged)


def test_the_runs_table_is_replaced_whole(trained, tmp_path, logged):
    import pandas as pd

    sweep = copy_of(trained, tmp_path / "sweep")
    (sweep / "runs.csv").write_text("stale")
    write_runs_table(sweep)
    table = pd.read_csv(sweep / "runs.csv")
    assert sorted(table["run_dir"]) == [str(sweep / r) for r in ("0", "1", "2")]
    assert not [r for r in logged if r.levelno >= logging.WARNING]
    assert not list(sweep.glob(".runs.csv.*"))  # no temporary file left


@pytest.mark.parametrize("planted", ["report", "report/index.html", "report/runs.csv",
                                     "report/figures", "report/figures/sweep_0.png",
                                     "report/figures/run_001_gradients.png"])
def test_the_report_refuses_links_before_drawing_anything(trained, tmp_path, planted):
    sweep = copy_of(trained, tmp_path / "sweep")
    target = sweep / planted
    target.parent.mkdir(parents=True, exist_ok=True)
    if "." in target.name:  # a file of the report
        victim = tmp_path / "victim.txt"
        victim.write_text("mine")
    else:  # a folder of the report
        victim = tmp_path / "victim"
        victim.mkdir()
    target.symlink_to(victim)
    with pytest.raises(store.LinkRefused, match="symbolic link") as refused:
        write_report(sweep, jobs=1)
    assert refused.value.path == target
    if victim.is_file():
        assert victim.read_text() == "mine"
    else:
        assert not list(victim.iterdir())
    # Nothing drawn, nothing half-written.
    assert not [p for p in (sweep / "report").rglob("*") if p.is_file() and not p.is_symlink()]


def test_a_chosen_output_folder_may_be_a_link_its_figures_folder_not(trained, tmp_path):
    sweep = copy_of(trained, tmp_path / "sweep", runs=1)  # one run: fewer figures to draw
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "out").symlink_to(real)
    index = write_report(sweep, tmp_path / "out", jobs=1)
    assert (real / "index.html").is_file() and (real / "runs.csv").is_file()
    assert list((real / "figures").glob("run_*.png"))
    assert index == tmp_path / "out" / "index.html"

    shutil.rmtree(real / "figures")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (real / "figures").symlink_to(elsewhere)
    with pytest.raises(store.LinkRefused):
        write_report(sweep, tmp_path / "out", jobs=1)
    assert not list(elsewhere.iterdir())


def test_plot_scripts_refuse_links_in_their_own_folders(trained, tmp_path, capsys,
                                                        monkeypatch):
    sweep = copy_of(trained, tmp_path / "sweep")
    victim = tmp_path / "victim"
    victim.mkdir()
    (sweep / "figures").symlink_to(victim)
    (sweep / "0" / "figures").mkdir()
    (sweep / "0" / "figures" / "gradients.png").symlink_to(tmp_path / "victim.png")
    for name, args in (("plot_sweep", [str(sweep), "--x", "act"]),
                       ("plot_run", [str(sweep / "0")])):
        with pytest.raises(SystemExit) as exited:
            script_main(name, args, monkeypatch)
        assert exited.value.code == 2
        errors = [line for line in lines(capsys.readouterr().err) if "error" in line]
        assert len(errors) == 1 and "symbolic link" in errors[0]
    assert not list(victim.iterdir()) and not (tmp_path / "victim.png").exists()
    assert not list((sweep / "0" / "figures").glob("*.pdf"))


@pytest.mark.slow
def test_the_report_command_refuses_a_link_in_one_line(trained, tmp_path):
    sweep = copy_of(trained, tmp_path / "sweep")
    victim = tmp_path / "c"
    victim.write_text("mine")
    (sweep / "report").mkdir()
    (sweep / "report" / "index.html").symlink_to(victim)
    proc = run_script("scripts/report.py", str(sweep), "--jobs", "1")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = lines(proc.stderr)  # one line, no usage before it
    assert line.startswith("report.py: error:") and "symbolic link" in line
    assert victim.read_text() == "mine"


# ---------------------------------------------------------------- unwritable folders


@pytest.fixture
def read_only(monkeypatch):
    """Make every folder under ``root`` refuse new files, as a read-only folder does for
    a user who is not root (the tests run as root, whom chmod does not stop)."""
    made = tempfile.mkstemp

    def make(root: Path):
        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve().is_relative_to(root.resolve()):
                path = Path(dir) / "x.tmp"
                raise PermissionError(13, "Permission denied", str(path))
            return made(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)

    return make


def test_an_unwritable_report_folder_is_named_before_anything_is_drawn(
        trained, tmp_path, read_only, capsys, monkeypatch):
    sweep = copy_of(trained, tmp_path / "sweep")
    read_only(sweep)
    with pytest.raises(PermissionError) as raised:
        write_report(sweep, jobs=1)
    assert raised.value.filename == str(sweep / "report")
    assert not list(sweep.rglob("*.png"))

    assert script_main("report", [str(sweep), "--jobs", "1"], monkeypatch) == 1
    out, err = capsys.readouterr()
    assert lines(err) == [f"report.py: error: cannot write {sweep / 'report'} "
                          "(Permission denied); choose another folder with --out DIR"]
    assert out == ""
    for name, args, where in (("plot_run", [str(sweep / "0")], sweep / "0" / "figures"),
                              ("plot_sweep", [str(sweep), "--x", "act"], sweep / "figures")):
        assert script_main(name, args, monkeypatch) == 1
        out, err = capsys.readouterr()
        assert lines(err) == [f"{name}.py: error: cannot write {where} (Permission denied);"
                              " choose another folder with --out DIR"]
    assert not list(sweep.rglob("*.png")) and not list(sweep.rglob("*.pdf"))


def test_unwritable_output_folders_end_the_scripts_with_one_line(trained, tmp_path):
    sweep = copy_of(trained, tmp_path / "sweep")
    (sweep / "report").write_text("a file where the report folder goes")
    blocked = tmp_path / "file"
    blocked.write_text("a file where a folder is needed")
    for cmd, where in (
            (["scripts/report.py", str(sweep), "--jobs", "1"], sweep / "report"),
            (["scripts/plot_run.py", str(sweep / "0"), "--out", str(blocked / "run")],
             blocked / "run"),
            (["scripts/plot_sweep.py", str(sweep), "--x", "act", "--out",
              str(blocked / "sweep")], blocked / "sweep")):
        # In-process: the one line is the subject (each script as a process is
        # test_analysis's test_scripts_run_from_the_command_line, and report.py's one-line
        # error as a process is test_the_report_command_refuses_a_link_in_one_line).
        proc = script(*cmd)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        (line,) = lines(proc.stderr)
        assert line.startswith(f"{Path(cmd[0]).name}: error: cannot write {where} (")
        assert line.endswith("choose another folder with --out DIR")


# ---------------------------------------------------------------- workers and signals


def children(pid: int) -> dict[int, str]:
    """The live processes whose parent is ``pid``, with their command lines."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().decode(
                    errors="replace").replace("\0", " ")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has ended (whoever reaps it)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def start_drawing(sweep: Path) -> tuple[subprocess.Popen, list[int]]:
    """``scripts/report.py SWEEP --jobs 2`` started and drawing run figures in its two
    workers; returns the process and its children (workers and resource tracker)."""
    proc = subprocess.Popen([sys.executable, "scripts/report.py", str(sweep), "--jobs", "2"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        def drawing() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the report ended early: {proc.communicate()}")
            workers = [p for p, cmd in children(proc.pid).items() if "spawn_main" in cmd]
            return len(workers) == 2 and any((sweep / "report" / "figures").glob("run_*"))

        wait_for(drawing, 240, "two workers drawing run figures")
    except BaseException:
        proc.kill()
        proc.communicate(timeout=30)
        raise
    return proc, list(children(proc.pid))


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code", "line"), [(signal.SIGINT, 130, "interrupted"),
                                                   (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_ends_the_report_and_its_workers_with_one_line(trained, tmp_path, sig, code,
                                                              line):
    sweep = copy_of(trained, tmp_path / "sweep", runs=12)
    proc, kids = start_drawing(sweep)
    os.kill(proc.pid, sig)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert lines(err) == [f"report.py: {line}"]
    wait_for(lambda: not any(alive(p) for p in kids), 10, f"the workers {kids} to end")
    assert not (sweep / "report" / "index.html").exists()


@pytest.mark.slow
def test_workers_end_with_a_killed_report(trained, tmp_path):
    sweep = copy_of(trained, tmp_path / "sweep", runs=12)
    proc, kids = start_drawing(sweep)
    killed = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)  # no handler runs: the workers see it themselves
    try:
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    wait_for(lambda: not any(alive(p) for p in kids), 10, f"the workers {kids} to end")
    assert time.monotonic() - killed < 10


# ---------------------------------------------------------------- the logged command


def test_the_logged_report_command_can_be_pasted_into_a_shell(trained, tmp_path, logged):
    sweep = copy_of(trained, tmp_path / "my sweep $HOME 'x' `y`")
    write_runs_table(sweep)
    (command,) = [r.getMessage().removeprefix("report: ") for r in logged
                  if r.getMessage().startswith("report: ")]
    assert shlex.split(command) == ["vgrad-report", str(sweep)]
    quoted = command.removeprefix("vgrad-report ")
    shell = subprocess.run(["bash", "-c", f"test -d {quoted} && printf %s {quoted}"],
                           capture_output=True, text=True, timeout=30)
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout == str(sweep)


# A Ctrl-C that lands in a garbage-collector callback (JAX registers one) would be printed
# as "Exception ignored" and dropped by Python, and the command would go on to status 0:
# CI saw the report finish so. The command's handler delivers it again, out of the callback.
_SIGNAL_IN_GC_CALLBACK = """
import gc, os, signal, sys, time
from vgrad import cli

def callback(phase, info):
    if phase == "start":
        os.kill(os.getpid(), signal.{name})
        for _ in range(100_000):  # the handler runs here, inside the callback
            pass
        gc.callbacks.remove(callback)

def command(parser, args):
    gc.callbacks.append(callback)
    gc.collect()
    time.sleep(60)
    return 0

sys.exit(cli._interruptible(command, cli._parser("test", "cmd"), None))
"""


@pytest.mark.parametrize(("name", "code", "line"), [("SIGINT", 130, "interrupted"),
                                                    ("SIGTERM", 143, "terminated")])
def test_a_signal_landing_in_a_gc_callback_still_stops_the_command(name, code, line):
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _SIGNAL_IN_GC_CALLBACK.format(name=name)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (done.returncode, lines(done.stderr)) == (code, [f"cmd: {line}"]), done.stderr
    assert time.monotonic() - started < 30  # stopped, not slept through
