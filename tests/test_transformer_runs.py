"""``model=transformer`` in vgrad: its configuration errors, the attention-entropy probe
against numpy, learning-rate warmup, and a grouped sweep over the norm position that
records the per-block profile and the entropy with their declared shapes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compose_cfg
from test_transformer import np_attention, np_dense, np_ln

from vgrad import data, models, optim, probes, store
from vgrad.config import validate
from vgrad.errors import ConfigError

DIGITS = ["model=transformer", "data=digits", "loss=ce", "data.n_train=64",
          "depth=2", "width=8", "model.heads=2", "act=gelu"]


def test_transformer_config_errors_name_the_key():
    for overrides, key in [(["model.heads=3"], "model.heads"),
                           (["model.norm_position=sandwich"], "model.norm_position"),
                           (["model.positions=rotary"], "model.positions"),
                           (["model.deepnorm=true"], "model.deepnorm"),
                           (["data=circles"], "data"),
                           (["bn=pre"], "bn"),
                           (["optim.warmup=-1"], "optim.warmup")]:
        with pytest.raises(ConfigError, match=key):
            validate(compose_cfg(*DIGITS, *overrides))
    validate(compose_cfg(*DIGITS, "model.norm_position=post", "model.deepnorm=true"))


def test_attention_entropy_is_the_entropy_of_numpy_attention_weights():
    cfg = compose_cfg(*DIGITS)
    x = data.load(cfg.data).x_train[:5]
    net = models.build(cfg, 10)
    layout = models.layout(cfg, x.shape[1])
    assert [p[-1] for p in layout.attention.paths] == ["attn", "attn"]
    assert layout.attention.heads == 2
    variables = net.init(jax.random.key(0), jnp.asarray(x))
    _, sown = net.apply(variables, jnp.asarray(x), capture=True, mutable=["intermediates"])
    weights = layout.attention_weights(sown["intermediates"])
    view = probes.EpochView(*[None] * 10, attention=weights)
    got = np.asarray(probes.attention_entropy(view, layout)["attn_entropy"])

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    h = np_dense(x.reshape(5, 8, 8).astype(np.float64), p["embed"]) + p["pos"]
    z = np_ln(h, p["block_0"]["ln_attn"])
    q = np.einsum("btd,dhk->bthk", z, p["block_0"]["attn"]["query"]["kernel"]) + \
        p["block_0"]["attn"]["query"]["bias"]
    k = np.einsum("btd,dhk->bthk", z, p["block_0"]["attn"]["key"]["kernel"]) + \
        p["block_0"]["attn"]["key"]["bias"]
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(4)
    logits = np.where(np.triu(np.ones((8, 8), bool), 1), -np.inf, logits)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(w > 0, w * np.log(w), 0.0), axis=-1)
    np.testing.assert_allclose(got[0], entropy.mean(axis=(0, 2)), rtol=1e-5)
    assert np_attention(z, p["block_0"]["attn"]).shape == (5, 8, 8)
    # Between collapse and uniform attention over the keys each query sees.
    uniform = np.mean(np.log(np.arange(1, 9)))
    assert ((got > 0) & (got <= uniform + 1e-6)).all()


def test_warmup_rises_linearly_to_the_rate_then_follows_the_schedule():
    cfg = compose_cfg("optim=sgd", "optim.lr=0.5", "optim.warmup=4", "optim.schedule=cosine")
    lr = optim.learning_rate(cfg.optim, 12)
    np.testing.assert_allclose([lr(i) for i in range(5)], [0, 0.125, 0.25, 0.375, 0.5])
    cosine = [0.5 * 0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(9)]
    np.testing.assert_allclose([lr(4 + i) for i in range(9)], cosine, rtol=1e-6, atol=1e-7)
    plain = compose_cfg("optim=adam", "optim.warmup=3")
    np.testing.assert_allclose([optim.learning_rate(plain.optim, 10)(i) for i in (0, 3, 9)],
                               [0, 1e-3, 1e-3], rtol=1e-6)
    assert optim.learning_rate(compose_cfg("optim=adam").optim, 10) == 1e-3


def test_a_norm_position_sweep_records_the_block_profile_and_entropy(cli, tmp_path):
    from vgrad.analysis import load_sweep

    code, _, err = cli("-m", *DIGITS, "model.norm_position=pre,post", "epochs=2", "seeds=2",
                       "batch_size=16", "optim=adam", "optim.warmup=4", "progress=false",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert code == 0, err
    sweep = load_sweep(tmp_path / "sweep")
    assert len(sweep.runs_list) == 2
    for run in sweep.runs_list:
        m = store.read_metrics(run.path)
        names = [str(n) for n in m["layer_names"]]
        assert names[0] == "embed" and names[-1] == "out" and len(names) == 6 * 2 + 2
        assert m["attn_entropy"].shape == (2, 3, 2, 2)  # [seed, epoch, attention, head]
        assert np.isfinite(m["grad_norm"]).all() and np.isfinite(m["delta_norm"]).all()
        assert run.summary["status"] == "completed"
