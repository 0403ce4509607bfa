"""The ``param`` axis (sp | ntk | mup) and the coordinate check, against Tensor Programs V's
table, numpy forwards and mup's own test rule."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compose_cfg, run_to_end

from vgrad import group, losses, models, parametrization, runner
from vgrad.errors import ConfigError
from vgrad.parametrization import Scaling, lr_multiplier

#: A small MLP on digits (64 features, 10 classes), three hidden layers.
NET = ["init=lecun_normal", "act=relu", "depth=3", "data=digits", "loss=ce",
       "progress=false"]


def _params(cfg, seed: int = 0):
    net = models.build(cfg, losses.out_dim(cfg.loss.value, 10))
    x = jnp.ones((2, 64), jnp.float32)
    variables = net.init({"params": jax.random.key(seed), "noise": jax.random.key(seed)}, x)
    return net, {"params": variables["params"]}


def _kernel_vars(params) -> list[float]:
    return [float(np.var(np.asarray(params["params"][f"dense_{i}"]["kernel"])))
            for i in range(4)]


def test_initial_variances_follow_the_table():
    """Kernel variances per layer (width 1024, base 128: m = 8; lecun_normal draws
    1/fan_in): sp and mup agree except the readout, drawn m times wider (variance
    1/(fan_in n_base) / ... = m / fan_in, Tensor Programs V Table 8 / mup's MuReadout);
    ntk's W' has variance 1 everywhere (sqrt(fan_in) x the draw)."""
    n, base = 1024, 128
    fan_in = [64, n, n, n]
    got = {p: _kernel_vars(_params(compose_cfg(*NET, f"width={n}", f"param={p}"))[1])
           for p in ("sp", "ntk", "mup")}
    sp = [1 / f for f in fan_in]
    np.testing.assert_allclose(got["sp"], sp, rtol=0.05)
    np.testing.assert_allclose(got["ntk"], [1.0] * 4, rtol=0.05)
    np.testing.assert_allclose(got["mup"], sp[:3] + [(n / base) / n], rtol=0.05)


def _numpy_forward(params, x, mult):
    """The MLP's logits in numpy with the multiplier ``mult(layer, fan_in)`` on each
    Dense layer's input (ReLU after every hidden layer)."""
    h = np.asarray(x, np.float64)
    for i in range(4):
        p = params["params"][f"dense_{i}"]
        w, b = np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64)
        h = (h * mult(i, h.shape[-1])) @ w + b
        if i < 3:
            h = np.maximum(h, 0)
    return h


@pytest.mark.parametrize("param", ["ntk", "mup"])
def test_forward_applies_the_multipliers(param):
    """The net computes W'(c x) + b with the table's multiplier c: 1/sqrt(fan_in) on every
    layer (ntk), base/fan_in on the readout's input (mup); the logits equal a numpy
    forward's."""
    n, base = 256, 128
    cfg = compose_cfg(*NET, f"width={n}", f"param={param}")
    net, params = _params(cfg)
    x = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)
    mult = ((lambda i, f: 1 / np.sqrt(f)) if param == "ntk"
            else (lambda i, f: base / f if i == 3 else 1.0))
    np.testing.assert_allclose(np.asarray(net.apply(params, x)), _numpy_forward(params, x, mult),
                               rtol=1e-4, atol=1e-5)


