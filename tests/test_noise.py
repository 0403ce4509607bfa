"""Per-example gradient statistics (``vgrad.noise``, the ``gradient_noise`` probe) against
per-example gradients from ``jax.vmap(jax.grad)`` reduced in float64 numpy, on an MLP
(unrolled and scanned), a residual MLP and recurrent nets; the skip under batch norm and
on convolutions; the probe in a trained run."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compose_cfg, run_to_end

from vgrad import data, losses, models, noise, optim
from vgrad.program import _no_per_example_grads
from vgrad.step import init_state, make_loss_fn, make_train_step, perturbation_zeros


def _node(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def tapped_step(cfg, x: np.ndarray, y: np.ndarray):
    """One training step with taps: (layout, state before it, StepOut, net)."""
    ds = data.load(cfg.data)
    net = models.build(cfg, losses.out_dim(cfg.loss.value, ds.n_classes))
    layout = models.layout(cfg, ds.n_features)
    tx = optim.make(cfg.clip, cfg.optim, n_train=100, total_steps=10)
    state = init_state(net, tx, jax.random.key(0), jnp.asarray(x), len(layout.names))
    step = jax.jit(make_train_step(net, tx, cfg.loss.value, layout, with_taps=True))
    _, out = step(state, jnp.asarray(x), jnp.asarray(y), jax.random.key(1))
    return layout, state, out, net


def per_example_grads(net, cfg, params, x, y) -> dict:
    """Each example's gradient of its own loss, [B, ...] per parameter (vmap of grad)."""
    loss_fn = make_loss_fn(net, cfg.loss.value)
    zeros = perturbation_zeros(net)(jnp.asarray(x[:1]))

    def one(xi, yi):
        return jax.grad(lambda p: loss_fn(p, zeros, {}, xi[None], yi[None],
                                          jax.random.key(1))[0])(params)

    return jax.vmap(one)(jnp.asarray(x), jnp.asarray(y))


def reference(layout, grads) -> dict[str, np.ndarray]:
    """The probe's arrays from per-example gradients, straight from their definitions;
    the GSNR's mean leaves out the parameters whose gradient is zero to rounding, judged
    within each Dense call (its kernel and bias), as the probe does."""
    rows, kept = {}, {}  # layer -> [B, P] float64, and [P] counted in the GSNR
    for seg in layout.segments:
        for i, name in enumerate(seg.names):
            parts, masks = [], []
            for path in seg.dense:
                node = _node(grads, path)
                call = []
                for leaf in ("kernel", "bias"):
                    if leaf in node:
                        v = np.asarray(node[leaf], np.float64)
                        v = v[:, i] if seg.stacked else v
                        call.append(v.reshape(v.shape[0], -1))
                ms = np.concatenate(call, axis=1) ** 2
                ms = ms.mean(0)
                eps = np.finfo(np.asarray(node["kernel"]).dtype).eps
                parts += call
                masks.append(ms > (noise.VARIANCE_FLOOR * eps) ** 2 * ms.max())
            rows[name] = np.concatenate(parts, axis=1)
            kept[name] = np.concatenate(masks)
    rows["_net"] = np.concatenate([rows[n] for n in layout.names], axis=1)
    kept["_net"] = np.concatenate([kept[n] for n in layout.names])

    def stats(g: np.ndarray, counted: np.ndarray) -> dict[str, float]:
        b = g.shape[0]
        mean = g.mean(0)
        norms = np.linalg.norm(g, axis=1)
        g2 = mean @ mean
        dots = g @ mean
        trace = np.sum((g - mean) ** 2) / (b - 1)
        var = ((g - mean) ** 2).mean(0)
        perp = g - np.outer(dots / g2, mean)
        return {"pe_norm_mean": norms.mean(),
                "pe_norm_q": np.quantile(norms, noise.QUANTILES.astype(np.float64)),
                "gsnr": np.mean(mean[counted] ** 2 / var[counted]),
                "noise_trace": trace, "noise_grad_sq": g2 - trace / b,
                "noise_scale": trace / (g2 - trace / b),
                "norm_test": np.sqrt(trace / (b * g2)),
                "inner_test": np.sqrt(np.sum((dots - g2) ** 2) / (b - 1) / (b * g2 ** 2)),
                "ortho_test": np.sqrt(np.sum(perp ** 2) / (b - 1) / (b * g2))}

    per = {n: stats(rows[n], kept[n]) for n in layout.names}
    out = {k: np.stack([per[n][k] for n in layout.names]) for k in per[layout.names[0]]}
    out.update({f"{k}_net": v for k, v in stats(rows["_net"], kept["_net"]).items()})
    return out


