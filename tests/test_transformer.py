"""The causal Transformer (vgrad.models.transformer): its forward against an independent
numpy implementation of the same equations (every norm position, DeepNet, both kinds of
positions, per-step and last-step readouts), zero-initialised branches as the identity,
causality, DeepNet's beta on the right kernels, the refusals, and the layers vgrad's
automatic route finds in it, whose out-projection deltas are the residual stream's
gradient."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgrad.models.auto import Instrumented, discover
from vgrad.models.transformer import Block, Transformer

Array = jax.Array

T, F, WIDTH, HEADS, DEPTH, OUT = 5, 3, 8, 2, 2, 3


def tiny(**kwargs: Any) -> Transformer:
    base = dict(out_dim=OUT, depth=DEPTH, width=WIDTH, step_features=F, heads=HEADS,
                bias_init=nn.initializers.normal(0.1))
    return Transformer(**{**base, **kwargs})


def jiggled(params: Any, seed: int = 1) -> Any:
    """Every parameter moved by N(0, 0.1^2): LayerNorm scales and zero biases included,
    so that the comparison exercises each of them."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape, p.dtype)
                                     for p, k in zip(leaves, keys, strict=True)])


# --- the numpy reference ----------------------------------------------------------------


def np_gelu(z: np.ndarray) -> np.ndarray:
    """jax.nn.gelu's default (tanh) form."""
    return 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))


def np_ln(x: np.ndarray, p: dict) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def np_attention(x: np.ndarray, p: dict) -> np.ndarray:
    """Causal multi-head self-attention; kernels [width, heads, head_dim] for q, k, v and
    [heads, head_dim, width] for the out projection (Flax's layout)."""
    def proj(name: str) -> np.ndarray:
        return (np.einsum("btd,dhk->bthk", x, np.asarray(p[name]["kernel"]))
                + np.asarray(p[name]["bias"]))

    q, k, v = proj("query"), proj("key"), proj("value")
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1])
    n = x.shape[1]
    future = np.arange(n)[None, :] > np.arange(n)[:, None]  # [query, key]: key after query
    logits = np.where(future, -np.inf, logits)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    o = np.einsum("bhqs,bshk->bqhk", w, v)
    return np.einsum("bqhk,hkd->bqd", o, np.asarray(p["out"]["kernel"])) + np.asarray(
        p["out"]["bias"])


def np_dense(x: np.ndarray, p: dict) -> np.ndarray:
    return x @ np.asarray(p["kernel"]) + np.asarray(p["bias"])


