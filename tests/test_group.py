"""Grouped sweeps: jobs of one structure train as one program, with each job's own numbers."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DIVERGENT_CLI, LIGHT, TINY, compose_cfg, run_dirs, run_group, run_to_end

from vgrad import group, runner, store

#: Two activations x two learning rates: four jobs of one structure.
SWEEP = ["-m", "act=tanh,relu", "optim.lr=0.001,0.02", *TINY]


def metrics_by_config(sweep) -> dict[tuple, dict[str, np.ndarray]]:
    out = {}
    for d in run_dirs(sweep):
        c = store.read_summary(d)["config"]
        out[(c["act"]["name"], c["optim"]["lr"])] = store.read_metrics(d)
    return out


def assert_close_metrics(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str) -> None:
    assert a.keys() == b.keys(), what
    for k, v in a.items():
        if v.dtype.kind == "f":
            # Members batched together may round matrix products differently from a job
            # trained alone: float32 rounding, amplified a little by two epochs of training
            # (on an H200 GPU, whose reductions' order depends on the batch of members,
            # an activation mean of a split group differed by 3e-5 relative).
            np.testing.assert_allclose(b[k], v, rtol=1e-4, atol=1e-7, err_msg=f"{what} {k}")
        else:
            np.testing.assert_array_equal(b[k], v, err_msg=f"{what} {k}")


def test_vgrad_launcher_gives_the_basic_launchers_numbers(cli, tmp_path):
    code, _, err = cli(*SWEEP, "hydra/launcher=basic", f"hydra.sweep.dir={tmp_path / 'basic'}")
    assert code == 0, err
    code, out, err = cli(*SWEEP, f"hydra.sweep.dir={tmp_path / 'grouped'}")
    assert code == 0, err
    basic, grouped = metrics_by_config(tmp_path / "basic"), metrics_by_config(tmp_path / "grouped")
    assert len(basic) == 4 and basic.keys() == grouped.keys()
    for key in basic:
        assert_close_metrics(basic[key], grouped[key], str(key))
    for d in run_dirs(tmp_path / "grouped"):
        summary = store.read_summary(d)
        assert summary["timing"]["group"]["jobs"] == 4
        assert summary["timing"]["group"]["members"] == 4
        assert (d / ".hydra" / "config.yaml").is_file()
        assert (d / ".hydra" / "overrides.yaml").is_file()
        assert not (d / store.CHECKPOINT).exists()  # removed once the run ended
    assert (tmp_path / "grouped" / "runs.csv").is_file()
    assert "report: vgrad-report" in out + err


@pytest.mark.parametrize("varied", [
    ["act=tanh", "act=sigmoid", "act=elu", "act=leaky_relu"],
    ["init=normal", "init=he_uniform", "init=orthogonal", "init.std=0.3"],
    ["optim.lr=0.1", "optim.lr=0.001", "optim=sgd optim.momentum=0.9 optim.lr=0.5",
     "optim=sgd optim.momentum=0.5"],
    ["clip=value clip.max=0.5", "clip=value clip.max=0.01", "clip=value", "clip=value"],
])
def test_jobs_differing_in_knobs_and_families_compile_one_program(compile_counter, varied):
    # (the last case: two identical jobs, differing from the others only in clip.max)
    by_structure: dict[str, list] = {}
    for v in varied:
        cfg = compose_cfg(*TINY, *LIGHT, "depth=2", "width=3", *v.split())
        by_structure.setdefault(group.group_key(runner.prepare(cfg, "unused")), []).append(cfg)
    for cfgs in by_structure.values():
        records = run_group(cfgs)
        assert len(records) == len(cfgs)
    # sgd with momentum and rmsprop are two structures; everything else is one.
    assert len(by_structure) == (2 if "optim=sgd" in " ".join(varied) else 1)
    assert compile_counter.compiles("chunk") == len(by_structure)
    assert compile_counter.compiles("start") == len(by_structure)


def test_each_job_of_a_group_has_the_numbers_it_has_alone():
    cfgs = [compose_cfg(*TINY, "seeds=2", *o.split()) for o in
            ("act=tanh optim.lr=0.01", "act=relu init=he_normal", "act=swish act.beta=2.0",
             "act=tanh data.noise=0.3")]
    together = run_group(cfgs)
    for cfg, rec in zip(cfgs, together, strict=True):
        alone = run_to_end(cfg)
        for k, v in alone.step_stats.items():
            np.testing.assert_allclose(rec.step_stats[k], v, rtol=2e-5, atol=1e-8, err_msg=k)
        for k, v in alone.epoch_stats.items():
            np.testing.assert_allclose(rec.epoch_stats[k], v, rtol=2e-5, atol=1e-7, err_msg=k)
    # The jobs really differ (each member reads its own knobs, family and dataset).
    losses = [r.step_stats["loss"][0] for r in together]
    assert all(not np.allclose(a, b) for i, a in enumerate(losses) for b in losses[i + 1:])


def test_a_diverging_job_does_not_stop_its_group():
    cfgs = [compose_cfg(*DIVERGENT_CLI), compose_cfg(*DIVERGENT_CLI, "optim.lr=1e-4")]
    diverged, fine = run_group(cfgs)
    assert diverged.diverged_at.tolist() == [2]
    assert fine.diverged_at.tolist() == [-1]
    assert np.isfinite(fine.step_stats["loss"]).all()
    assert np.isnan(diverged.step_stats["loss"][0, 3:]).all()


def test_memory_budget_splits_a_group_without_changing_its_numbers(cli, tmp_path):
    code, out, err = cli(*SWEEP, "hydra.launcher.max_jobs_per_program=3",
                         f"hydra.sweep.dir={tmp_path / 'split'}")
    assert code == 0, err
    assert "4 jobs to train in 2 program(s)" in out + err
    sizes = sorted(store.read_summary(d)["timing"]["group"]["jobs"]
                   for d in run_dirs(tmp_path / "split"))
    assert sizes == [1, 3, 3, 3]
    code, _, err = cli(*SWEEP, f"hydra.sweep.dir={tmp_path / 'whole'}")
    assert code == 0, err
    split, whole = metrics_by_config(tmp_path / "split"), metrics_by_config(tmp_path / "whole")
    for key in whole:
        assert_close_metrics(whole[key], split[key], str(key))


def test_group_size_follows_the_memory_estimate():
    cfg = compose_cfg(*TINY, "seeds=3")
    job = runner.prepare(cfg, "unused")
    per_member = group.member_bytes(job)
    assert per_member > 0
    jobs = [runner.prepare(compose_cfg(*TINY, "seeds=3", f"optim.lr={lr}"), f"j{i}")
            for i, lr in enumerate((0.1, 0.2, 0.3, 0.4, 0.5))]
    groups = group.group_jobs(jobs, max_members=7)  # two jobs of 3 seeds fit, not three
    assert [len(g.jobs) for g in groups] == [2, 2, 1]
    assert [g.n_members for g in groups] == [6, 6, 3]


def test_a_recurrent_members_memory_estimate_counts_its_time_steps():
    def estimate(length: int) -> int:
        cfg = compose_cfg("model=rnn", "data=adding", f"data.length={length}",
                          "data.n_train=64", "data.n_test=16", "loss=regression", "epochs=1")
        return group.member_bytes(runner.prepare(cfg, "unused"))

    assert estimate(100) > 8 * estimate(10)  # activations x T dominate at T = 100


def test_an_invalid_job_is_recorded_and_the_others_run(cli, tmp_path):
    code, _, err = cli("-m", "depth=2,0,3", *TINY, f"hydra.sweep.dir={tmp_path}")
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("vgrad: error:")]
    assert len(lines) == 1 and "depth=0" in lines[0]
    statuses = {store.read_summary(d)["config"]["depth"]: store.read_summary(d)["status"]
                for d in run_dirs(tmp_path)}
    assert statuses == {2: "completed", 0: "failed", 3: "completed"}


def test_each_job_is_composed_once_and_a_bad_override_stops_the_sweep_first(
        cli, tmp_path, monkeypatch):
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    composed = []
    real = ConfigLoaderImpl.load_sweep_config

    def counting(self, master_config, sweep_overrides):
        composed.append(list(sweep_overrides))
        return real(self, master_config, sweep_overrides)

    monkeypatch.setattr(ConfigLoaderImpl, "load_sweep_config", counting)
    code, _, err = cli("-m", "act=tanh,relu", *TINY, f"hydra.sweep.dir={tmp_path / 'ok'}")
    assert code == 0, err
    assert len(composed) == 2  # Hydra's basic sweeper alone would compose each job twice
    code, _, err = cli("-m", "act=tanh,bogus", *TINY, f"hydra.sweep.dir={tmp_path / 'bad'}")
    assert code == 2
    assert "act=bogus" in err and not run_dirs(tmp_path / "bad")
