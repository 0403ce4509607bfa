"""Training from Python (``vgrad.api``): the same numbers as the command line, Hydra's
global state left alone, bad input refused before anything is written."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LIGHT, TINY
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import vgrad
from vgrad import api, store
from vgrad.errors import ComposeError, ConfigError
from vgrad.train import CONF_DIR

ARGS = [*TINY, *LIGHT, "seeds=2", "depth=3"]


def _same_numbers(a, b) -> None:
    for key in ("loss", "grad_global_norm", "train_loss", "train_acc"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_train_from_python_gives_the_command_lines_numbers(cli, tmp_path):
    run = vgrad.api.train(ARGS, run_dir=tmp_path / "api")
    assert run.status == "completed" and run.summary["seeds"] == [0, 1]
    code, _, err = cli(*ARGS, f"hydra.run.dir={tmp_path / 'cli'}")
    assert code == 0, err
    _same_numbers(run.metrics, store.read_metrics(tmp_path / "cli"))
    assert run.config == store.read_summary(tmp_path / "cli")["config"]
    assert (tmp_path / "api" / ".hydra" / "config.yaml").is_file()
    # Called again: the ended run is read back, not trained again.
    again = api.train(ARGS, run_dir=tmp_path / "api")
    assert again.summary["timing"] == run.summary["timing"]


def test_a_sweep_from_python_gives_the_command_lines_numbers(cli, tmp_path):
    fixed = {"epochs": 2, "data.n_samples": 128, "progress": False, "depth": 3,
             "record.step_probes": ["global_norms"], "record.epoch_probes": ["evaluation"]}
    sweep = api.sweep({"act": ["sigmoid", "tanh"]}, fixed, sweep_dir=tmp_path / "api")
    code, _, err = cli("-m", *TINY, *LIGHT, "depth=3", "act=sigmoid,tanh",
                       f"hydra.sweep.dir={tmp_path / 'cli'}")
    assert code == 0, err
    runs = sweep.runs
    assert runs["run"].tolist() == ["0", "1"]
    assert runs["act.name"].tolist() == ["sigmoid", "tanh"]  # the command line's order
    assert (runs["status"] == "completed").all()
    assert (tmp_path / "api" / "runs.csv").is_file()
    for job in ("0", "1"):
        assert sweep.run(job).config == store.read_summary(tmp_path / "cli" / job)["config"]
        _same_numbers(sweep.run(job).metrics, store.read_metrics(tmp_path / "cli" / job))
    # One program for both jobs (activation is a number axis), as with vgrad's launcher.
    assert sweep.run("0").summary["timing"]["group"]["jobs"] == 2
    # Again with one more value: the two ended runs are kept, only the new job trains.
    before = (tmp_path / "api" / "0" / "summary.json").read_bytes()
    more = api.sweep({"act": ["sigmoid", "tanh", "relu"]}, fixed, sweep_dir=tmp_path / "api")
    assert sorted(more.runs["act.name"]) == ["relu", "sigmoid", "tanh"]
    assert (tmp_path / "api" / "0" / "summary.json").read_bytes() == before


def test_mappings_and_lists_compose_the_same_config():
    as_list = api.compose(["act=relu", "optim.lr=0.01", "record.step_probes=[global_norms]",
                           "widths=[3,4]", "depth=2", "compile_cache=null"])
    as_dict = api.compose({"act": "relu", "optim.lr": 0.01,
                           "record.step_probes": ["global_norms"], "widths": [3, 4],
                           "depth": 2, "compile_cache": None})
    assert as_list == as_dict
    path = api.compose({"data": "fashion_mnist", "data.path": "/tmp/a b,c's"})
    assert path.data.path == "/tmp/a b,c's"


def test_hydra_state_of_the_caller_is_left_as_it_was():
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None, job_name="mine"):
        assert api.compose({"act": "tanh"}).act.name == "tanh"
        assert GlobalHydra.instance().is_initialized()
        assert compose("config", overrides=["act=relu"]).act.name == "relu"
    assert not GlobalHydra.instance().is_initialized()
    assert api.compose([]).act.name == "sigmoid"


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="epochs=0: expected a number >= 1"):
        api.train({"epochs": 0}, run_dir=tmp_path / "run")
    with pytest.raises(ComposeError, match="act=nope: unknown choice"):
        api.train({"act": "nope"}, run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"batch_size=0.*\(job 1: .*batch_size=0\)"):
        api.sweep({"batch_size": [8, 0]}, TINY, sweep_dir=tmp_path / "sweep")
    with pytest.raises(ConfigError, match="run_dir= or sweep_dir="):
        api.train(["hydra.run.dir=elsewhere"])
    with pytest.raises(TypeError, match="list of values"):
        api.sweep({"act": "relu,tanh"})
    assert not any(tmp_path.iterdir())