def test_ntk_is_sp_reparametrized_and_mup_is_sp_at_its_base_width():
    """At initialisation the ntk net is the same function as the sp net of the same seed
    (W' = sqrt(fan_in) W, input / sqrt(fan_in)); the mup net at base width is the sp net,
    parameters and all."""
    x = np.random.default_rng(1).normal(size=(4, 64)).astype(np.float32)
    logits = {}
    for p in ("sp", "ntk", "mup"):
        net, params = _params(compose_cfg(*NET, "width=128", f"param={p}"), seed=3)
        logits[p] = np.asarray(net.apply(params, x))
    np.testing.assert_allclose(logits["ntk"], logits["sp"], rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(logits["mup"], logits["sp"])


def _factors(*overrides):
    cfg = compose_cfg(*NET, *overrides)
    g = group.group_jobs([runner.prepare(cfg, Path("unused"))])[0]
    return jax.tree.map(float, g.lr_factors) if g.lr_factors is not None else None


def test_learning_rate_factors_follow_the_table():
    """Width 512, base 128 (m = 4). Adam (mup's MuAdam): lr / m on hidden [n, n] kernels,
    lr elsewhere. SGD (MuSGD): lr * m on vector-like parameters (the input kernel [64, n],
    hidden biases, the readout kernel [n, 10]), lr on square hidden kernels and on the
    readout's bias [10]."""
    adam = _factors("width=512", "param=mup", "param.base_width=128", "optim=adam")
    assert adam == {"dense_0": {"kernel": 1.0, "bias": 1.0},
                    "dense_1": {"kernel": 0.25, "bias": 1.0},
                    "dense_2": {"kernel": 0.25, "bias": 1.0},
                    "dense_3": {"kernel": 1.0, "bias": 1.0}}
    sgd = _factors("width=512", "param=mup", "param.base_width=128", "optim=sgd")
    assert sgd == {"dense_0": {"kernel": 4.0, "bias": 4.0},
                   "dense_1": {"kernel": 1.0, "bias": 4.0},
                   "dense_2": {"kernel": 1.0, "bias": 4.0},
                   "dense_3": {"kernel": 4.0, "bias": 1.0}}
    assert _factors("width=512", "param=sp", "optim=adam") is None
    assert _factors("width=512", "param=ntk", "optim=sgd") is None


def test_learning_rate_factors_of_a_residual_net_and_unequal_widths():
    """The rule reads shapes, not names: a residual net's stacked block kernels [D, n, n]
    are hidden, its LayerNorm scales vector-like, its ReZero scalars fixed; a matrix
    whose fan-in and fan-out grow differently gets (SGD) m_out / m_in."""
    f = _factors("model=resmlp", "model.norm=layer", "model.alpha=rezero", "width=256",
                 "param=mup", "param.base_width=64", "optim=sgd")
    assert f["proj"] == {"kernel": 4.0, "bias": 4.0}
    assert f["blocks"]["dense_0"] == {"kernel": 1.0, "bias": 4.0}
    assert f["blocks"]["norm_0"]["LayerNorm_0"] == {"scale": 4.0, "bias": 4.0}
    assert f["blocks"]["alpha"] == 1.0
    assert f["out"] == {"kernel": 4.0, "bias": 1.0}
    assert lr_multiplier((128, 512), (64, 64), adaptive=False) == 4.0  # m_in 2, m_out 8
    assert lr_multiplier((128, 512), (64, 64), adaptive=True) == 0.5
    assert lr_multiplier((10,), (10,), adaptive=False) == 1.0


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "rmsprop"])
def test_updates_are_scaled_per_parameter(optimizer):
    """One step under mup moves each parameter by its factor times what the plain
    optimizer moves it (compared leaf by leaf), except AdamW's decoupled decay
    -lr wd w on the kernels, which keeps its size (mup's MuAdamW)."""
    from vgrad import optim

    overrides = ("width=256", "param=mup", "param.base_width=64", f"optim={optimizer}")
    cfg = compose_cfg(*NET, *overrides)
    factors = _factors(*overrides)
    _, params = _params(cfg)
    p = params["params"]
    grads = jax.tree.map(lambda x: jnp.linspace(-1.0, 2.0, x.size).reshape(x.shape), p)
    plain = optim.make(cfg.clip, cfg.optim, 10, 10)
    scaled = optim.make(cfg.clip, cfg.optim, 10, 10, factors)
    u0, _ = plain.update.update(grads, plain.update.init(p), p)
    u1, _ = scaled.update.update(grads, scaled.update.init(p), p)
    wd = cfg.optim.weight_decay if optimizer == "adamw" else 0.0
    decay = jax.tree_util.tree_map_with_path(  # -lr wd w on kernels (AdamW's mask)
        lambda path, w: -cfg.optim.lr * wd * np.asarray(w) * (path[-1].key == "kernel"), p)
    jax.tree.map(lambda a, b, f, d: np.testing.assert_allclose(
        np.asarray(b), f * (np.asarray(a) - d) + d, rtol=1e-5, atol=1e-9),
        u0, u1, factors, decay)
    assert any(f != 1.0 for f in jax.tree.leaves(factors))