def np_positions(n: int, d: int) -> np.ndarray:
    out = np.zeros((n, d))
    for t in range(n):
        for j in range(d):
            angle = t / 10000 ** (2 * (j // 2) / d)
            out[t, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return out


def np_forward(params: dict, x: np.ndarray, norm: str, deepnorm: bool, positions: str,
               per_step: bool) -> np.ndarray:
    h = np_dense(x.reshape(x.shape[0], -1, F), params["embed"])
    h = h + (np.asarray(params["pos"]) if positions == "learned"
             else np_positions(h.shape[1], WIDTH))
    alpha = (2 * DEPTH) ** 0.25 if deepnorm else 1.0
    for i in range(DEPTH):
        p = params[f"block_{i}"]

        def mlp(z: np.ndarray, p: dict = p) -> np.ndarray:
            return np_dense(np_gelu(np_dense(z, p["mlp_in"])), p["mlp_out"])

        if norm == "pre":
            h = h + np_attention(np_ln(h, p["ln_attn"]), p["attn"])
            h = h + mlp(np_ln(h, p["ln_mlp"]))
        elif norm == "post":
            h = np_ln(alpha * h + np_attention(h, p["attn"]), p["ln_attn"])
            h = np_ln(alpha * h + mlp(h), p["ln_mlp"])
        else:
            h = h + np_attention(h, p["attn"])
            h = h + mlp(h)
    if norm == "pre":
        h = np_ln(h, params["ln_final"])
    return np_dense(h if per_step else h[:, -1], params["out"])


CASES = [("pre", False), ("post", False), ("none", False), ("post", True)]


@pytest.mark.parametrize(("norm", "deepnorm"), CASES)
@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_the_forward_is_the_numpy_equations(norm, deepnorm, positions):
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(2), (4, T * F), jnp.float64)
        for per_step in (False, True):
            net = tiny(norm_position=norm, deepnorm=deepnorm, positions=positions,
                       per_step=per_step, dtype=jnp.float64, param_dtype=jnp.float64)
            params = jiggled(net.init(jax.random.key(0), x)["params"])
            assert ("pos" in params) == (positions == "learned")
            assert ("ln_final" in params) == (norm == "pre")
            got = np.asarray(net.apply({"params": params}, x))
            want = np_forward(params, np.asarray(x), norm, deepnorm, positions, per_step)
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


# --- initialisation ---------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["pre", "none"])
def test_zero_residual_blocks_are_the_identity_at_init(norm):
    net = tiny(norm_position=norm, zero_residual=True, depth=3)
    x = jax.random.normal(jax.random.key(3), (2, T * F))
    variables = net.init(jax.random.key(0), x)
    _, state = net.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    stream = inter["embed"]["__call__"][0] + variables["params"]["pos"]
    assert float(jnp.abs(stream).max()) > 0.1
    for i in range(3):
        np.testing.assert_array_equal(inter[f"block_{i}"]["__call__"][0], stream)
    # not the identity without it (the branches' biases alone would move the stream)
    _, state = tiny(norm_position=norm, depth=3).apply(
        net.init(jax.random.key(0), x) | {"params": jiggled(variables["params"])}, x,
        capture_intermediates=True, mutable=["intermediates"])
    assert not np.allclose(state["intermediates"]["block_0"]["__call__"][0], stream)


def test_deepnorm_scales_value_out_and_mlp_kernels_by_beta_only():
    """Same seed with and without deepnorm: query, key, embed, out and every bias and norm
    are unchanged; value, attention out and both MLP kernels are beta times theirs, also
    when vgrad's interceptor runs the init (Instrumented)."""
    x = jnp.ones((2, T * F))
    beta = (8 * DEPTH) ** -0.25
    plain = tiny(norm_position="post").init(jax.random.key(0), x)["params"]
    for init in (lambda n: n.init(jax.random.key(0), x),
                 lambda n: Instrumented(n).init(jax.random.key(0), x)):
        deep = init(tiny(norm_position="post", deepnorm=True))["params"]
        flat_plain = dict(jax.tree_util.tree_flatten_with_path(plain)[0])
        for path, value in jax.tree_util.tree_flatten_with_path(deep)[0]:
            keys = [k.key for k in path]
            scaled = (keys[-1] == "kernel" and len(keys) == 4 and keys[2] in ("value", "out")
                      or keys[-1] == "kernel" and keys[1] in ("mlp_in", "mlp_out"))
            want = flat_plain[path] * (beta if scaled else 1.0)
            np.testing.assert_allclose(value, want, rtol=1e-6, err_msg=str(keys))


# --- behaviour --------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["pre", "post", "none"])
def test_causal_logits_at_a_step_ignore_later_steps(norm):
    net = tiny(norm_position=norm, per_step=True)
    x = jax.random.normal(jax.random.key(4), (2, T, F))
    variables = net.init(jax.random.key(0), x.reshape(2, -1))
    base = net.apply(variables, x.reshape(2, -1))
    for t in range(T - 1):
        changed = x.at[:, t + 1:].add(jax.random.normal(jax.random.key(t), (2, T - t - 1, F)))
        y = net.apply(variables, changed.reshape(2, -1))
        np.testing.assert_allclose(y[:, :t + 1], base[:, :t + 1], rtol=1e-5, atol=1e-6)
        assert not np.allclose(y[:, t + 1:], base[:, t + 1:])


def test_output_shapes_and_sown_attention_weights():
    x = jnp.ones((3, T * F))
    net = tiny()
    variables = net.init(jax.random.key(0), x)
    assert net.apply(variables, x).shape == (3, OUT)
    assert tiny(per_step=True).apply(variables, x).shape == (3, T, OUT)
    _, state = net.apply(variables, x, mutable=["intermediates"])
    (w,) = state["intermediates"]["block_1"]["attn"]["attention_weights"]
    assert w.shape == (3, HEADS, T, T)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    assert float(jnp.abs(jnp.triu(w, k=1)).max()) == 0.0


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(heads=3), "heads"),
    (dict(norm_position="middle"), "norm_position"),
    (dict(deepnorm=True), "deepnorm"),
    (dict(deepnorm=True, norm_position="none"), "deepnorm"),
    (dict(positions="rotary"), "positions"),
    (dict(depth=0), "depth"),
])
def test_clear_refusals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_an_input_not_a_multiple_of_step_features_is_refused():
    with pytest.raises(ValueError, match="step_features"):
        tiny().init(jax.random.key(0), jnp.ones((2, T * F + 1)))


