"""The command line: runs, sweeps, divergence as a result, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DIVERGENT_CLI, LIGHT, run_dirs

from vgrad import store

REPO = Path(__file__).resolve().parent.parent


def test_module_entry_point_runs_and_says_where_outputs_are(tmp_path, subprocess_env):
    env = subprocess_env
    proc = subprocess.run(
        [sys.executable, "-m", "vgrad.train", "epochs=2", f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"outputs: {tmp_path}/run" in proc.stdout + proc.stderr
    summary = store.read_summary(tmp_path / "run")
    assert summary["status"] == "completed"
    assert summary["layers"] == [f"dense_{i}" for i in range(5)]
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()
    with np.load(tmp_path / "run" / "metrics.npz", allow_pickle=False) as m:
        assert m["grad_std"].shape == (1, 2 * 31, 5)


def test_visualize_preset_sweeps_three_activations(cli, tmp_path):
    code, out, err = cli("-m", "+experiment=visualize", "act=sigmoid,tanh,relu", "epochs=2",
                         "progress=false", f"hydra.sweep.dir={tmp_path}")
    assert code == 0, err
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 3
    acts = set()
    for d in dirs:
        s = store.read_summary(d)
        assert s["status"] == "completed"
        assert s["config"]["depth"] == 4 and s["config"]["width"] == 5
        assert s["config"]["optim"] == {"name": "rmsprop", "lr": 0.001, "rho": 0.9, "eps": 1e-07,
                                        "momentum": 0.0, "centered": False, "l2": 0.0,
                                        "schedule": "constant", "warmup": 0}
        acts.add(s["config"]["act"]["name"])
        assert (d / ".hydra" / "overrides.yaml").is_file()
        assert store.read_metrics(d)["loss"].shape == (1, 62)
    assert acts == {"sigmoid", "tanh", "relu"}


def test_divergence_is_a_result_not_a_crash(cli, tmp_path):
    code, out, err = cli(*DIVERGENT_CLI, f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    s = store.read_summary(tmp_path)
    assert s["status"] == "diverged"
    assert s["diverged_at_step"] == [2]
    loss = store.read_metrics(tmp_path)["loss"][0]
    assert np.isfinite(loss[:2]).all()
    json.dumps(s, allow_nan=False)  # valid JSON: non-finite numbers are null


BAD = [
    (["act=foo"], "act=foo"),
    (["depth=abc"], "depth"),
    (["depth=0"], "depth=0"),
    (["width=0"], "width=0"),
    (["epochs=0"], "epochs=0"),
    (["batch_size=0"], "batch_size=0"),
    (["batch_size=5000"], "batch_size=5000"),
    (["optim.lr=0"], "optim.lr=0"),
    (["optim=sgd", "optim.lr=-1"], "optim.lr=-1"),
    (["clip=value", "clip.max=0"], "clip.max=0"),
    (["dept=3"], "dept"),
    (["bn=sideways"], "bn"),
    (["init=uniform", "init.std=2"], "init.std"),
    (["data=digits"], "loss=bce"),
    (["data=mnist"], "data.path"),
    (["data=mnist", "data.path=/no/such/folder"], "data.path=/no/such/folder"),
    (["widths=[4,4]"], "widths"),
    (["data.noise=-1"], "data.noise=-1"),
    (["data.n_samples=-5"], "data.n_samples=-5"),
    (["data.factor=1.5"], "data.factor=1.5"),
    (["init.std=inf"], "init.std=inf"),
    (["dtype=float16"], "dtype=float16"),
]


@pytest.mark.parametrize("overrides,names", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_gives_one_clear_line_and_nonzero_exit(cli, tmp_path, overrides, names):
    code, out, err = cli(*overrides, "progress=false", f"hydra.run.dir={tmp_path}/run")
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("vgrad: error: ") and names in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert not run_dirs(tmp_path)  # a run that never started leaves no run folder
    assert not (tmp_path / "run").exists()


def test_missing_dataset_message_says_how_to_get_it(cli, tmp_path):
    code, _, err = cli("data=mnist", f"hydra.run.dir={tmp_path}")
    assert code == 2
    assert "IDX" in err and "data.path=" in err


@pytest.mark.parametrize("save_every_s,writes", [(0, 4), (3600, 2)])
def test_save_every_s_sets_how_often_a_running_run_is_written(cli, tmp_path, monkeypatch,
                                                              save_every_s, writes):
    calls = []
    real = store.write_npz
    monkeypatch.setattr(store, "write_npz", lambda path, arrays: (
        calls.append(path) if path.name == store.METRICS else None, real(path, arrays)))
    code, _, err = cli("epochs=4", "record.chunk_epochs=1", f"record.save_every_s={save_every_s}",
                       "data.n_samples=64", "progress=false", *LIGHT, f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    assert len(calls) == writes  # every chunk, or the first and the last
    assert store.read_metrics(tmp_path)["epoch"].tolist() == [0, 1, 2, 3, 4]
