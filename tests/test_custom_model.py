"""The config route for a user's module (``model=custom model.target=...``): the README's
example imported from a temporary folder as a user would, one program for a sweep of
it, and one-line errors for a module vgrad cannot use."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_cfg, one_error_line, run_dirs, run_group

from vgrad import group, runner, store

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "my_model.py"
#: The example's run, small: 64 digits, one epoch.
SMALL = ["data=digits", "loss=ce", "data.n_train=64", "epochs=1", "batch_size=16",
         "progress=false"]


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A folder holding the example module, as the working directory and on the path."""
    shutil.copy(EXAMPLE, tmp_path / "my_model.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_the_readme_example_trains_from_the_users_folder(user_folder, subprocess_env):
    done = subprocess.run(
        [sys.executable, "-m", "vgrad.train", "-m", "model=custom",
         "model.target=my_model.SmallResNet", *SMALL, "act=relu,tanh",
         "+model.args.blocks=1", "hydra.sweep.dir=sweep"],
        cwd=user_folder, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    runs = run_dirs(user_folder / "sweep")
    assert len(runs) == 2
    for run in runs:
        summary = store.read_summary(run)
        assert summary["status"] == "completed"
        assert summary["layers"] == ["stem", "block_0/Conv_0", "block_0/Conv_1", "head"]
        metrics = store.read_metrics(run)
        assert metrics["delta_norm"].shape[-1] == 4
        assert np.isfinite(metrics["delta_norm"]).all()
        assert metrics["act_dead_frac"].shape[-1] == 3  # act after every layer but the head
    grouped = {store.read_summary(r)["timing"]["group"]["jobs"] for r in runs}
    assert grouped == {2}  # (relu and tanh: one program)
    assert (user_folder / "sweep" / "runs.csv").is_file()


def test_a_sweep_of_a_users_module_compiles_one_program(user_folder, compile_counter):
    cfgs = [compose_cfg("model=custom", "model.target=my_model.SmallResNet",
                        "+model.args.blocks=1", *SMALL, *o.split())
            for o in ("act=relu optim.lr=0.01", "act=tanh optim.lr=0.01",
                      "act=relu init=he_uniform", "act=elu optim.lr=0.003")]
    keys = {group.group_key(runner.prepare(cfg, Path("unused"))) for cfg in cfgs}
    assert len(keys) == 1
    records = run_group(cfgs)
    assert len(records) == 4 and all(r.done for r in records)
    assert compile_counter.compiles("chunk") == 1


BAD_MODULES = textwrap.dedent('''
    import flax.linen as nn

    class NoCall(nn.Module):
        width: int = 3

    class NoInput(nn.Module):
        @nn.compact
        def __call__(self):
            return 0

    class NotAModule:
        pass

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.Dense(4)(x), None

    class ScanWithoutAxes(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(4)(x)
            stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                            length=2)
            x, _ = stack()(x, None)
            return nn.Dense(10)(x)

    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.Dense(64)
            return nn.Dense(10)(dense(dense(x)))
''')


@pytest.mark.parametrize("overrides,key,needle", [
    (["model.target=nowhere.Net"], "model.target", "ModuleNotFoundError"),
    (["model.target=my_model.Missing"], "model.target", "importable"),
    (["model.target=Net"], "model.target", "dotted path"),
    (["model.target=bad_modules.NotAModule"], "model.target", "flax.linen.Module class"),
    (["model.target=bad_modules.NoCall"], "model.target", "__call__(self, x)"),
    (["model.target=bad_modules.NoInput"], "model.target", "__call__(self, x)"),
    (["model.target=bad_modules.ScanWithoutAxes"], "model",
     "variable_axes lack 'perturbations'"),
    (["model.target=bad_modules.Shared"], "model", "Dense_0 is called twice"),
    (["model.target=my_model.SmallResNet", "+model.args.depth_of_field=3"],
     "model.args.depth_of_field", "a field of SmallResNet"),
    (["model.target=my_model.SmallResNet", "act=maxout"], "act", "one output per unit"),
])
def test_a_module_vgrad_cannot_use_is_refused_in_one_line(user_folder, cli, overrides, key,
                                                         needle):
    (user_folder / "bad_modules.py").write_text(BAD_MODULES)
    code, _, err = cli("model=custom", *SMALL, *overrides, "hydra.run.dir=run")
    assert code == 2
    one_error_line(err, key, needle)
    assert not (user_folder / "run").exists()


def test_the_modules_fields_are_filled_from_the_config(user_folder):
    from vgrad import models

    cfg = compose_cfg("model=custom", "model.target=my_model.SmallResNet", *SMALL,
                      "+model.args.channels=6")
    net = models.build(cfg, 10).net
    assert (net.num_classes, net.channels, tuple(net.image_shape)) == (10, 6, (8, 8, 1))
    assert net.kernel_init is not None and callable(net.act)
    summary = json.dumps(models.layout(cfg, 64).names)
    assert "stem" in summary and "head" in summary