# --- through vgrad's automatic route ----------------------------------------------------


def test_discover_finds_six_layers_per_block_plus_embed_and_out():
    found = discover(Instrumented(tiny(depth=3)), T * F, "transformer")
    names = [s.names[0] for s in found.layout.segments]
    per_block = ["attn/query", "attn/key", "attn/value", "attn/out", "mlp_in", "mlp_out"]
    assert names == ["embed", *[f"block_{i}/{n}" for i in range(3) for n in per_block], "out"]
    assert not any(s.stacked for s in found.layout.segments)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_out_projection_deltas_are_the_residual_streams_gradient(norm):
    """The delta vgrad perturbs at block_0's mlp_out equals dL/dh for the stream after the
    add (pre), or dL/ds for the sum before the LayerNorm (post), computed by running the
    rest of the net from that point as a function of it."""
    net = tiny(norm_position=norm, per_step=True)
    x = jax.random.normal(jax.random.key(5), (2, T * F))
    inst = Instrumented(net)
    variables = inst.init(jax.random.key(0), x)
    params = variables["params"]
    c = jax.random.normal(jax.random.key(6), (2, T, OUT))

    def loss_of_perturbations(pert: Any) -> Array:
        return jnp.sum(c * inst.apply({"params": params, "perturbations": pert}, x))

    delta = jax.grad(loss_of_perturbations)(variables["perturbations"])
    block = dict(width=WIDTH, heads=HEADS, mlp_ratio=4, norm_position=norm, alpha=1.0,
                 beta=1.0, zero_residual=False, act=nn.gelu, kernel_init=net.kernel_init,
                 bias_init=net.bias_init, dtype=jnp.float32, param_dtype=jnp.float32)

    def tail(h: Array) -> Array:  # from the stream after block_0 to the loss
        h = Block(**block).apply({"params": params["block_1"]}, h)
        if norm == "pre":
            h = nn.LayerNorm().apply({"params": params["ln_final"]}, h)
        return jnp.sum(c * nn.Dense(OUT).apply({"params": params["out"]}, h))

    _, state = net.apply({"params": params}, x, capture_intermediates=True,
                         mutable=["intermediates"])
    inter = state["intermediates"]["block_0"]
    if norm == "pre":  # h' = h + y: block_0's output
        want = jax.grad(tail)(inter["__call__"][0])
    else:  # s = h + y, h' = LN(s): h is the attention LayerNorm's output
        s = inter["ln_attn"]["__call__"][0] + inter["mlp_out"]["__call__"][0]
        ln = nn.LayerNorm()
        want = jax.grad(lambda s: tail(ln.apply({"params": params["block_0"]["ln_mlp"]}, s)))(s)
    got = delta["block_0"]["mlp_out"]["delta"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
