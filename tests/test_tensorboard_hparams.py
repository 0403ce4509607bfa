"""TensorBoard export: runs named after their config, hyperparameters for the HParams
dashboard (read back by TensorBoard's own readers), and events bounded for long runs."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
from conftest import LIGHT, TINY

from vgrad import plan as plans
from vgrad import store
from vgrad import tensorboard as tb
from vgrad.probes import HIST_EDGES

pytest.importorskip("tensorboard")


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0,
                                                          "tensors": 0})
    events.Reload()
    return events


def _session_start(events):
    from tensorboard.plugins.hparams import metadata

    content = events.PluginTagToContent("hparams")
    return metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])


def test_each_seed_is_a_named_run_with_its_hyperparameters(cli, tmp_path):
    from tensorboard.plugins.hparams import metadata

    code, _, err = cli(*TINY, *LIGHT, "seeds=2", "act=relu", "optim.lr=0.003",
                       "tensorboard=true", f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    config = store.read_summary(tmp_path)["config"]
    dirs = tb.seed_dirs(tmp_path)
    assert sorted(dirs) == [0, 1]
    assert dirs[0].parent.name == tb.label(config) == "relu-normal-d4-w5-rmsprop-lr0.003-bce"
    for seed, folder in dirs.items():
        events = _events(folder)
        values = _session_start(events).hparams
        assert values["act.name"].string_value == "relu"
        assert values["init.name"].string_value == "normal"
        assert values["depth"].number_value == 4 and values["width"].number_value == 5
        assert values["optim.lr"].number_value == pytest.approx(0.003)
        assert values["seed"].number_value == seed
        assert values["record.step_probes"].string_value == '["global_norms"]'
        assert not {"progress", "resume", "tensorboard", "seeds"} & set(values)
        assert metadata.SESSION_END_INFO_TAG in events.PluginTagToContent("hparams")
        # The metrics the dashboard shows are the run's scalars (their last value).
        acc = events.Scalars("train/acc")
        final = store.read_summary(tmp_path)["per_seed"][seed]["final"]["train_acc"]
        assert acc[-1].value == pytest.approx(final, rel=1e-6)


def test_tensorboards_hparams_backend_tells_a_sweeps_runs_apart(cli, tmp_path):
    """What the HParams dashboard reads, through TensorBoard's own backend: every run's
    session, the swept axis marked as differing, the scalars as metrics."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider
    from tensorboard.backend.event_processing import plugin_event_multiplexer as pem
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context

    code, _, err = cli("-m", *TINY, *LIGHT, "act=sigmoid,relu", "tensorboard=true",
                       f"hydra.sweep.dir={tmp_path}")
    assert code == 0, err
    multiplexer = pem.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(tmp_path))
    ctx = backend_context.Context(base_plugin.TBContext(
        logdir=str(tmp_path), multiplexer=multiplexer, data_provider=provider))
    request = context.RequestContext()
    sessions = ctx.hparams_metadata(request, "")
    assert sorted(sessions) == ["0/tensorboard/sigmoid-normal-d4-w5-rmsprop-lr0.001-bce/seed_0",
                                "1/tensorboard/relu-normal-d4-w5-rmsprop-lr0.001-bce/seed_0"]
    experiment = ctx.experiment_from_metadata(
        request, "", True, sessions, ctx.hparams_from_data_provider(request, "", 0))
    infos = {h.name: h for h in experiment.hparam_infos}
    assert infos["act.name"].differs and set(infos["act.name"].domain_discrete) == {
        "sigmoid", "relu"}
    assert not infos["depth"].differs and not infos["optim.lr"].differs
    assert experiment.hparam_infos[0].name == "act.name"  # what differs comes first
    assert {"train/acc", "train/loss", "loss"} <= {m.name.tag for m in experiment.metric_infos}