def check(overrides: list[str], x: np.ndarray, y: np.ndarray, rtol: float = 1e-5) -> dict:
    cfg = compose_cfg(*overrides)
    x = x.astype(cfg.dtype)
    y = y.astype(cfg.dtype) if y.dtype.kind == "f" else y
    with jax.enable_x64(cfg.dtype == "float64"):  # (as the loop runs a float64 config)
        layout, state, out, net = tapped_step(cfg, x, y)
        got = {k: np.asarray(v, np.float64)
               for k, v in noise.gradient_noise(layout, out.taps, out.grads).items()}
        want = reference(layout, per_example_grads(net, cfg, state.params, x, y))
    assert out.loss.dtype == cfg.dtype
    assert set(got) == set(want) == set(noise.outputs())
    for k in want:
        assert got[k].shape == want[k].shape, k
        if cfg.dtype == "float32" and k.startswith(("noise_grad_sq", "noise_scale")):
            # ||G||^2 - tr(S)/B cancels: in float32 it holds to the rounding of tr(S)
            # (and its ratio B_simple, near a zero of the denominator, not even that)
            if k.startswith("noise_grad_sq"):
                trace = want[k.replace("grad_sq", "trace")]
                np.testing.assert_allclose(got[k], want[k], atol=1e-5 * np.max(trace))
            continue
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, err_msg=k)
    assert np.isfinite(got["gsnr"]).all()
    return got


def _digits(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    ds = data.load(compose_cfg("dtype=float64").data)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(ds.x_train), batch, replace=False)
    return ds.x_train[idx], ds.y_train[idx]


def test_mlp_against_per_example_gradients():
    x, y = _digits(16)
    got = check(["dtype=float64", "depth=3", "width=7", "act=tanh"], x, y)
    # Noise dominates a 16-example batch of a fresh net: many examples' worth of noise.
    assert (got["noise_scale"] > 1).all()


def test_scanned_mlp_and_float32():
    """Layers 1 ... 8 run as one scan (stacked taps); float32 within 1e-4 of float64."""
    x, y = _digits(12, seed=1)
    check(["dtype=float64", "depth=9", "width=6", "act=tanh"], x, y)
    check(["depth=9", "width=6", "act=tanh"], x, y,
          rtol=1e-4)


def test_residual_mlp_two_dense_per_block():
    x, y = _digits(10, seed=2)
    check(["dtype=float64", "model=resmlp", "model.block_dense=2", "depth=3", "width=6"], x, y)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_recurrent_nets_sum_over_time(cell):
    """A recurrent kernel's per-example gradient sums over the time steps."""
    cfg = compose_cfg("data=adding", "data.length=6", "loss=regression", "depth=2",
                      "width=4", f"model={cell}", "dtype=float64")
    ds = data.load(cfg.data)
    check(["data=adding", "data.length=6", "loss=regression", "depth=2", "width=4",
           f"model={cell}", "dtype=float64"], ds.x_train[:8], ds.y_train[:8])


