"""Any linen module, instrumented automatically (vgrad.models.auto): the same numbers as
the hand-declared MLP, deltas of a CNN against an independent backward pass, the CNN's
isometry under delta-orthogonal kernels, the fast convolution's gradients, and the
clear refusals."""

from __future__ import annotations

import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, compose_cfg, run_to_end
from jax import lax

from vgrad import activations, models, store
from vgrad.errors import ConfigError
from vgrad.layers import flat_params
from vgrad.models import conv
from vgrad.models.auto import Instrumented, act_function, discover

#: The built-in MLP's computation as a user would write it: no perturbation, no sown
#: value, no layout; the same layer names (so the same initial parameters).
PLAIN_MLP = textwrap.dedent('''
    from typing import Any, Callable

    import flax.linen as nn


    class PlainMLP(nn.Module):
        depth: int = 2
        width: int = 4
        out_dim: int = 1
        act: Callable = nn.relu
        kernel_init: Callable = nn.initializers.lecun_normal()
        bias_init: Callable = nn.initializers.zeros

        @nn.compact
        def __call__(self, x, train: bool = False):
            for i in range(self.depth):
                x = nn.Dense(self.width, kernel_init=self.kernel_init,
                             bias_init=self.bias_init, name=f"dense_{i}")(x)
                x = self.act(x)
            return nn.Dense(self.out_dim, kernel_init=self.kernel_init,
                            bias_init=self.bias_init, name=f"dense_{self.depth}")(x)
''')


@pytest.fixture
def plain_mlp(tmp_path, monkeypatch):
    (tmp_path / "plain_mlp.py").write_text(PLAIN_MLP)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "plain_mlp.PlainMLP"


def test_the_automatic_route_gives_the_hand_declared_mlps_numbers(plain_mlp):
    shared = [*TINY, "depth=3", "width=5", "act=tanh", "seeds=2", "bias_init=normal",
              "bias_init.std=0.1", "record.full_grads_every=3",
              "record.step_probes=[global_norms,kernel_grad_stats,bias_grad_norm,"
              "delta_norm,update_stats,clip_stats,gradient_noise]",
              "record.epoch_probes=[evaluation,weight_stats,"
              "activation_stats,probe_bias_grad_norm,histograms,forward_signal]"]
    declared = run_to_end(compose_cfg(*shared))
    auto = run_to_end(compose_cfg(*shared, "model=custom", f"model.target={plain_mlp}"))
    assert auto.layer_names == declared.layer_names == [f"dense_{i}" for i in range(4)]
    a, d = store.metrics_arrays(auto), store.metrics_arrays(declared)
    assert a.keys() == d.keys()
    for key in ("delta_norm", "grad_norm", "act_dead_frac", "act_sat_frac", "signal_q",
                "update_ratio", "train_loss", "grad_hist", "gsnr", "noise_scale_net"):
        assert key in a  # (every default probe recorded, and then some)
    for key in d:
        if d[key].dtype.kind == "U":  # (names)
            np.testing.assert_array_equal(a[key], d[key])
        else:
            np.testing.assert_allclose(a[key], d[key], rtol=1e-6, atol=1e-12, err_msg=key)
    grads = store.grads_arrays(declared)
    assert "dense_0.kernel" in grads and grads.keys() == store.grads_arrays(auto).keys()
    for name, value in grads.items():
        np.testing.assert_allclose(store.grads_arrays(auto)[name], value, rtol=1e-6,
                                   atol=1e-12, err_msg=name)


def _small_cnn(act: str = "tanh", **fields):
    cfg = compose_cfg("model=cnn", "data=digits", "loss=ce", "depth=3", "width=4",
                      f"act={act}", "init=he_normal", "bias_init=normal", "bias_init.std=0.1")
    return cfg, models.build(cfg, 10)