@pytest.mark.parametrize(("overrides", "key"), [
    (["param=mup", "init=normal"], "init"),
    (["param=ntk", "init=glorot_uniform"], "init"),
    (["param=mup", "model=gru", "data=adding"], "model"),
    (["param=mup", "optim=adam", "optim.l2=0.1"], "optim.l2"),
    (["param=mup", "param.base_width=0"], "param.base_width"),
    (["param=mup", "depth=2", "widths=[256,512]"], "widths"),
    (["param=ntk", "init=variance_scaling", "init.mode=fan_avg"], "init.mode"),
])
def test_refused_combinations(overrides, key):
    from vgrad import config

    cfg = compose_cfg("init=he_normal", *overrides)
    with pytest.raises(ConfigError) as err:
        config.validate(cfg)
    assert err.value.key == key


def test_scaling_of_sp_changes_nothing():
    """``sp`` applies no multiplier (the input is passed on untouched) and the
    initializer itself: the stored reference numbers stay what they were."""
    init = jax.nn.initializers.lecun_normal()
    s = Scaling("sp")
    x = jnp.ones((2, 3))
    assert s.dense_input(x, "output") is x
    assert all(s.kernel_init(init, r) is init for r in parametrization.ROLES)


# --- the coordinate check ----------------------------------------------------------------

COORD = ["data.n_train=32", "data.test_size=0.05", "batch_size=32", "record.probe_size=32",
         "record.step_probes=[global_norms]", "record.epoch_probes=[evaluation,coord_check]"]


def test_coord_check_against_numpy():
    """coord_l1 and coord_change_l1 after two steps equal numpy's mean |z_l| and
    mean |z_l - z_l at init| on the probe batch (the first 32 training examples), from
    the saved initial and final parameters; both are 0-change at initialisation."""
    from vgrad import data as vdata

    cfg = compose_cfg(*NET, "width=16", *COORD, "epochs=2", "seeds=2", "param=mup",
                      "param.base_width=4", "optim=adam")
    rec = run_to_end(cfg)
    ds = vdata.load(cfg.data)
    x = ds.x_train[:32].astype(np.float64)
    z_l1, change = rec.epoch_stats["coord_l1"], rec.epoch_stats["coord_change_l1"]
    assert z_l1.shape == change.shape == (2, 3, 4)
    np.testing.assert_array_equal(change[:, 0], 0.0)

    def pre_activations(when, s):
        h, out = x, []
        for i in range(4):
            w = rec.params[f"{when}.dense_{i}.kernel"][s].astype(np.float64)
            b = rec.params[f"{when}.dense_{i}.bias"][s].astype(np.float64)
            h = (h * (4 / 16 if i == 3 else 1.0)) @ w + b
            out.append(h)
            h = np.maximum(h, 0)
        return out

    for s in range(2):
        final, initial = pre_activations("final", s), pre_activations("initial", s)
        np.testing.assert_allclose(z_l1[s, -1], [np.abs(z).mean() for z in final], rtol=1e-4)
        np.testing.assert_allclose(z_l1[s, 0], [np.abs(z).mean() for z in initial], rtol=1e-4)
        np.testing.assert_allclose(change[s, -1], [np.abs(a - b).mean()
                                                   for a, b in zip(final, initial, strict=True)],
                                   rtol=1e-3)


def _hidden_change(param: str, optimizer: str, width: int) -> float:
    cfg = compose_cfg("init=he_normal", "act=relu", "depth=2", "data=digits", "loss=ce",
                      "progress=false", *COORD, "epochs=3", "seeds=1", f"width={width}",
                      f"param={param}", f"optim={optimizer}", "record.params=[]")
    change = run_to_end(cfg).epoch_stats["coord_change_l1"]
    return float(change[0, 3, 1])  # after 3 steps, the hidden [n, n] layer