@pytest.mark.parametrize("conv", [["depth=3", "width=3"],
                                  ["depth=2", "width=3", "model.stride=2", "model.kernel_size=2",
                                   "model.pool=avg"],
                                  ["depth=2", "width=3", "model.padding=CIRCULAR",
                                   "init=delta_orthogonal"]])
def test_convolutions_through_their_patches(conv):
    """A CNN's per-example kernel gradients are sum_p patch_p^T d_p (the patches of
    lax.conv_general_dilated_patches, the kernel read channel-major): every array equals
    the vmap(grad) reference; scanned, strided, pooled and circular convolutions too."""
    ds = data.load(compose_cfg("data=digits").data)
    x, y = ds.x_train[:8], ds.y_train[:8]
    check(["dtype=float64", "model=cnn", "data=digits", "loss=ce", "act=tanh", *conv], x, y)


@pytest.mark.parametrize("model", [["model=transformer", "model.norm_position=pre"],
                                   ["model=transformer", "model.norm_position=post"],
                                   ["model=lstm"]])
def test_attention_projections_and_a_readout_at_every_step(model):
    """A Transformer's attention projections (DenseGeneral: [width] -> [heads, head_dim]
    and back, read as the Dense of their flattened axes) and the copy task's per-step
    loss, whose readout is a Dense at every step: every array equals the reference."""
    overrides = ["data=copy", "data.length=3", "data.n_train=16", "data.n_test=0",
                 "loss=ce", "depth=2", "width=4", "act=tanh", "dtype=float64", *model]
    ds = data.load(compose_cfg(*overrides).data)
    check(overrides, ds.x_train[:6], ds.y_train[:6])


def test_batch_norm_and_grouped_convolutions_are_skipped_with_a_reason():
    cfg = compose_cfg("bn=pre", "depth=2", "width=4")
    net = models.build(cfg, 10)
    why = _no_per_example_grads(net, models.layout(cfg), 8, 64, jnp.float32)
    assert "batch norm" in why
    cfg = compose_cfg("model=cnn", "depth=2", "width=4", "data=digits")
    net = models.build(cfg, 10)
    assert _no_per_example_grads(net, models.layout(cfg, 64), 8, 64, jnp.float32) is None
    cfg = compose_cfg("depth=2", "width=4")
    assert _no_per_example_grads(models.build(cfg, 10), models.layout(cfg), 8, 64,
                              jnp.float32) is None


def test_probe_in_a_run_and_note_under_batch_norm(tmp_path):
    """The probe's arrays come out of a trained run with their declared shapes; a run
    under batch norm leaves it out and says why in summary.json."""
    from vgrad import store

    cfg = compose_cfg("depth=2", "width=4", "epochs=1", "seeds=2", "data.n_samples=200",
                      "record.step_probes=[global_norms,delta_norm,gradient_noise]")
    rec = run_to_end(cfg)
    layers = len(rec.layer_names)
    steps = len(rec.step)
    assert rec.step_stats["gsnr"].shape == (2, steps, layers)
    assert rec.step_stats["pe_norm_q"].shape == (2, steps, layers, noise.QUANTILES.size)
    assert rec.step_stats["noise_scale_net"].shape == (2, steps)
    q = rec.step_stats["pe_norm_q"]
    assert (np.diff(q, axis=-1) >= 0).all()  # quantiles in order
    assert np.isfinite(rec.step_stats["gsnr_net"]).all()

    bn = compose_cfg("depth=2", "width=4", "epochs=1", "seeds=1", "data.n_samples=200",
                     "bn=pre", "record.step_probes=[global_norms,gradient_noise]")
    rec = run_to_end(bn)
    assert "gsnr" not in rec.step_stats
    summary = store.make_summary(rec, {}, "done", {})
    assert any("gradient_noise not recorded: batch norm" in n for n in summary["notes"])
    json.dumps(summary)