def _reference_deltas(params, x, y, act, padding="SAME"):
    """dL/d(output) of every layer of the CNN, by chained vector-Jacobian products of
    a forward pass written from scratch with ``lax`` (no Flax, no perturbation)."""
    x = x.reshape(x.shape[0], 8, 8, 1)

    def convolve(p, h):
        out = lax.conv_general_dilated(h, p["kernel"], (1, 1), padding,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return out + p["bias"]

    kernels = [params["conv_0"]["conv"]] + [
        jax.tree.map(lambda a, i=i: a[i], params["convs"]["conv"]) for i in range(2)]
    outputs, vjps, h = [], [], x
    for p in kernels:
        z, vjp = jax.vjp(lambda h, p=p: convolve(p, h), h)
        outputs.append(z)
        vjps.append(vjp)
        h = act(z)
    pooled = h.mean(axis=(1, 2))
    logits = pooled @ params["readout"]["kernel"] + params["readout"]["bias"]
    g = jax.grad(lambda lg: -jnp.take_along_axis(jax.nn.log_softmax(lg), y[:, None], 1).sum()
                 )(logits)  # per example: dl_n/dlogits_n
    deltas = [g]
    g = jax.vjp(lambda h: (h.mean(axis=(1, 2)) @ params["readout"]["kernel"]), h)[1](g)[0]
    for z, vjp in zip(reversed(outputs), reversed(vjps), strict=True):
        g = g * jax.vmap(jax.grad(lambda u: act(u).sum()))(z)  # through the activation
        deltas.insert(0, g)
        g = vjp(g)[0]
    return deltas


def test_cnn_deltas_match_an_independent_backward_pass():
    cfg, net = _small_cnn()
    x = jax.random.uniform(jax.random.key(1), (6, 64))
    y = jnp.arange(6) % 10
    variables = net.init({"params": jax.random.key(0), "noise": jax.random.key(0)}, x)
    layout = models.layout(cfg, 64)
    assert layout.names == ["conv_0", "convs[0]", "convs[1]", "readout"]

    def loss(pert):
        logits = net.apply({"params": variables["params"], "perturbations": pert}, x)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).sum()

    got = [d for seg in layout.deltas(jax.grad(loss)(variables["perturbations"]))
           for d in seg]
    want = _reference_deltas(variables["params"], x, y, jnp.tanh)
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-7)


def test_cnn_parameters_are_the_modules_own():
    """The instrumented module initialises exactly as the module alone does."""
    _, net = _small_cnn()
    x = jnp.ones((2, 64))
    keys = {"params": jax.random.key(3), "noise": jax.random.key(3)}
    with_probes = net.init(keys, x)["params"]
    alone = net.net.init(keys, x)["params"]
    jax.tree.map(np.testing.assert_array_equal, with_probes, alone)


@pytest.mark.parametrize("padding", ["SAME", ((1, 1), (0, 2)), "VALID"])
def test_the_fast_convolutions_gradient_is_laxs_bit_for_bit(padding):
    x = jax.random.normal(jax.random.key(0), (5, 7, 6, 3))
    k = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    dn = ("NHWC", "HWIO", "NHWC")

    def loss(c):
        return lambda x, k: jnp.sum(jnp.sin(c(x, k, (1, 1), padding, dimension_numbers=dn)))

    want = jax.grad(loss(lax.conv_general_dilated), argnums=(0, 1))(x, k)
    got = jax.grad(loss(conv.conv_general_dilated), argnums=(0, 1))(x, k)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    # (a strided convolution is lax's own)
    strided = conv.conv_general_dilated(x, k, (2, 2), "SAME", dimension_numbers=dn)
    np.testing.assert_array_equal(strided, lax.conv_general_dilated(
        x, k, (2, 2), "SAME", dimension_numbers=dn))


#: A linear CNN of 5 convolutions with circular padding, its Jacobian spectrum recorded.
ISOMETRY = ["model=cnn", "data=digits", "loss=ce", "depth=5", "width=4", "act=linear",
            "model.padding=CIRCULAR", "epochs=1", "progress=false",
            "record.epoch_probes=[evaluation,jacobian_spectrum]"]


def test_delta_orthogonal_cnn_is_an_isometry_at_initialisation():
    """Xiao et al. 2018: with circular padding, a linear CNN of delta-orthogonal kernels
    maps the first layer's output to the last hidden layer's orthogonally: every singular
    value of that Jacobian is 1."""
    m = store.metrics_arrays(run_to_end(compose_cfg(*ISOMETRY, "init=delta_orthogonal")))
    np.testing.assert_allclose(m["jac_sv_max"][0, 0], 1.0, rtol=1e-4)
    np.testing.assert_allclose(m["jac_sv_min"][0, 0], 1.0, rtol=1e-4)
    # He-initialised Gaussian kernels are not: their spectrum spreads.
    m = store.metrics_arrays(run_to_end(compose_cfg(*ISOMETRY, "init=he_normal")))
    assert m["jac_sv_max"][0, 0] / m["jac_sv_min"][0, 0] > 10


# --- modules with scans, remat, shared layers; what is refused ---------------------------


class _Block(nn.Module):
    act: object

    @nn.compact
    def __call__(self, x, _):
        return self.act(nn.Dense(4)(x)), None


