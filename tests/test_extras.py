"""Optional extras that are not installed: one line naming the pip command, exit 2,
nothing written (``tensorboard=true`` without the tensorboard extra; Hydra's joblib and
submitit launchers without the launchers extra)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest
from conftest import LIGHT, TINY, one_error_line, run_dirs
from hydra.errors import MissingConfigException

from vgrad.errors import describe

TB_INSTALL = 'pip install "vgrad[tensorboard]"'
LAUNCHERS_INSTALL = 'pip install "vgrad[launchers]"'


@pytest.fixture
def no_tensorboardx(monkeypatch):
    """``importlib.util.find_spec`` as if the tensorboard extra were not installed."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "tensorboardX" or name.startswith("tensorboardX."):
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_tensorboard_without_the_extra_is_one_line_exit_2_and_no_folder(
        cli, tmp_path, no_tensorboardx):
    run = tmp_path / "runs" / "one"
    code, _, err = cli(*TINY, *LIGHT, "tensorboard=true", f"hydra.run.dir={run}")
    assert code == 2
    one_error_line(err, "tensorboard=true", TB_INSTALL)
    assert not (tmp_path / "runs").exists()


def test_a_sweep_with_tensorboard_without_the_extra_trains_nothing(cli, tmp_path,
                                                                   no_tensorboardx):
    code, _, err = cli("-m", *TINY, *LIGHT, "act=tanh,relu", "tensorboard=true",
                       f"hydra.sweep.dir={tmp_path}")
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("vgrad: error:")]
    assert len(lines) == 2 and all(TB_INSTALL in line for line in lines), err
    assert "Traceback" not in err
    assert all(not (d / "tensorboard").exists() for d in run_dirs(tmp_path))


def test_tensorboard_with_the_extra_is_not_refused(tmp_path):
    from vgrad import config
    from vgrad.api import compose

    config.validate(compose(["tensorboard=true"]))  # tensorboardX is installed here


@pytest.mark.parametrize(("missing", "plugin"), [
    ("hydra/launcher/joblib", "joblib"), ("hydra/launcher/submitit_slurm", "submitit"),
    ("hydra/launcher/submitit_local", "submitit")])
def test_describe_names_the_launchers_extra(missing, plugin):
    # As Hydra raises it for a defaults entry it cannot find (hydra/_internal/
    # defaults_list.py: config_not_found_error), e.g. parallel.yaml's `- joblib`.
    exc = MissingConfigException(f"In 'hydra/launcher/parallel': Could not load '{missing}'.",
                                 missing_cfg_file=missing, options=None)
    line = describe(exc)
    assert line.startswith(f"hydra/launcher={missing.rsplit('/', 1)[1]}:")
    assert f"{plugin} launcher plugin is not installed" in line and LAUNCHERS_INSTALL in line


def test_other_missing_configs_are_described_as_before():
    exc = MissingConfigException("x", missing_cfg_file="act/nope", options=["relu", "tanh"])
    assert describe(exc) == "act=nope: unknown choice; expected one of relu, tanh"


#: Run at start-up in the subprocess: Hydra's joblib and submitit launcher packages are
#: taken out of the hydra_plugins namespace, as if the launchers extra were not installed
#: (every other plugin, vgrad's launcher included, stays where it is).
HIDE_LAUNCHERS = """
import os
import hydra_plugins

HIDDEN = {"hydra_joblib_launcher", "hydra_submitit_launcher"}
MIRRORS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mirrors")
paths = []
for i, entry in enumerate(list(hydra_plugins.__path__)):
    if os.path.isdir(entry) and HIDDEN & set(os.listdir(entry)):
        mirror = os.path.join(MIRRORS, str(i))
        os.makedirs(mirror, exist_ok=True)
        for name in set(os.listdir(entry)) - HIDDEN:
            if not os.path.lexists(os.path.join(mirror, name)):
                os.symlink(os.path.join(entry, name), os.path.join(mirror, name))
        entry = mirror
    paths.append(entry)
hydra_plugins.__path__ = paths
"""


@pytest.mark.parametrize(("launcher", "plugin"), [("parallel", "joblib"),
                                                  ("slurm", "submitit_slurm")])
def test_a_launcher_without_the_extra_names_the_pip_command(launcher, plugin, tmp_path,
                                                            subprocess_env):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(HIDE_LAUNCHERS))
    env = dict(subprocess_env, PYTHONPATH=str(site))
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "vgrad.train", "-m", f"hydra/launcher={launcher}", *TINY,
         f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 2, result.stderr
    line = one_error_line(result.stderr, f"hydra/launcher={plugin}", LAUNCHERS_INSTALL)
    assert "launcher plugin is not installed" in line
    assert not sweep.exists()
