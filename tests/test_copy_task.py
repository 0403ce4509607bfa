"""The copy task: its sequences, targets and memoryless baseline, the per-step loss
against numpy, the readout at every step, the configuration errors, and a sweep whose
loss figure draws the baseline."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compose_cfg

from vgrad import data, losses, models
from vgrad.config import validate, validate_data
from vgrad.errors import ConfigError

COPY = ["data=copy", "loss=ce", "data.length=6", "data.n_train=64", "data.n_test=16"]


def test_copy_sequences_markers_targets_and_the_memoryless_baseline():
    cfg = compose_cfg(*COPY, "model=lstm")
    ds = data.load(cfg.data)
    steps, cats = 6 + 20, 8 + 2
    assert data.sequence_shape(cfg.data) == (steps, cats) and data.per_step(cfg.data)
    assert ds.x_train.shape == (64, steps * cats) and ds.y_train.shape == (64, steps)
    assert ds.y_train.dtype == np.int32 and ds.n_classes == 9
    x = ds.x_train.reshape(64, steps, cats)
    assert (x.sum(axis=2) == 1).all()  # one-hot at every step
    category = x.argmax(axis=2)
    symbols = category[:, :10]
    assert ((symbols >= 1) & (symbols <= 8)).all()
    assert (category[:, 10:15] == 0).all()  # T - 1 = 5 blanks
    assert (category[:, 15] == 9).all()  # the delimiter
    assert (category[:, 16:] == 0).all()  # blanks while the net recalls
    np.testing.assert_array_equal(ds.y_train[:, -10:], symbols)
    assert (ds.y_train[:, :-10] == 0).all()
    again = data.copy_task(cfg.data)
    np.testing.assert_array_equal(again.y_train, ds.y_train)
    assert data.copy_baseline(compose_cfg("data=copy").data) == pytest.approx(
        10 * math.log(8) / 120)
    # The baseline is the loss of a net that outputs blanks, then guesses uniformly.
    p = np.full((64, steps, 9), 1e-30)
    p[:, :-10, 0] = 1.0
    p[:, -10:, 1:] = 1 / 8
    loss = losses.LOSSES["ce"](jnp.log(jnp.asarray(p)), jnp.asarray(ds.y_train))
    np.testing.assert_allclose(loss, data.copy_baseline(cfg.data), rtol=1e-5)


def test_per_step_cross_entropy_and_correctness_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 7, 4)) * 3
    labels = rng.integers(0, 4, (5, 7))
    log_p = logits - np.log(np.exp(logits).sum(axis=2, keepdims=True))
    expected = -np.take_along_axis(log_p, labels[..., None], axis=2)[..., 0].mean(axis=1)
    got = losses.LOSSES["ce"](jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    right = (logits.argmax(axis=2) == labels).mean(axis=1)
    np.testing.assert_allclose(losses.correct("ce", jnp.asarray(logits), jnp.asarray(labels)),
                               right)
    flat = losses.LOSSES["ce"](jnp.asarray(logits[:, 0], jnp.float32), jnp.asarray(labels[:, 0]))
    np.testing.assert_allclose(flat, -np.take_along_axis(log_p[:, 0], labels[:, :1], 1)[:, 0],
                               rtol=1e-5)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_recurrent_nets_read_out_at_every_step_of_the_copy_task(cell):
    cfg = compose_cfg(*COPY, f"model={cell}", "width=5", "act=tanh")
    net = models.build(cfg, 9)
    x = jnp.asarray(data.load(cfg.data).x_train[:3])
    params = net.init(jax.random.key(0), x)["params"]
    logits = net.apply({"params": params}, x)
    assert logits.shape == (3, 26, 9)
    # Causal: the logits before a step do not change when that step's input does.
    later = x.reshape(3, 26, 10).at[:, 20].set(0.0).reshape(3, -1)
    moved = net.apply({"params": params}, later)
    np.testing.assert_array_equal(moved[:, :20], logits[:, :20])
    assert not np.allclose(moved[:, 20:], logits[:, 20:])


def test_copy_task_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.*readout at every step"):
        validate(compose_cfg(*COPY, "model=mlp"))
    with pytest.raises(ConfigError, match="data.symbols"):
        validate(compose_cfg(*COPY, "model=lstm", "data.symbols=0"))
    for loss in ("bce", "bce_onehot"):
        with pytest.raises(ConfigError, match="ce or mse"):
            validate(compose_cfg(*COPY, "model=lstm", f"loss={loss}"))
    with pytest.raises(ConfigError, match="regression"):
        validate_data(compose_cfg(*COPY, "model=lstm", "loss=regression"), 64, 9)


def test_a_copy_task_sweep_records_time_profiles_and_draws_the_baseline(cli, tmp_path):
    from vgrad.analysis import load_sweep
    from vgrad.analysis.predictions import baseline

    code, _, err = cli("-m", "model=rnn,lstm", "act=tanh", *COPY, "depth=1", "width=8",
                       "epochs=2", "seeds=2", "batch_size=16", "optim=adam", "progress=false",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert code == 0, err
    sweep = load_sweep(tmp_path / "sweep")
    for run in sweep.runs_list:
        delta = run.metrics["time_delta_norm"]
        assert delta.shape[-2:] == (1, 26) and np.isfinite(delta).all()
        acc = run.metrics["train_acc"]
        assert ((acc >= 0) & (acc <= 1)).all()
    value, text = baseline(sweep.runs_list, "test_loss")
    assert value == pytest.approx(10 * math.log(8) / 26) and "no memory" in text
    assert baseline(sweep.runs_list, "test_acc") is None  # (not 1/9: most steps are blank)