def _net(axes=("params", "perturbations", "intermediates"), remat=False, shared=False):
    class Net(nn.Module):
        act: object = nn.relu

        @nn.compact
        def __call__(self, x):
            dense = (nn.remat(nn.Dense) if remat else nn.Dense)(4, name="first")
            x = self.act(dense(x))
            if shared:
                x = self.act(dense(x))
            stack = nn.scan(_Block, variable_axes=dict.fromkeys(axes, 0),
                            split_rngs={"params": True}, length=3)
            x, _ = stack(self.act, name="stack")(x, None)
            return nn.Dense(2, use_bias=False, name="out")(x)

    make, _ = activations.build(compose_cfg("act=tanh").act)
    return Net(act=act_function(make))


def test_scanned_and_rematerialised_layers_are_found_with_their_deltas():
    x = jax.random.normal(jax.random.key(0), (3, 4))
    for remat in (False, True):
        found = discover(Instrumented(_net(remat=remat)), 4, "Net")
        assert found.layout.names == ["first", "stack[0]", "stack[1]", "stack[2]", "out"]
        assert found.no_captures is None and len(found.layout.captures) == 2
        inst = Instrumented(_net(remat=remat))
        v = inst.init({"params": jax.random.key(1)}, x)

        def total(p, inst=inst, v=v):
            return inst.apply({"params": v["params"], "perturbations": p}, x).sum()

        grads = jax.grad(total)(v["perturbations"])
        deltas = found.layout.deltas(grads)
        assert [d.shape for d in deltas] == [(1, 3, 4), (3, 3, 4), (1, 3, 2)]
        np.testing.assert_allclose(deltas[-1][0], np.ones((3, 2)))  # d(sum)/d(out)
        flat = flat_params(found.layout, v["params"])
        assert {"first.kernel", "stack[2].bias", "out.kernel"} <= set(flat)
        assert "out.bias" not in flat


@pytest.mark.parametrize("net,needle", [
    (lambda: _net(axes=("params",)), "variable_axes lack 'perturbations'"),
    (lambda: _net(shared=True), "first is called twice"),
    (lambda: nn.Sequential([nn.relu]), "at least one layer"),
])
def test_what_cannot_be_instrumented_is_refused_in_one_line(net, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        discover(Instrumented(net()), 4, "Net")
    assert "\n" not in str(err.value)


def test_activations_that_do_not_follow_every_layer_leave_their_probe_out_and_say_so():
    class TwoActs(nn.Module):
        act: object = nn.relu

        @nn.compact
        def __call__(self, x):
            x = self.act(self.act(self.act(nn.Dense(4)(x))))
            return nn.Dense(2)(nn.Dense(3)(x))

    make, _ = activations.build(compose_cfg("act=tanh").act)
    found = discover(Instrumented(TwoActs(act=act_function(make))), 5, "TwoActs")
    assert found.layout.captures == ()
    assert "3 times, not once after each of its 2 layers" in found.layout.notes[0]


def test_embeddings_and_attention_projections_are_layers():
    class Attention(nn.Module):
        @nn.compact
        def __call__(self, x):
            tokens = jnp.clip((x[:, :8] * 4).astype(jnp.int32), 0, 15)  # [B, 8]
            h = nn.Embed(16, 6, name="embed")(tokens)
            h = h + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=6,
                                                    name="attn")(h)
            return nn.Dense(3, name="out")(h.mean(axis=1))

    found = discover(Instrumented(Attention()), 10, "Attention")
    layout = found.layout
    assert layout.names == ["embed", "attn/query", "attn/key", "attn/value", "attn/out",
                            "out"]
    inst, x = Instrumented(Attention()), jax.random.uniform(jax.random.key(0), (5, 10))
    v = inst.init({"params": jax.random.key(1)}, x)
    kernels = layout.leaves(v["params"], "kernel")
    assert kernels[0].shape == (1, 16, 6)  # the embedding table
    assert kernels[1].shape == (1, 6, 2, 3)  # a projection: [features, heads, head size]
    assert layout.leaves(v["params"], "bias")[0].shape == (1, 0)  # (an Embed has none)
    grads = jax.grad(lambda p: inst.apply({"params": v["params"], "perturbations": p},
                                          x).sum())(v["perturbations"])
    assert [d.shape for d in layout.deltas(grads)] == [
        (1, 5, 8, 6), (1, 5, 8, 2, 3), (1, 5, 8, 2, 3), (1, 5, 8, 2, 3), (1, 5, 8, 6),
        (1, 5, 3)]
