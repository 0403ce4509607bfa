"""The speed-of-light reference: the visualize preset's experiment as a minimal hand-written JAX
program with no framework. One ``lax.scan`` over all steps, ``vmap`` over seeds.

It does the work vgrad's gradient statistics do: per step, the loss and the mean, std,
L2 norm, mean |g| and max |g| of every kernel gradient, every bias gradient's norm and
the global gradient norm; per epoch, the loss and accuracy on all 1000 points and each
kernel's mean and std. MLP 2-5-5-5-5-1, kernels N(0, 1), zero biases, RMSprop (Keras
defaults: lr 1e-3, rho 0.9, eps 1e-7 inside the square root), BCE on the logit,
batch 32 (last partial batch dropped), a fresh shuffle every epoch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax  # only for the numerically stable BCE on logits

SIZES = (2, 5, 5, 5, 5, 1)
LR, RHO, EPS = 1e-3, 0.9, 1e-7


def init(key):
    keys = jax.random.split(key, len(SIZES) - 1)
    return [(jax.random.normal(k, (i, o)), jnp.zeros(o))
            for k, i, o in zip(keys, SIZES[:-1], SIZES[1:], strict=True)]


def forward(params, x, act):
    for w, b in params[:-1]:
        x = act(x @ w + b)
    w, b = params[-1]
    return (x @ w + b)[:, 0]


def loss_fn(params, x, y, act):
    return optax.sigmoid_binary_cross_entropy(forward(params, x, act), y).mean()


def grad_stats(grads):
    k = [g for g, _ in grads]
    flat = jnp.concatenate([jnp.ravel(a) for pair in grads for a in pair])
    return {
        "grad_mean": jnp.stack([g.mean() for g in k]),
        "grad_std": jnp.stack([g.std() for g in k]),
        "grad_norm": jnp.stack([jnp.linalg.norm(g) for g in k]),
        "grad_absmean": jnp.stack([jnp.abs(g).mean() for g in k]),
        "grad_maxabs": jnp.stack([jnp.abs(g).max() for g in k]),
        "bias_grad_norm": jnp.stack([jnp.linalg.norm(b) for _, b in grads]),
        "grad_global_norm": jnp.linalg.norm(flat),
    }


def make_train(x, y, epochs: int, batch: int, act=jax.nn.sigmoid):
    n = x.shape[0]
    steps = n // batch

    def run(seed):
        key_init, key_shuffle = jax.random.split(jax.random.key(seed))
        params = init(key_init)
        nu = jax.tree.map(jnp.zeros_like, params)

        def epoch(carry, e):
            perm = jnp.argsort(jax.random.bits(jax.random.fold_in(key_shuffle, e), (n,)))

            def step(carry, i):
                params, nu = carry
                idx = jax.lax.dynamic_slice_in_dim(perm, i * batch, batch)
                loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx], act)
                nu = jax.tree.map(lambda v, g: RHO * v + (1 - RHO) * g * g, nu, grads)
                params = jax.tree.map(lambda p, g, v: p - LR * g / jnp.sqrt(v + EPS),
                                      params, grads, nu)
                return (params, nu), {"loss": loss, **grad_stats(grads)}

            carry, stats = jax.lax.scan(step, carry, jnp.arange(steps))
            params = carry[0]
            logits = forward(params, x, act)
            evals = {"train_loss": optax.sigmoid_binary_cross_entropy(logits, y).mean(),
                     "train_acc": ((logits > 0) == (y > 0.5)).mean(),
                     "weight_mean": jnp.stack([w.mean() for w, _ in params]),
                     "weight_std": jnp.stack([w.std() for w, _ in params])}
            return carry, (stats, evals)

        _, (stats, evals) = jax.lax.scan(epoch, (params, nu), jnp.arange(epochs))
        return stats, evals

    return jax.jit(jax.vmap(run))