@pytest.fixture(scope="module")
def noise_sweep(tmp_path_factory):
    """A real multirun with the probe and the Hessian: 2 activations x 2 depths x 2 seeds."""
    from conftest import cli_main

    out = tmp_path_factory.mktemp("noise_sweep")
    assert cli_main("-m", "act=sigmoid,relu", "depth=1,3", "seeds=2", "epochs=2",
                    "data.n_samples=64", "batch_size=16", "progress=false",
                    "record.step_probes=[global_norms,delta_norm,gradient_noise]",
                    "record.epoch_probes=[evaluation,hessian]", "record.probe_size=32",
                    f"hydra.sweep.dir={out}") == 0
    return out


def test_the_run_figure_draws_the_heatmaps_and_the_whole_nets_lines(noise_sweep):
    import matplotlib.pyplot as plt

    from vgrad.analysis import figures, load_sweep

    sweep = load_sweep(noise_sweep)
    run = next(r for r in sweep.runs_list if r.config["depth"] == 3)
    fig = figures.gradient_noise(run, ["act", "depth"])
    panels = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    assert len(panels) == 5  # delta, GSNR, spread heatmaps; B_simple; the tests
    assert [len(a.get_images()) for a in panels[:3]] == [1, 1, 1]
    image = panels[1].get_images()[0].get_array()
    assert image.shape == (4, len(run.metrics["step"]))  # layers x recorded steps
    gsnr = np.nanmedian(run.metrics["gsnr"], axis=0).T
    np.testing.assert_allclose(image, np.log10(gsnr), rtol=1e-6)
    labels = [line.get_label() for line in panels[4].get_lines()]
    assert {"norm test θ", "inner-product test θ", "orthogonality test ν"} <= set(labels)
    assert figures.gradient_noise(load_sweep(noise_sweep).runs_list[0]) is not None
    plt.close("all")


def test_the_sweep_figure_puts_noise_and_sharpness_against_an_axis(noise_sweep):
    import matplotlib.pyplot as plt

    from vgrad.analysis import figures, load_sweep

    sweep = load_sweep(noise_sweep)
    fig = figures.noise_and_sharpness(sweep, "depth")
    panels = [a for a in fig.axes if a.get_title()]
    assert [a.get_title().split(" ")[0] for a in panels] == ["Gradient", "Gradient",
                                                             "Sharpness"]
    # One line per activation and time (initialisation, late), at depth 1 and 3.
    lines = [line for line in panels[2].get_lines() if line.get_linestyle() != "None"]
    assert len(lines) == 4
    # The sharpness at initialisation of act=sigmoid: the median over its seeds at
    # epoch 0 of the depth-1 run.
    run = next(r for r in sweep.runs_list
               if r.config["depth"] == 1 and r.config["act"]["name"] == "sigmoid")
    first = next(line for line in lines if line.get_color() == lines[0].get_color()
                 and line.get_linestyle() == "-")
    np.testing.assert_allclose(first.get_ydata()[0], np.median(run.metrics["hess_max"][:, 0]),
                               rtol=1e-6)
    names = [name for name, _, f in figures.sweep_figures(sweep) if not plt.close(f)]
    assert "noise_and_sharpness" in names
    plt.close("all")


def _cockpit_alpha(t, fs, dfs, var_fs, var_dfs) -> float:
    """Cockpit's ``_fit_quadratic`` and ``_get_alpha``, in numpy (float64)."""
    phi = np.array([[1, 0, 0], [1, t, t ** 2], [0, 1, 0], [0, 1, 2 * t]]).T
    var = [v if v != 0 else 1e-10 for v in list(var_fs) + list(var_dfs)]
    lam = np.linalg.inv(np.diag(var))
    mu = np.linalg.inv(phi @ lam @ phi.T) @ phi @ lam @ np.array(list(fs) + list(dfs))
    return -1.0 if mu[2] < 0 else 2 * t / (-mu[1] / mu[2]) - 1


