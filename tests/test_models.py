"""The model registry and the residual MLP: every model trains and writes arrays with
their declared axes; the residual net without skips is the MLP; ReZero, Fixup and the
forward-signal instruments against what they must be."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pytest
from conftest import TINY, compose_cfg, run_to_end, step_once

from vgrad import models, probes, store
from vgrad.analysis import figures, load_run
from vgrad.config import validate
from vgrad.errors import ConfigError
from vgrad.layers import flat_params

#: (``model=custom`` needs a user's module: tests/test_custom_model.py trains one.)
MODEL_NAMES = sorted(set(models.MODELS) - {"custom"})
#: Recurrent models read sequences: a short adding problem (T = 6).
SEQUENCE = ["data=adding", "loss=regression", "data.length=6", "data.n_train=64",
            "data.n_test=16", "epochs=2", "progress=false", "act=tanh"]
#: The CNN reads images: digits (8 x 8).
IMAGES = ["data=digits", "loss=ce", "data.n_train=64", "epochs=2",
          "batch_size=16", "progress=false"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_trains_and_writes_arrays_with_their_declared_axes(cli, tmp_path, name):
    run = tmp_path / name
    recurrent = name in ("rnn", "lstm", "gru")
    data = (SEQUENCE if recurrent or name == "transformer" else IMAGES if name == "cnn"
            else TINY)
    code, _, err = cli(f"model={name}", "depth=3", "width=4", *data,
                       f"hydra.run.dir={run}",
                       "record.step_probes=[global_norms,kernel_grad_stats,bias_grad_norm,"
                       "delta_norm,update_stats,clip_stats,time_delta_norm,"
                       "recurrent_grad_norms,gradient_noise]",
                       "record.epoch_probes=[evaluation,weight_stats,activation_stats,"
                       "probe_bias_grad_norm,histograms,forward_signal,residual_signal,"
                       "recurrent_spectrum,attention_entropy]")
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    metrics = store.read_metrics(run)
    layers = summary["layers"]
    sizes = {"seed": 1, "step": len(metrics["step"]), "epoch": 3, "layer": len(layers),
             "hidden": len(layers) - 1, "bin": probes.HIST_EDGES.size - 1,
             "edge": probes.HIST_EDGES.size, "block": 3, "recurrent": 3, "time": 6,
             "quantile": 5, "attention": 3, "head": 4}
    assert ("time_delta_norm" in metrics) == recurrent
    assert ("rec_radius" in metrics) == recurrent
    assert ("attn_entropy" in metrics) == (name == "transformer")
    assert set(summary["arrays"]) == set(metrics)
    for key, axes in summary["arrays"].items():
        assert metrics[key].shape == tuple(sizes[a] for a in axes), key
    assert {"signal_q", "signal_c", "delta_norm", "grad_norm"} <= set(metrics)
    assert np.isfinite(metrics["delta_norm"]).all()
    assert summary["status"] == "completed"
    assert "gsnr" in metrics  # (per-example: every model)
    assert all(n.startswith("activation statistics") for n in summary["notes"])
    assert bool(summary["notes"]) == (name == "transformer")  # (act once per block)
    # Every run figure draws, the signal figure with a block panel for residual nets.
    run_ = load_run(run)
    for kind, make in figures.RUN_FIGURES.items():
        drawn = ((kind != "time" or recurrent) and kind != "curvature"  # (hessian: opt-in)
                 and (kind != "attention" or name == "transformer")
                 and (kind != "saturation" or name != "transformer"))  # (act per block)
        assert (make(run_) is not None) == drawn, kind
    fig = figures.signal(run_)
    assert len(fig.axes) == (3 if "branch_var" in metrics else 2)
    if name != "mlp":
        assert f"model={name}" in figures.theory_prediction(run_)
    plt.close("all")


def test_model_keys_are_checked_with_one_line_naming_key_and_value():
    for overrides, key in [(["model.norm=group"], "model.norm"),
                           (["model.alpha=half"], "model.alpha"),
                           (["model.block_dense=3"], "model.block_dense"),
                           (["bn=pre"], "bn"), (["widths=[4,4,4,4]"], "widths"),
                           (["act=maxout"], "act")]:
        with pytest.raises(ConfigError, match=key):
            validate(compose_cfg("model=resmlp", *overrides))


def _mlp_params_from_resmlp(params, depth):
    """The residual net's parameters renamed as the MLP's (proj, blocks, out)."""
    out = {"dense_0": params["proj"], f"dense_{depth + 1}": params["out"]}
    for k in range(depth):
        out[f"dense_{k + 1}"] = jax.tree.map(lambda a, k=k: a[k], params["blocks"]["dense_0"])
    return out


def test_residual_net_without_skips_is_the_mlp_of_the_same_shape():
    depth, common = 3, ("act=tanh", "init=glorot_normal", "optim=sgd", "optim.lr=0.1")
    res_layout, res_state, _, res_out, x, y = step_once(
        "model=resmlp", "model.skip=false", f"depth={depth}", *common)
    mlp_cfg = compose_cfg("depth=4", "width=3", *common)
    net = models.build(mlp_cfg, 1)
    params = _mlp_params_from_resmlp(res_state.params, depth)

    def loss(p):
        logits = net.apply({"params": p}, jnp.asarray(x))[:, 0]
        return jnp.mean(jnp.logaddexp(0, logits) - y * logits)

    value, grads = jax.value_and_grad(loss)(params)
    np.testing.assert_allclose(res_out.loss, value, rtol=1e-6)
    np.testing.assert_allclose(grads["dense_2"]["kernel"],
                               res_out.grads["blocks"]["dense_0"]["kernel"][1], rtol=1e-5)
    np.testing.assert_allclose(grads["dense_0"]["kernel"], res_out.grads["proj"]["kernel"],
                               rtol=1e-5)
    # Per-layer statistics line up layer for layer with the MLP's.
    mlp_layout, mlp_state, _, mlp_out, _, _ = step_once("depth=4", *common)
    assert len(res_layout.names) == len(mlp_layout.names) == depth + 2
    got = probes.kernel_grad_stats(res_out, res_layout)["grad_norm"]
    want = [np.linalg.norm(grads[f"dense_{i}"]["kernel"]) for i in range(depth + 2)]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def _init(*overrides, depth=4, width=16, n=32):
    cfg = compose_cfg("model=resmlp", f"depth={depth}", f"width={width}", *overrides)
    net = models.build(cfg, 1)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(n, 2)), jnp.float32)
    variables = net.init({"params": jax.random.key(0), "noise": jax.random.key(0)}, x)
    return net, variables, x


def test_rezero_starts_as_projection_then_output_layer():
    net, variables, x = _init("model.alpha=rezero", "act=tanh")
    p = variables["params"]
    np.testing.assert_array_equal(p["blocks"]["alpha"], np.zeros(4))
    h = x @ p["proj"]["kernel"] + p["proj"]["bias"]
    expected = np.tanh(h) @ p["out"]["kernel"] + p["out"]["bias"]
    np.testing.assert_allclose(net.apply(variables, x), expected, rtol=1e-5, atol=1e-6)


def test_fixup_zeroes_each_branch_output_and_scales_the_other_dense():
    net, variables, x = _init("model.alpha=fixup", "model.block_dense=2", "act=relu",
                              "init=he_normal", depth=9, width=64)
    _, sown = net.apply(variables, x, capture=True, mutable=["intermediates"])
    branch = sown["intermediates"]["blocks"]["branch"][0]
    np.testing.assert_array_equal(branch, np.zeros_like(branch))
    kernels = variables["params"]["blocks"]
    np.testing.assert_array_equal(kernels["dense_1"]["kernel"], 0.0)
    # m = 2 Dense per branch: the first is He-initialised and scaled by depth^(-1/2).
    std = float(np.std(kernels["dense_0"]["kernel"]))
    np.testing.assert_allclose(std, np.sqrt(2 / 64) / 3, rtol=0.05)


def test_inv_sqrt_depth_and_skipinit_scale_the_branch():
    for overrides, alpha in [(("model.alpha=inv_sqrt_depth",), 0.5),
                             (("model.alpha=skipinit", "model.alpha_init=0.3"), 0.3)]:
        net, variables, x = _init(*overrides, "act=tanh")
        one, v1, _ = _init("act=tanh")
        _, a = net.apply(variables, x, capture=True, mutable=["intermediates"])
        _, b = one.apply(v1, x, capture=True, mutable=["intermediates"])
        first = (a["intermediates"]["blocks"]["branch"][0][0],
                 b["intermediates"]["blocks"]["branch"][0][0])
        np.testing.assert_allclose(first[0], alpha * first[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_norms_normalise_before_each_activation(norm):
    net, variables, x = _init(f"model.norm={norm}", "act=linear", "bn_eps=1e-9")
    _, sown = net.apply(variables, x, train=True, capture=True,
                        mutable=["intermediates", "batch_stats"])
    a = np.asarray(sown["intermediates"]["blocks"]["activation"][0])  # [D, n, width]
    axis = 1 if norm == "batch" else 2  # over the batch, or over the units
    np.testing.assert_allclose(a.mean(axis=axis), 0.0, atol=1e-4)
    np.testing.assert_allclose(a.var(axis=axis), 1.0, rtol=1e-2)


def numpy_signal(z, examples=probes.CORR_EXAMPLES):
    """q = mean z^2; c = mean pairwise cosine among the first ``examples`` rows."""
    z = np.asarray(z, np.float64)
    u = z[:examples] / np.linalg.norm(z[:examples], axis=1, keepdims=True)
    gram = u @ u.T
    e = len(u)
    return (z**2).mean(), (gram.sum() - np.trace(gram)) / (e * (e - 1))


@pytest.mark.parametrize("overrides", [("depth=2", "width=5"), ("depth=10", "width=6"),
                                       ("model=resmlp", "depth=3", "width=5")])
def test_forward_signal_matches_numpy_on_the_probe_batch(overrides):
    cfg = compose_cfg(*overrides, "act=tanh", "init=glorot_normal", "bias_init=normal",
                      "bias_init.std=0.3", *TINY)
    net, layout = models.build(cfg, 1), models.layout(cfg)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(100, 2)), jnp.float32)
    variables = net.init({"params": jax.random.key(3), "noise": jax.random.key(3)}, x)
    _, sown = net.apply(variables, x, capture=True, mutable=["intermediates"])
    signals = layout.signals(sown["intermediates"])
    view = probes.EpochView(variables["params"], *[jnp.nan] * 4, [], [], [], None, 0.1,
                            signals=signals)
    stats = probes.forward_signal(view, layout)
    # The numpy forward pass of every layer's delta point.
    p = jax.tree.map(np.asarray, variables["params"])
    zs = []
    if "model=resmlp" in overrides:
        h = x @ p["proj"]["kernel"] + p["proj"]["bias"]
        zs.append(h)
        for k in range(3):
            blk = jax.tree.map(lambda a, k=k: a[k], p["blocks"]["dense_0"])
            h = h + np.tanh(h) @ blk["kernel"] + blk["bias"]
            zs.append(h)
        zs.append(np.tanh(h) @ p["out"]["kernel"] + p["out"]["bias"])
    else:
        fp = jax.tree.map(np.asarray, flat_params(layout, variables["params"]))
        a = np.asarray(x)
        for i in range(len(layout.names)):
            z = a @ fp[f"dense_{i}.kernel"] + fp[f"dense_{i}.bias"]
            zs.append(z)
            a = np.tanh(z)
    assert len(zs) == len(layout.names)
    for layer, z in enumerate(zs):
        q, c = numpy_signal(z)
        np.testing.assert_allclose(stats["signal_q"][layer], q, rtol=1e-4, err_msg=str(layer))
        np.testing.assert_allclose(stats["signal_c"][layer], c, rtol=1e-3, atol=1e-5,
                                   err_msg=str(layer))


def test_branch_and_skip_variances_match_numpy_and_add_up():
    net, variables, x = _init("act=relu", "init=he_normal", depth=6, width=512, n=256)
    layout = models.layout(compose_cfg("model=resmlp", "depth=6"))
    _, sown = net.apply(variables, x, capture=True, mutable=["intermediates"])
    inter = sown["intermediates"]
    branches, skips = layout.block_values(inter)
    view = probes.EpochView(variables["params"], *[jnp.nan] * 4, [], [], [], None, 0.1,
                            branches=branches, skips=skips)
    stats = probes.residual_signal(view, layout)
    b, s = np.asarray(branches, np.float64), np.asarray(skips, np.float64)
    np.testing.assert_allclose(stats["branch_var"], b.var(axis=1).mean(axis=-1), rtol=1e-4)
    np.testing.assert_allclose(stats["skip_var"], s.var(axis=1).mean(axis=-1), rtol=1e-4)
    # At initialisation the branch is uncorrelated with the skip path: variances add.
    stream = np.asarray(inter["blocks"]["delta"][0], np.float64).var(axis=1).mean(axis=-1)
    np.testing.assert_allclose(stream, stats["branch_var"] + stats["skip_var"], rtol=0.05)


def test_residual_net_keeps_delta_where_the_plain_net_loses_it():
    """Sigmoid at depth 20: without skips the first layer's delta is orders of magnitude
    below the last block's; with them it stays within a small factor."""
    common = ("model=resmlp", "act=sigmoid", "init=glorot_normal", "depth=20", "width=16",
              "epochs=1", "data.n_samples=128", "progress=false")
    plain = run_to_end(compose_cfg(*common, "model.skip=false")).step_stats["delta_norm"]
    res = run_to_end(compose_cfg(*common)).step_stats["delta_norm"]
    assert plain[0, 0, 0] / plain[0, 0, -2] < 1e-3
    assert 0.2 < res[0, 0, 0] / res[0, 0, -2] < 5
