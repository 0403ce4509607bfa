"""Recurrent nets: dL/dh_t against a numpy backpropagation through time, the textbook
rho^(T-t) law of a linear RNN, IRNN's carried state, LSTM's forget bias, the recurrent
spectrum, the adding problem's data and baseline, and the configuration errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compose_cfg, run_to_end

from vgrad import data, models, optim, probes
from vgrad.config import validate, validate_data
from vgrad.errors import ConfigError
from vgrad.models.rnn import recurrent_kernel_init
from vgrad.step import init_state, make_train_step

ADDING = ["data=adding", "loss=regression", "depth=1", "optim=sgd", "optim.lr=0.01"]


def rnn_step(*overrides: str, batch: int = 6, x: np.ndarray | None = None):
    """One real training step of a recurrent net on adding-problem inputs: (layout,
    state before the step, StepOut, x, y)."""
    cfg = compose_cfg(*ADDING, *overrides)
    net = models.build(cfg, 1)
    layout = models.layout(cfg)
    tx = optim.make(cfg.clip, cfg.optim, n_train=100, total_steps=10)
    ds = data.load(cfg.data)
    if x is None:
        x = ds.x_train[:batch]
    y = ds.y_train[: len(x)]
    state = init_state(net, tx, jax.random.key(0), jnp.asarray(x), len(layout.names))
    step = jax.jit(make_train_step(net, tx, cfg.loss.value, layout))
    _, out = step(state, jnp.asarray(x), jnp.asarray(y), jax.random.key(1))
    return layout, state, out, np.asarray(x, np.float64), np.asarray(y, np.float64)


def numpy_bptt(params, x: np.ndarray, y: np.ndarray, steps: int) -> np.ndarray:
    """Per example n and step t, ||dl_n/dh_t|| of a one-layer tanh Elman RNN with a linear
    readout of h_T and squared error, by hand-written backpropagation through time."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    w_ih, b_ih = p["rnn_0"]["ih"]["kernel"], p["rnn_0"]["ih"]["bias"]
    w_hh, b_hh = p["rnn_0"]["cell"]["hh"]["kernel"], p["rnn_0"]["cell"]["hh"]["bias"]
    w_out, b_out = p["out"]["kernel"], p["out"]["bias"]
    seq = x.reshape(len(x), steps, -1)
    h = [np.zeros((len(x), w_hh.shape[0]))]
    for t in range(steps):
        h.append(np.tanh(seq[:, t] @ w_ih + b_ih + h[-1] @ w_hh + b_hh))
    out = h[-1] @ w_out + b_out
    grad_h = 2.0 * (out[:, 0] - y)[:, None] * w_out[:, 0][None, :]  # dl_n/dh_T
    norms = [np.linalg.norm(grad_h, axis=1)]
    for t in range(steps - 1, 0, -1):  # dl/dh_{t-1} = (dl/dh_t * (1 - h_t^2)) W_hh^T
        grad_h = (grad_h * (1.0 - h[t + 1] ** 2)) @ w_hh.T
        norms.append(np.linalg.norm(grad_h, axis=1))
    return np.stack(norms[::-1], axis=1)  # [n, T]


def test_time_delta_norm_matches_a_numpy_backpropagation_through_time():
    steps = 5
    layout, state, out, x, y = rnn_step("model=rnn", "act=tanh", f"data.length={steps}",
                                        "width=3", "model.recurrent_scale=1.3",
                                        "init=glorot_normal")
    measured = probes.time_delta_norm(out, layout)["time_delta_norm"]
    assert measured.shape == (1, steps)
    expected = numpy_bptt(state.params, x, y, steps).mean(axis=0)
    np.testing.assert_allclose(np.asarray(measured[0]), expected, rtol=2e-5)


@pytest.mark.parametrize("rho", [0.8, 1.25])
def test_a_linear_rnn_with_orthogonal_kernel_scales_its_gradient_as_rho_to_the_distance(rho):
    """dh_{t+1}/dh_t = rho Q^T for every example: ||dL/dh_t|| = rho^(T-t) ||dL/dh_T||."""
    steps = 12
    layout, _, out, *_ = rnn_step("model=rnn", "act=linear", f"data.length={steps}",
                                  "width=8", "model.recurrent_init=orthogonal",
                                  f"model.recurrent_scale={rho}")
    norms = np.asarray(probes.time_delta_norm(out, layout)["time_delta_norm"][0], np.float64)
    distance = steps - 1 - np.arange(steps)
    np.testing.assert_allclose(norms / norms[-1], rho ** distance, rtol=1e-4)


