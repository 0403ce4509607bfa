"""Instruments: deltas, activation saturation and dead units, histograms, updates,
clipping, snapshots; each against numpy or a property that must hold."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, compose_cfg, run_to_end, step_once

from vgrad import probes, store
from vgrad import tensorboard as tb


def numpy_backprop(params, x, y, act, dact):
    """Forward and backward pass of a Dense MLP with BCE on one logit, per example."""
    names = sorted(params, key=lambda n: int(n.split("_")[1]))
    W = [np.asarray(params[n]["kernel"], np.float64) for n in names]
    b = [np.asarray(params[n]["bias"], np.float64) for n in names]
    a, zs, acts = x.astype(np.float64), [], [x.astype(np.float64)]
    for layer in range(len(W)):
        z = a @ W[layer] + b[layer]
        zs.append(z)
        a = act(z) if layer < len(W) - 1 else z
        acts.append(a)
    logit = zs[-1][:, 0]
    delta = [None] * len(W)
    delta[-1] = (1 / (1 + np.exp(-logit)) - y)[:, None]  # dl_n/dlogit for BCE
    for layer in range(len(W) - 2, -1, -1):
        delta[layer] = (delta[layer + 1] @ W[layer + 1].T) * dact(zs[layer])
    kernel_grads = [acts[layer].T @ delta[layer] / len(x) for layer in range(len(W))]
    return delta, kernel_grads


#: The probe of the activation statistics (few probes: compiling is these tests' cost).
ACTIVATIONS = ["record.step_probes=[global_norms]", "record.epoch_probes=[activation_stats]"]

ACTS = {
    "tanh": (np.tanh, lambda z: 1 - np.tanh(z) ** 2),
    "relu": (lambda z: np.maximum(z, 0), lambda z: (z > 0).astype(float)),
    "sigmoid": (lambda z: 1 / (1 + np.exp(-z)),
                lambda z: np.exp(-z) / (1 + np.exp(-z)) ** 2),
}


@pytest.mark.parametrize("act", sorted(ACTS))
def test_delta_norm_matches_a_numpy_backward_pass(act):
    layout, state, _, out, x, y = step_once(f"act={act}", "bias_init=normal",
                                           "bias_init.std=0.5")
    delta, kernel_grads = numpy_backprop(state.params, x, y, *ACTS[act])
    stats = probes.delta_norm(out, layout)["delta_norm"]
    for layer, name in enumerate(layout.names):
        expected = np.linalg.norm(delta[layer], axis=1).mean()
        np.testing.assert_allclose(stats[layer], expected, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(out.deltas[f"delta_{layer}"], delta[layer], rtol=1e-4,
                                   atol=1e-7)
        np.testing.assert_allclose(out.grads[name]["kernel"], kernel_grads[layer], rtol=1e-4,
                                   atol=1e-8)


def test_update_ratio_matches_numpy_for_one_sgd_step():
    layout, state, new_state, out, _, _ = step_once("optim=sgd", "optim.lr=0.3")
    stats = probes.update_stats(out, layout)
    for layer, name in enumerate(layout.names):
        g = np.concatenate([np.ravel(out.grads[name][k]) for k in ("kernel", "bias")])
        w = np.concatenate([np.ravel(state.params[name][k]) for k in ("kernel", "bias")])
        w_new = np.concatenate([np.ravel(new_state.params[name][k]) for k in ("kernel", "bias")])
        np.testing.assert_allclose(w_new - w, -0.3 * g, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(stats["update_norm"][layer], 0.3 * np.linalg.norm(g),
                                   rtol=1e-5)
        np.testing.assert_allclose(stats["update_ratio"][layer],
                                   0.3 * np.linalg.norm(g) / np.linalg.norm(w), rtol=1e-5)


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])
def test_global_norm_clipping_leaves_min_of_norm_and_threshold(max_norm):
    layout, _, _, out, _, _ = step_once("clip=global_norm", f"clip.max={max_norm}")
    stats = probes.clip_stats(out, layout)
    norm = float(probes.global_norms(out, layout)["grad_global_norm"])
    np.testing.assert_allclose(stats["grad_global_norm_clipped"], min(norm, max_norm), rtol=1e-5)
    assert stats["clip_fired"] == float(norm > max_norm)


def test_dead_relu_layers_and_live_linear_layers():
    dead = run_to_end(compose_cfg(*TINY, *ACTIVATIONS, "act=relu", "bias_init=constant",
                                  "bias_init.value=-100"))
    np.testing.assert_array_equal(dead.epoch_stats["act_dead_frac"][0, 0], 1.0)
    linear = run_to_end(compose_cfg(*TINY, *ACTIVATIONS, "act=linear"))
    np.testing.assert_array_equal(linear.epoch_stats["act_dead_frac"], 0.0)
    np.testing.assert_array_equal(linear.epoch_stats["act_sat_frac"], 0.0)


def test_sigmoid_with_huge_weights_is_saturated():
    big = run_to_end(compose_cfg(*TINY, "act=sigmoid", "init.std=100"))
    sat = big.epoch_stats["act_sat_frac"][0, 0]
    # The first layer sees the raw inputs; deeper ones partly see all-zero inputs
    # (every sigmoid below saturated at 0), where z = bias = 0 is not saturated.
    assert sat[0] > 0.95 and sat.mean() > 0.8
    small = run_to_end(compose_cfg(*TINY, "act=sigmoid", "init.std=0.01"))
    assert (small.epoch_stats["act_sat_frac"][0, 0] == 0).all()


def test_activation_mean_and_std_are_those_of_the_probe_batch():
    rec = run_to_end(compose_cfg(*TINY, "act=relu", "depth=1", "width=7",
                                 "record.probe_size=64"))
    assert rec.epoch_stats["act_mean"].shape == (1, 3, 1)
    assert (rec.epoch_stats["act_mean"] >= 0).all()  # relu outputs
    assert (rec.epoch_stats["act_std"] > 0).all()


def test_histograms_count_every_kernel_entry_in_shared_bins():
    histograms = ["record.step_probes=[global_norms]", "record.epoch_probes=[histograms]"]
    a = run_to_end(compose_cfg(*TINY, *histograms, "act=tanh", "depth=3", "width=6"))
    b = run_to_end(compose_cfg(*TINY, *histograms, "act=relu", "depth=2", "width=4"))
    for rec, fans in ((a, [(2, 6), (6, 6), (6, 6), (6, 1)]), (b, [(2, 4), (4, 4), (4, 1)])):
        for key in ("grad_hist", "weight_hist"):
            counts = rec.epoch_stats[key][0]  # [E+1, L, B]
            expected = np.array([i * o for i, o in fans], np.float32)
            np.testing.assert_array_equal(counts.sum(-1), np.broadcast_to(expected,
                                                                          counts.shape[:2]))
    edges_a = store.metrics_arrays(a)["hist_edges"]
    np.testing.assert_array_equal(edges_a, store.metrics_arrays(b)["hist_edges"])
    assert np.all(np.diff(edges_a) > 0)


def test_histogram_bins_place_values_by_decade():
    x = jnp.array([0.0, 1e-20, 1e-3, 2e-3, 1.0, 1e10, jnp.inf, jnp.nan])
    counts = np.asarray(probes.log10_hists([x[None]]))[0]  # one layer: one row
    edges = np.asarray(probes.HIST_EDGES)
    assert counts.sum() == 7  # NaN is not counted
    assert counts[0] == 2  # 0 and 1e-20 fall below the first edge
    assert counts[-1] == 2  # 1e10 and inf lie above the last edge
    for v in (1e-3, 2e-3, 1.0):
        i = np.searchsorted(edges, np.log10(v), side="right") - 1
        assert counts[i] >= 1


def test_clip_fraction_per_epoch():
    clipping = ["record.step_probes=[clip_stats]", "record.epoch_probes=[evaluation]"]
    always = run_to_end(compose_cfg(*TINY, *clipping, "optim=sgd", "clip=value",
                                    "clip.max=1e-9"))
    never = run_to_end(compose_cfg(*TINY, *clipping, "optim=sgd"))
    np.testing.assert_array_equal(always.epoch_stats["clip_frac"][0, 1:], 1.0)
    np.testing.assert_array_equal(never.epoch_stats["clip_frac"][0, 1:], 0.0)
    assert np.isnan(always.epoch_stats["clip_frac"][0, 0])  # no step before epoch 1
    np.testing.assert_array_equal(always.step_stats["clip_fired"], 1.0)


def test_full_snapshots_are_the_steps_gradients():
    cfg = compose_cfg(*TINY, "seeds=2", "record.full_grads_every=3", "record.chunk_epochs=1",
                      "record.step_probes=[kernel_grad_stats]", "record.epoch_probes=[]")
    scan, python = run_to_end(cfg, "scan"), run_to_end(cfg, "python")
    steps_per_epoch = 128 // 32
    np.testing.assert_array_equal(scan.snapshot_step, np.arange(0, 2 * steps_per_epoch, 3))
    assert set(scan.snapshots) == {f"dense_{i}.{p}" for i in range(5) for p in ("kernel", "bias")}
    for key, value in scan.snapshots.items():
        assert value.shape[:2] == (2, len(scan.snapshot_step))
        np.testing.assert_array_equal(value, python.snapshots[key])
    # The snapshot is the gradient the statistics were computed from.
    rows = np.searchsorted(scan.step, scan.snapshot_step)
    for layer in range(5):
        kernel = scan.snapshots[f"dense_{layer}.kernel"]
        norms = np.sqrt((kernel.astype(np.float64) ** 2).sum(axis=(2, 3)))
        np.testing.assert_allclose(norms, scan.step_stats["grad_norm"][:, rows, layer], rtol=1e-5)


def test_nonfinite_counts_say_where_the_explosion_started():
    from conftest import DIVERGENT_CLI

    rec = run_to_end(compose_cfg(*DIVERGENT_CLI))
    counts = rec.nonfinite_at_divergence[0]
    assert counts.shape == (11,) and counts.sum() > 0
    summary = store.seed_summaries(rec)[0]
    assert summary["nonfinite_grads_at_divergence"]["dense_10"] == int(counts[-1])


def test_tensorboard_events_are_written_and_readable(cli, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code, _, err = cli(*TINY, "seeds=2", "tensorboard=true", f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    for seed in (0, 1):
        events = EventAccumulator(str(tb.seed_dirs(tmp_path)[seed]),
                                  size_guidance={"scalars": 0, "histograms": 0})
        events.Reload()
        tags = events.Tags()
        assert {"loss", "grad_norm/dense_0", "delta_norm/dense_4", "train/acc"} <= set(
            tags["scalars"])
        assert {"grad_hist/dense_0", "weight_hist/dense_4"} <= set(tags["histograms"])
        loss = [e.value for e in events.Scalars("loss")]
        expected = store.read_metrics(tmp_path)["loss"][seed]
        np.testing.assert_allclose(loss, expected, rtol=1e-6)
        hist = events.Histograms("weight_hist/dense_1")
        assert len(hist) == 3  # initialisation and two epochs
        assert hist[0].histogram_value.num == 25  # a 5x5 kernel


def test_tensorboard_exports_what_the_chosen_probes_recorded(cli, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code, _, err = cli(*TINY, "tensorboard=true", "record.step_probes=[kernel_grad_stats]",
                       "record.epoch_probes=[]", f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    events = EventAccumulator(str(tb.seed_dirs(tmp_path)[0]))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"grad_std/dense_0", "grad_norm/dense_4", "train/acc"} <= scalars
    assert not {"loss", "grad_global_norm", "delta_norm/dense_0"} & scalars
    assert not events.Tags()["histograms"]
