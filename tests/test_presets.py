"""Every preset: each command written in its file composes and validates with every
value of each of its sweep axes, and its first command runs as a (tiny) multirun."""

from __future__ import annotations

import itertools
import shlex
from pathlib import Path

import pytest
from conftest import compose_cfg, run_dirs
from hydra.core.override_parser.overrides_parser import OverridesParser

from vgrad import config, store
from vgrad.train import CONF_DIR

PRESETS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
FASHION = Path("/usr/share/datasets/fashion-mnist")

#: What makes each preset's data tiny.
TINY_DATA = {
    "circles": ["data.n_samples=64"],
    "digits": ["data.n_train=64", "record.probe_size=32"],
    "fashion_mnist": ["data.n_train=64", "data.n_test=32", "record.probe_size=32"],
    "adding": ["data.n_train=64", "data.n_test=16", "record.probe_size=32"],
    "copy": ["data.n_train=64", "data.n_test=16", "record.probe_size=32", "data.length=4"],
}


#: Sweep axes of a first command cut to two values (the phase diagram is 130 jobs).
SHRINK = {
    "phase_diagram": {"init.sigma_w2": "init.sigma_w2=1,4", "depth": "depth=10"},
    "isometry": {"depth": "depth=16,32"},
    "nielsen": {"depth": "depth=1,4"},  # each depth is a program
    "gradient_noise": {"depth": "depth=2"},
    "rnn_time": {"model": "model=rnn,gru", "data.length": "data.length=6"},
    "cnn_depth": {"depth": "depth=2,3"},
    "copy_task": {"model": "model=rnn,lstm"},
    "transformer_ln": {"depth": "depth=1,2"},
    "finite_width": {"width": "width=16,32", "depth": "depth=2", "seed": "seed=0"},
    "coord_check": {"width": "width=8,16", "optim": "optim=sgd"},
}


def commands(preset: str) -> list[list[str]]:
    """The ``python -m vgrad.train ...`` lines of the preset's header comment."""
    text = (Path(CONF_DIR) / "experiment" / f"{preset}.yaml").read_text()
    return [shlex.split(line.split("vgrad.train", 1)[1]) for line in text.splitlines()
            if line.startswith("#") and "python -m vgrad.train" in line]


def axes(args: list[str]) -> list[list[str]]:
    """Each override of a sweep command as the list of its values' overrides."""
    parsed = OverridesParser.create().parse_overrides([a for a in args if a != "-m"])
    return [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
            if o.is_sweep_override() else [o.input_line] for o in parsed]


def jobs(args: list[str]) -> list[list[str]]:
    """The override lists of every job of a sweep command (cartesian, as Hydra's)."""
    return [list(job) for job in itertools.product(*axes(args))]


def covering_jobs(args: list[str]) -> list[list[str]]:
    """Jobs of a sweep command in which every value of every axis appears at least once
    (job i takes each axis's value i mod its length): as many as the longest axis has
    values, where the cartesian product of the phase diagram is 130 jobs of 0.35 s each
    to compose."""
    values = axes(args)
    n = max(len(v) for v in values)
    return [[v[i % len(v)] for v in values] for i in range(n)]


def test_there_is_a_preset_per_source():
    assert PRESETS == ["cnn_depth", "coord_check", "copy_task", "edge_of_stability", "exploding",
                       "finite_width", "gradient_noise", "isometry", "mnist_losses",
                       "nielsen", "phase_diagram", "relu_fix", "residual_fix", "rnn_time",
                       "transformer_ln", "visualize"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_command_of_the_preset_composes_and_validates(preset):
    cmds = commands(preset)
    assert cmds and cmds[0][0] == "-m" and f"+experiment={preset}" in cmds[0]
    for cmd in cmds:
        for job in covering_jobs(cmd):
            config.validate(compose_cfg(*job))


@pytest.mark.parametrize("preset", PRESETS)
def test_first_command_runs_as_a_tiny_multirun(cli, tmp_path, preset):
    composed = compose_cfg(f"+experiment={preset}")
    data = composed.data.name
    if data == "fashion_mnist" and not FASHION.is_dir():
        pytest.skip("apt-get install dataset-fashion-mnist")
    cmd = [SHRINK.get(preset, {}).get(a.split("=")[0], a) for a in commands(preset)[0]]
    batch = min(16, composed.data.get("n_train") or 16)  # (finite_width trains on one)
    tiny = ["epochs=1", "seeds=1", f"batch_size={batch}", "record.every=1", "progress=false",
            *TINY_DATA[data], f"hydra.sweep.dir={tmp_path}"]
    code, _, err = cli(*cmd, *tiny)
    assert code == 0, err
    dirs = run_dirs(tmp_path)
    assert len(dirs) == len(jobs(cmd))
    for d in dirs:
        assert store.read_summary(d)["status"] in ("completed", "diverged", "partial")