def test_irnn_carries_its_state_unchanged_through_zero_inputs():
    """ReLU, identity recurrent kernel, zero biases: after one input the state stays."""
    steps, width = 10, 6
    x = np.zeros((4, steps, 2), np.float32)
    x[:, 0] = np.random.default_rng(0).normal(size=(4, 2))
    cfg = compose_cfg(*ADDING, "model=rnn", "act=relu", "model.recurrent_init=identity",
                      f"data.length={steps}", f"width={width}", "init=he_normal")
    net = models.build(cfg, 1)
    flat = jnp.asarray(x.reshape(4, -1))
    variables = net.init({"params": jax.random.key(0)}, flat)
    _, sown = net.apply({"params": variables["params"]}, flat, capture=True,
                        mutable=["intermediates"])
    h = np.asarray(sown["intermediates"]["rnn_0"]["signal"][0]).reshape(4, steps, width)
    assert np.abs(h[:, 0]).max() > 0
    np.testing.assert_array_equal(h, np.broadcast_to(h[:, :1], h.shape))


def test_lstm_forget_gate_bias_starts_at_forget_bias_and_the_recurrent_blocks_are_orthogonal():
    cfg = compose_cfg(*ADDING, "model=lstm", "width=5", "model.forget_bias=1.5")
    net = models.build(cfg, 1)
    params = net.init({"params": jax.random.key(0)}, jnp.zeros((2, 100)))["params"]
    bias = np.asarray(params["rnn_0"]["ih"]["bias"])
    np.testing.assert_array_equal(bias, np.r_[np.zeros(5), np.full(5, 1.5), np.zeros(10)])
    hh = np.asarray(params["rnn_0"]["cell"]["hh"]["kernel"])
    assert hh.shape == (5, 20)
    for g in range(4):
        block = hh[:, 5 * g: 5 * (g + 1)]
        np.testing.assert_allclose(block @ block.T, np.eye(5), atol=1e-5)


@pytest.mark.parametrize("kind", ["orthogonal", "identity", "normal"])
def test_recurrent_spectrum_reports_the_kernels_radius_and_norm(kind):
    width, scale = 48, 0.9
    w = np.asarray(recurrent_kernel_init(kind, scale, 1)(jax.random.key(3), (width, width)))
    view = probes.EpochView(params={"rnn_0": {"cell": {"hh": {"kernel": jnp.asarray(w)}}}},
                            **dict.fromkeys(probes.EpochView._fields[1:]))
    layout = models.layout(compose_cfg(*ADDING, "model=rnn", f"width={width}"))
    stats = probes.recurrent_spectrum(view, layout)
    radius = np.abs(np.linalg.eigvals(w.astype(np.float64))).max()
    np.testing.assert_allclose(float(stats["rec_radius"][0]), radius, rtol=2e-3)
    # rtol 1e-4: on an H200 the float32 iteration landed 2e-5 from numpy's float64 norm.
    np.testing.assert_allclose(float(stats["rec_sv_max"][0]), np.linalg.norm(w, 2), rtol=1e-4)
    if kind != "normal":
        np.testing.assert_allclose(radius, scale, rtol=1e-5)
    else:  # the circular law: radius near the scale
        assert 0.7 * scale < radius < 1.3 * scale


def test_adding_problem_shapes_determinism_and_the_constant_baseline():
    cfg = compose_cfg("data=adding", "loss=regression", "data.length=30")
    ds = data.load(cfg.data)
    assert ds.x_train.shape == (10000, 60) and ds.x_test.shape == (1000, 60)
    assert ds.y_train.dtype == np.float32
    seq = ds.x_train.reshape(-1, 30, 2)
    markers = seq[..., 1]
    assert (markers.sum(axis=1) == 2).all()
    assert (markers[:, :15].sum(axis=1) == 1).all()  # one marker per half
    np.testing.assert_allclose((seq[..., 0] * markers).sum(axis=1), ds.y_train, rtol=1e-6)
    again = data.adding(cfg.data)
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    other = data.adding(compose_cfg("data=adding", "data.random_state=1").data)
    assert not np.array_equal(other.x_train, ds.x_train)
    # Predicting 1 scores Var(y) = 1/6; the standard error of the mean here is ~0.002.
    assert abs(np.mean((ds.y_train - 1.0) ** 2) - 1 / 6) < 0.01