@pytest.mark.parametrize("lr", [0.05, 2.0])
def test_alpha_is_cockpits_fit_of_two_noisy_ends(lr):
    """Two SGD steps on two batches: alpha at the second step is Cockpit's quadratic fit
    of the first step, from per-example losses and gradients (vmap of grad) at both ends;
    NaN at the first step."""
    cfg = compose_cfg("dtype=float64", "depth=2", "width=6", "act=tanh", "optim=sgd",
                      f"optim.lr={lr}", "clip=none")
    ds = data.load(cfg.data)
    x, y = ds.x_train[:32].astype(np.float64), ds.y_train[:32]
    with jax.enable_x64(True):
        net = models.build(cfg, 1)
        layout = models.layout(cfg)
        tx = optim.make(cfg.clip, cfg.optim, n_train=100, total_steps=10)
        state = init_state(net, tx, jax.random.key(0), jnp.asarray(x[:16]),
                           len(layout.names), with_alpha=True)
        step = jax.jit(make_train_step(net, tx, cfg.loss.value, layout, with_alpha=True))
        mid, first = step(state, jnp.asarray(x[:16]), jnp.asarray(y[:16]), jax.random.key(1))
        _, second = step(mid, jnp.asarray(x[16:]), jnp.asarray(y[16:]), jax.random.key(1))
        loss_fn = make_loss_fn(net, cfg.loss.value, mean=False)
        zeros = perturbation_zeros(net)(jnp.asarray(x[:16]))

        def observe(params, xb, yb):
            losses = np.asarray(loss_fn(params, zeros, {}, xb, yb, jax.random.key(1))[0])
            grads = per_example_grads(net, cfg, params, np.asarray(xb), np.asarray(yb))
            flat = np.concatenate([np.asarray(g, np.float64).reshape(16, -1)
                                   for g in jax.tree.leaves(grads)], axis=1)
            return losses, flat

    assert np.isnan(first.alpha)
    d = np.concatenate([np.ravel(np.asarray(u, np.float64))
                        for u in jax.tree.leaves(first.updates)])
    t = np.linalg.norm(d)
    ends = [observe(state.params, x[:16], y[:16]), observe(mid.params, x[16:], y[16:])]
    fs = [losses.mean() for losses, _ in ends]
    var_fs = [losses.var(ddof=1) for losses, _ in ends]
    slopes = [g @ d / t for _, g in ends]
    want = _cockpit_alpha(t, fs, [s.mean() for s in slopes], var_fs,
                          [s.var(ddof=1) for s in slopes])
    np.testing.assert_allclose(float(second.alpha), want, rtol=1e-6)
    # A tiny step barely leaves the start (alpha near -1); a 40x larger one goes most of
    # the way to the fitted minimum (measured: -0.9994 and -0.114).
    assert (want < -0.99) == (lr < 0.1) and want < 0


def test_a_diverged_seed_is_data_and_the_others_go_on():
    """The divergent deep linear net (diverges at step 2) beside seeds of a smaller step
    in one group: the per-example statistics are NaN after the divergence, finite before
    it, and the other job's are finite throughout; alpha too."""
    from conftest import DIVERGENT_CLI, run_group

    probes = "record.step_probes=[global_norms,gradient_noise,alpha]"
    bad, good = run_group([compose_cfg(*DIVERGENT_CLI, probes),
                           compose_cfg(*DIVERGENT_CLI, probes, "optim.lr=0.001")])
    step = int(bad.diverged_at[0])
    assert step == 2 and (good.diverged_at == -1).all()
    for key in ("gsnr_net", "noise_scale_net", "pe_norm_mean_net"):
        assert np.isfinite(bad.step_stats[key][0, :step]).all(), key
        assert np.isnan(bad.step_stats[key][0, step + 1:]).all(), key
        assert np.isfinite(good.step_stats[key]).all(), key
    assert np.isnan(good.step_stats["alpha"][0, 0])  # (no step before the first)
    assert np.isfinite(good.step_stats["alpha"][0, 1:]).all()