def test_events_are_decimated_to_the_caps(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(tb, "MAX_SCALARS", 10)
    monkeypatch.setattr(tb, "MAX_HISTOGRAMS", 4)
    code, _, err = cli(*TINY, "epochs=12", "tensorboard=true",
                       "record.step_probes=[global_norms]",
                       "record.epoch_probes=[evaluation,histograms]", f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    metrics = store.read_metrics(tmp_path)
    events = _events(tb.seed_dirs(tmp_path)[0])
    n = len(metrics["step"])
    assert n > 10
    keep = [i for i in range(n) if i % tb.stride(n, 10) == 0 or i == n - 1]
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == metrics["step"][keep].tolist()
    np.testing.assert_allclose([e.value for e in loss], metrics["loss"][0, keep], rtol=1e-6)
    per_epoch = len(metrics["step"]) // 12
    epochs = [e.step // per_epoch for e in events.Scalars("train/acc")]
    assert len(epochs) <= 10 and epochs[0] == 0 and epochs[-1] == 12
    hist = [e.step // per_epoch for e in events.Histograms("grad_hist/dense_0")]
    assert len(hist) <= 4 and hist[0] == 0 and hist[-1] == 12


@pytest.mark.parametrize("cap", [4, 100, 2000])
def test_the_stride_rule_keeps_at_most_cap_points_with_the_first_and_last(cap):
    for n in [*range(1, 3 * cap), 4001, 60000, 123457]:
        s = tb.stride(n, cap)
        kept = {i for i in range(0, n, s)} | {n - 1}
        assert len(kept) <= cap and 0 in kept
        assert s == 1 or len(kept) >= cap // 2  # no coarser than it needs to be


def _long_run(epochs: int, steps_per_epoch: int, layers: int, chunk: int):
    """Records of a long run as the loop yields them, chunk by chunk (synthetic values)."""
    plan = plans.Plan(steps_per_epoch, epochs, chunk, 1)
    names = [f"dense_{i}" for i in range(layers)]
    rng = np.random.default_rng(0)
    bins = HIST_EDGES.size - 1
    rec = types.SimpleNamespace(layer_names=names, plan=plan, step_parts=[],
                                step_stat_parts=[], epoch_parts=[], done=False,
                                diverged_at=np.array([-1]), epochs_done=0)
    first = {"train_loss": rng.random((1, 1)), "train_acc": rng.random((1, 1)),
             "grad_hist": rng.integers(0, 5, (1, 1, layers, bins)).astype(np.float32),
             "weight_hist": rng.integers(0, 5, (1, 1, layers, bins)).astype(np.float32)}
    for c in range(plan.n_chunks):
        epochs_of = plan.chunk_epochs_of(c)
        steps = plan.recorded_steps(epochs_of)
        t, e = len(steps), len(epochs_of)
        rec.step_parts.append(steps)
        rec.step_stat_parts.append({
            "loss": rng.random((1, t)), "grad_global_norm": rng.random((1, t)),
            **{k: rng.random((1, t, layers)) for k in tb.STEP_SCALARS}})
        stats = {"train_loss": rng.random((1, e)), "train_acc": rng.random((1, e)),
                 "grad_hist": rng.integers(0, 5, (1, e, layers, bins)).astype(np.float32),
                 "weight_hist": rng.integers(0, 5, (1, e, layers, bins)).astype(np.float32)}
        if c == 0:
            stats = {k: np.concatenate([first[k], v], axis=1) for k, v in stats.items()}
        rec.epoch_parts.append(stats)
        rec.epochs_done = epochs_of.stop
        rec.done = c == plan.n_chunks - 1
        yield rec


def test_a_4000_epoch_run_writes_bounded_events(tmp_path):
    """The run that wrote 52 MB: 4,000 epochs of 15 steps, 6 layers."""
    config = {"act": {"name": "tanh"}, "init": {"name": "uniform01"}, "depth": 5, "width": 5,
              "optim": {"name": "sgd", "lr": 0.01}, "loss": "bce", "seed": 0}
    export = tb.TensorBoardExport(tmp_path, [0], config=config)
    for rec in _long_run(4000, 15, 6, 100):
        export.update(rec)
    export.close()
    folder = tb.seed_dirs(tmp_path)[0]
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 4e6, size
    events = _events(folder)
    for tag in ("loss", "grad_norm/dense_0", "update_ratio/dense_5"):
        points = events.Scalars(tag)
        assert len(points) <= tb.MAX_SCALARS
        assert points[0].step == 0 and points[-1].step == 4000 * 15 - 1
    epochs = [e.step // 15 for e in events.Scalars("train/acc")]
    assert len(epochs) <= tb.MAX_SCALARS and epochs[-1] == 4000
    hist = [e.step // 15 for e in events.Histograms("grad_hist/dense_3")]
    assert len(hist) <= tb.MAX_HISTOGRAMS and hist[0] == 0 and hist[-1] == 4000
    assert math.isclose(np.diff(hist[:-1]).mean(), tb.stride(4001, tb.MAX_HISTOGRAMS))


def test_labels_name_the_main_knobs_and_stay_one_folder(tmp_path):
    config = {"model": {"name": "resmlp"}, "act": {"name": "tanh"},
              "init": {"name": "mean_field"}, "depth": 8, "width": 16, "bn": "pre",
              "optim": {"name": "sgd", "lr": 0.1}, "clip": {"name": "value", "max": 1.0},
              "loss": "ce", "dtype": "float64", "seed": 3}
    assert tb.label(config) == "resmlp-tanh-mean_field-d8-w16-bn_pre-sgd-lr0.1-clip_value1-ce-f64"
    # A launcher that knows its sweep's axes can name the runs by them instead.
    export = tb.TensorBoardExport(tmp_path, [3], config=config, name="../act=tanh, depth=8")
    rec = next(_long_run(1, 2, 2, 1))
    export.update(rec)
    export.close()
    assert list(tb.seed_dirs(tmp_path).values()) == [
        tmp_path / "tensorboard" / "_act=tanh,_depth=8" / "seed_3"]