def test_sequential_digits_train_row_by_row_and_pixel_by_pixel():
    for sequence, steps in (("rows", 8), ("pixels", 64)):
        cfg = compose_cfg("model=gru", "data=digits", "loss=ce", f"data.sequence={sequence}",
                          "depth=1", "width=8", "epochs=1", "progress=false",
                          "data.n_train=64", "record.step_probes=[global_norms,time_delta_norm]",
                          "record.epoch_probes=[evaluation]")
        assert data.sequence_shape(cfg.data) == (steps, 64 // steps)
        rec = run_to_end(cfg)
        assert rec.step_stats["time_delta_norm"].shape[-2:] == (1, steps)
        assert np.isfinite(rec.step_stats["time_delta_norm"]).all()


def test_recurrent_config_errors_name_the_key():
    for overrides, key in [(["model=rnn"], "data"),  # circles is not a sequence
                           (["model=lstm", "data=adding", "loss=regression", "bn=pre"], "bn"),
                           (["model=rnn", "data=adding", "loss=regression", "act=prelu"], "act"),
                           (["model=gru", "data=adding", "loss=regression",
                             "model.recurrent_init=eye"], "model.recurrent_init"),
                           (["model=rnn", "data=digits", "data.sequence=cols"],
                            "data.sequence")]:
        with pytest.raises(ConfigError, match=key):
            validate(compose_cfg(*overrides))
    cfg = compose_cfg("model=lstm", "data=adding")  # loss=bce on a real-valued target
    with pytest.raises(ConfigError, match="regression"):
        validate_data(cfg, 100, 1)
    with pytest.raises(ConfigError, match="regression"):
        validate_data(compose_cfg("loss=regression"), 100, 2)


def test_a_recurrent_sweep_gets_its_time_tables_and_time_profile(cli, tmp_path):
    from vgrad.analysis import figures, load_sweep, write_report

    code, _, err = cli("-m", "model=rnn", "act=tanh,relu", "data=adding", "loss=regression",
                       "data.length=5", "data.n_train=64", "data.n_test=16", "depth=1",
                       "width=4", "epochs=2", "seeds=2", "progress=false",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert code == 0, err
    sweep = load_sweep(tmp_path / "sweep")
    times = sweep.times()
    steps = len(sweep.runs_list[0].metrics["step"])
    assert len(times) == 2 * 2 * steps * 1 * 5
    assert sorted(times["t"].unique()) == [1, 2, 3, 4, 5]
    assert np.isfinite(times["time_delta_norm"]).all()
    epochs = sweep.epochs()
    assert epochs.loc[epochs["layer"] == "rnn_0", "rec_radius"].notna().all()
    assert epochs.loc[epochs["layer"] == "out", "rec_radius"].isna().all()
    fig = figures.time_profile(sweep, "act.name")
    assert all(len(ax.lines) == 2 for ax in fig.axes)  # one line per activation
    page = write_report(tmp_path / "sweep", tmp_path / "report", jobs=1).read_text()
    assert "Gradient through time by act" in page
    assert (tmp_path / "report" / "figures" / "run_000_time.png").is_file()


def test_recurrent_grad_norms_split_the_input_and_recurrent_kernels():
    layout, _, out, *_ = rnn_step("model=lstm", "data.length=4", "width=3")
    stats = probes.recurrent_grad_norms(out, layout)
    g = out.grads["rnn_0"]
    np.testing.assert_allclose(float(stats["grad_norm_ih"][0]),
                               np.linalg.norm(np.asarray(g["ih"]["kernel"])), rtol=1e-5)
    np.testing.assert_allclose(float(stats["grad_norm_hh"][0]),
                               np.linalg.norm(np.asarray(g["cell"]["hh"]["kernel"])), rtol=1e-5)
    pooled = probes.kernel_grad_stats(out, layout)["grad_norm"][0]
    np.testing.assert_allclose(float(pooled), float(np.hypot(stats["grad_norm_ih"][0],
                                                             stats["grad_norm_hh"][0])),
                               rtol=1e-5)


def test_recurrent_scale_and_forget_bias_are_knobs_of_one_program(compile_counter):
    """A sweep over model.recurrent_scale (3 values) and model.forget_bias (2) of an LSTM
    trains as one program, compiled once, and each job's numbers are those it has alone."""
    from conftest import run_group

    from vgrad import group

    base = [*ADDING, "model=lstm", "depth=1", "width=4", "data.length=5", "epochs=2",
            "data.n_train=64", "data.n_test=16", "record.probe_size=16", "progress=false"]
    cfgs = [compose_cfg(*base, f"model.recurrent_scale={s}", f"model.forget_bias={b}")
            for s, b in [(0.5, 1.0), (1.0, 1.0), (2.0, 0.0)]]
    assert len({json.dumps(group.structure(c), sort_keys=True) for c in cfgs}) == 1
    together = run_group(cfgs)
    assert compile_counter.compiles("chunk") == 1
    for cfg, rec in zip(cfgs, together, strict=True):
        alone = run_to_end(cfg)
        for k, v in alone.step_stats.items():
            np.testing.assert_allclose(rec.step_stats[k], v, rtol=2e-5, atol=1e-8, err_msg=k)
    # the knobs act: the recurrent kernel's spectral radius at initialisation is the scale
    radius = [rec.epoch_stats["rec_radius"][0, 0, 0] for rec in together]
    np.testing.assert_allclose(radius, [0.5, 1.0, 2.0], rtol=1e-4)
    # and the forget gate's input bias starts at forget_bias (bias_init: zeros)
    for rec, b in zip(together, [1.0, 1.0, 0.0], strict=True):
        ih = rec.params["initial.rnn_0.ih.bias"][0]  # [gates * units], gates i, f, g, o
        np.testing.assert_allclose(ih[4:8], b)
        np.testing.assert_allclose(ih[:4], 0.0)


def _reference_cell(cell: str, p_ih, p_hh):
    """PyTorch's equations, written again: (state, x_t) -> state (LSTM: (h, c))."""
    def step(state, x_t):
        h, c = state
        xw = x_t @ p_ih["kernel"] + p_ih["bias"]
        hh = h @ p_hh["kernel"] + p_hh["bias"]
        if cell == "rnn":
            return jnp.tanh(xw + hh), c
        if cell == "lstm":
            i, f, g, o = jnp.split(xw + hh, 4)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            return jax.nn.sigmoid(o) * jnp.tanh(c), c
        xr, xz, xn = jnp.split(xw, 3)
        hr, hz, hn = jnp.split(hh, 3)
        r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
        return (1 - z) * jnp.tanh(xn + r * hn) + z * h, c
    return step


def _top_sv(step, h, c, x_t, lstm: bool) -> float:
    """The largest singular value of d s_t / d s_{t-1} at (h, c) by jax.jacfwd."""
    u = h.shape[0]
    if lstm:
        jac = jax.jacfwd(lambda s: jnp.concatenate(step((s[:u], s[u:]), x_t)))(
            jnp.concatenate([h, c]))
    else:
        jac = jax.jacfwd(lambda s: step((s, c), x_t)[0])(h)
    return float(np.linalg.svd(np.asarray(jac), compute_uv=False)[0])


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_state_to_state_jacobians_match_jacfwd_of_an_independent_cell(cell):
    """rnn.state_jacobian_sv against jax.jacfwd of the cell written from its equations,
    along the same trajectory, two stacked layers (float64; rtol 1e-6); and (LSTM) the
    probe's arrays in a trained run."""
    from vgrad.models import rnn

    cfg = compose_cfg(*ADDING, f"model={cell}", "act=tanh", "depth=2", "width=3",
                      "data.length=5", "model.recurrent_scale=1.2", "dtype=float64",
                      "init=glorot_normal", "bias_init=normal", "bias_init.std=0.3")
    ds = data.load(cfg.data)
    x = np.asarray(ds.x_train[:4], np.float64)
    with jax.enable_x64(True):
        net = models.build(cfg, 1)
        params = net.init({"params": jax.random.key(3), "noise": jax.random.key(3)},
                          jnp.asarray(x))["params"]
        got = np.asarray(rnn.state_jacobian_sv(net, params, jnp.asarray(x)))
        want = np.zeros_like(got)
        inputs = jnp.asarray(x).reshape(4, 5, -1)
        for layer in range(2):
            p = params[f"rnn_{layer}"]
            step = _reference_cell(cell, p["ih"], p["cell"]["hh"])
            outputs = []
            for n in range(4):
                h = c = jnp.zeros(3)
                seq = []
                for t in range(5):
                    want[layer, n, t] = _top_sv(step, h, c, inputs[n, t], cell == "lstm")
                    h, c = step((h, c), inputs[n, t])
                    seq.append(h)
                outputs.append(jnp.stack(seq))
            inputs = jnp.stack(outputs)
    assert got.shape == (2, 4, 5)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    if cell != "lstm":  # (the probe in a run: once is enough)
        return
    rec = run_to_end(compose_cfg(*ADDING, f"model={cell}", "depth=2", "width=3",
                                 "data.length=5", "epochs=1", "data.n_train=64",
                                 "data.n_test=16", "record.probe_size=16", "progress=false",
                                 "record.epoch_probes=[evaluation,state_jacobian]"))
    assert rec.epoch_stats["state_jac_sv"].shape == (1, 2, 2, 5)
    assert rec.epoch_stats["state_jac_sv_mean"].shape == (1, 2, 2)
    assert np.isfinite(rec.epoch_stats["state_jac_sv"]).all()