def test_mup_keeps_the_hidden_change_flat_in_width():
    """mup's own test rule (microsoft/mup's coord-check tests): with muP and SGD the mean
    |change| of a hidden layer's pre-activation after 3 steps at width 4096 is within
    1/1.2 ... 1.2 of width 1024's; under the standard parametrization with Adam it is not
    (it grows about linearly with width: each of the n inputs moves by ~lr)."""
    mup = _hidden_change("mup", "sgd", 4096) / _hidden_change("mup", "sgd", 1024)
    sp = _hidden_change("sp", "adam", 4096) / _hidden_change("sp", "adam", 1024)
    assert 1 / 1.2 <= mup <= 1.2, mup
    assert sp > 2.0, sp


def test_mean_field_theory_is_drawn_for_mup_only_at_its_base_width():
    """Away from its base width muP's readout has another variance than the theory's
    sp net: no overlay then (a reason instead); at the base width it is the sp net."""
    from omegaconf import OmegaConf

    from vgrad.analysis.predictions import theory_inputs

    def stored(*overrides):  # (as a run folder's config.yaml reads back)
        return OmegaConf.create(group.resolved(compose_cfg(*NET, *overrides)))

    assert isinstance(theory_inputs(stored("param=mup", "width=512")), str)
    assert isinstance(theory_inputs(stored("param=mup", "width=128")), tuple)
    assert isinstance(theory_inputs(stored("param=ntk", "width=512")), tuple)


def test_runs_written_before_the_param_axis_resume_as_sp():
    """A run folder written before ``param`` existed holds a config without it: it is
    the same run as today's ``param=sp`` (and not the same as ``param=mup``)."""
    from vgrad import runner

    for p, same in (("sp", True), ("mup", False)):
        cfg = compose_cfg(*NET, "width=256", f"param={p}")
        old = {k: v for k, v in group.resolved(cfg).items() if k != "param"}
        assert (runner._same_config({"config": old}, cfg) == []) is same


def test_no_stability_line_under_mup_rates():
    """muP gives each parameter its own SGD rate: 2/lr is no edge of stability there."""
    from types import SimpleNamespace

    from vgrad.analysis.run_figures import stability_limit

    def run(param):
        return SimpleNamespace(config={"optim": {"name": "sgd", "lr": 0.5}, "width": 512,
                                       "param": param})

    assert stability_limit(run({"name": "sp"})) == 4.0
    assert stability_limit(run({"name": "mup", "base_width": 512})) == 4.0
    assert stability_limit(run({"name": "mup", "base_width": 128})) is None


def test_coord_check_figure_of_a_width_by_depth_sweep(cli, tmp_path):
    """A sweep over width and depth: a row per depth, each with its own layers (the
    deeper row's legend), step panels; pooled over depth (rows=[]), the runs of the
    other depth are left out and named; one width: the figure does not apply."""
    from matplotlib import pyplot as plt

    from vgrad.analysis import load_sweep
    from vgrad.analysis.coord_figures import applies, coord_check

    code, _, err = cli("-m", *NET, *COORD, "width=8,16", "depth=1,2", "epochs=2",
                       "param=mup", "param.base_width=8", "record.params=[]",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert code == 0, err
    sweep = load_sweep(tmp_path / "sweep")
    assert applies(sweep)
    fig = coord_check(sweep)
    axes = np.asarray(fig.axes).reshape(2, 2)
    assert [a.get_title() for a in axes[0]] == ["step 1", "step 2"]
    assert [len(a.lines) for a in axes[:, 0]] == [2, 3]  # depth 1: 2 layers, depth 2: 3
    assert [t.get_text() for t in fig.legends[0].get_texts()][-1] == "dense_2 (logits)"
    plt.close(fig)
    fig = coord_check(sweep, rows=[])
    text = " ".join(t.get_text() for a in fig.axes for t in a.texts)  # (the caption)
    assert "left out (another depth in their row)" in text.replace("\n", " ")
    plt.close(fig)
    code, _, err = cli("-m", *NET, *COORD, "width=8", "depth=1,2", "epochs=1",
                       f"hydra.sweep.dir={tmp_path / 'one'}")
    assert code == 0, err
    assert not applies(load_sweep(tmp_path / "one"))
