#!/usr/bin/env python
"""A sweep of the visualize preset as one hand-written JAX process: the denominator of
sweep_bench.py's "vgrad sweep / plain process" figure. No vgrad imports.

    python benchmarks/plain_sweep.py --out DIR                 # the 12-job sweep, 100 epochs
    python benchmarks/plain_sweep.py --out DIR --quick         # 1 epoch: checks the plumbing
    python benchmarks/plain_sweep.py --out DIR --acts sigmoid,tanh,relu --inits normal

It does in one fresh process what ``python -m vgrad.train -m +experiment=visualize
act=sigmoid,tanh,relu,elu init=normal,he_normal,glorot_uniform`` does (as a researcher
without vgrad would write it), with the statistics of ``plain_jax.py``:

- data: scikit-learn's ``make_circles(1000, noise=0.1, factor=0.5, random_state=42)``,
  shuffled once with ``numpy.random.default_rng(0)`` as vgrad's split does (test size 0:
  all 1000 points train), float32;
- members: one per job, activations x kernel initializers in the sweep's job order (act
  outer), seed 0 each (the preset's ``seed: 0, seeds: 1``); MLP 2-5-5-5-5-1, zero biases,
  kernels from ``normal`` (N(0, 1)), ``he_normal`` (truncated normal, Var 2 / fan_in, as
  Keras and ``jax.nn.initializers.he_normal``), ``glorot_uniform``, ``lecun_normal``;
  activations sigmoid, tanh, relu, elu (alpha 1), gelu (exact), swish (beta 1);
- one program: ``jit(vmap(run))`` over the members, ``run`` a ``lax.scan`` over epochs
  around a ``lax.scan`` over steps; the activation and the initializer of a member are
  ``lax.switch``-ed on its index (under ``vmap`` every branch is computed and the
  member's selected, as vgrad's grouped program does); RMSprop with Keras's defaults
  written out, BCE on the logit, batch 32 (last partial batch dropped), a fresh shuffle
  every epoch; per step the loss and each kernel gradient's mean, std, L2 norm, mean
  |g| and max |g|, each bias gradient's norm and the global norm; per epoch the loss and
  accuracy on all 1000 points and each kernel's mean and std. The members are split
  across the CPU devices as vgrad splits them (``--devices``, default: one per core,
  as many as divide the members evenly);
- outputs: ``DIR/<job>/metrics.npz`` per job (its statistics, its initial and final
  parameters, its act and init) and ``DIR/timing.json``.

It prints its wall time split: imports (and JAX's start), data, compile (tracing and
lowering included), train (the compiled program run and its results brought to the
host), write.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

T0 = time.perf_counter()  # (the interpreter's own start is before this: the caller sees it)

SIZES = (2, 5, 5, 5, 5, 1)
LR, RHO, EPS = 1e-3, 0.9, 1e-7
N_SAMPLES, NOISE, FACTOR, DATA_SEED, SPLIT_SEED = 1000, 0.1, 0.5, 42, 0
BATCH, EPOCHS, SEED = 32, 100, 0
ACTS = ("sigmoid", "tanh", "relu", "elu", "gelu", "swish")
INITS = ("normal", "he_normal", "glorot_uniform", "lecun_normal")


def request_devices(count: int) -> None:
    """Ask XLA for ``count`` CPU devices (before JAX starts; as vgrad does on import)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if count > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}"


def make_data():
    import numpy as np
    from sklearn.datasets import make_circles

    x, y = make_circles(N_SAMPLES, noise=NOISE, factor=FACTOR, random_state=DATA_SEED)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    return x[order].astype(np.float32), y[order].astype(np.float32)


def make_train(x, y, acts: list[str], inits: list[str], epochs: int):
    """``jit(vmap(run))``: members' (act index, init index, seed) -> their results."""
    import jax
    import jax.numpy as jnp
    import optax
    from plain_jax import grad_stats  # (the statistics plain_jax.py computes; beside this file)

    act_table = {"sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh, "relu": jax.nn.relu,
                 "elu": jax.nn.elu, "gelu": partial(jax.nn.gelu, approximate=False),
                 "swish": lambda z: z * jax.nn.sigmoid(z)}
    init_table = {"normal": lambda key, shape, dtype: jax.random.normal(key, shape, dtype),
                  "he_normal": jax.nn.initializers.he_normal(),
                  "glorot_uniform": jax.nn.initializers.glorot_uniform(),
                  "lecun_normal": jax.nn.initializers.lecun_normal()}
    act_fns = [act_table[a] for a in acts]
    init_fns = [init_table[i] for i in inits]
    x, y = jnp.asarray(x), jnp.asarray(y)
    n = x.shape[0]
    steps = n // BATCH

    def act(a, z):
        return act_fns[0](z) if len(act_fns) == 1 else jax.lax.switch(a, act_fns, z)

    def init(i, key):
        params = []
        for k, fan_in, fan_out in zip(jax.random.split(key, len(SIZES) - 1), SIZES[:-1],
                                      SIZES[1:], strict=True):
            shape = (fan_in, fan_out)
            branches = [partial(f, shape=shape, dtype=jnp.float32) for f in init_fns]
            w = branches[0](k) if len(branches) == 1 else jax.lax.switch(i, branches, k)
            params.append((w, jnp.zeros(fan_out)))
        return params

    def forward(params, x, a):
        for w, b in params[:-1]:
            x = act(a, x @ w + b)
        w, b = params[-1]
        return (x @ w + b)[:, 0]

    def bce(logits, y):
        return optax.sigmoid_binary_cross_entropy(logits, y).mean()

    def run(a, i, seed):
        key_init, key_shuffle = jax.random.split(jax.random.key(seed))
        params = init(i, key_init)
        nu = jax.tree.map(jnp.zeros_like, params)

        def loss_fn(params, xb, yb):
            return bce(forward(params, xb, a), yb)

        def epoch(carry, e):
            perm = jnp.argsort(jax.random.bits(jax.random.fold_in(key_shuffle, e), (n,)))

            def step(carry, s):
                params, nu = carry
                idx = jax.lax.dynamic_slice_in_dim(perm, s * BATCH, BATCH)
                loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx])
                nu = jax.tree.map(lambda v, g: RHO * v + (1 - RHO) * g * g, nu, grads)
                params = jax.tree.map(lambda p, g, v: p - LR * g / jnp.sqrt(v + EPS),
                                      params, grads, nu)
                return (params, nu), {"loss": loss, **grad_stats(grads)}

            carry, stats = jax.lax.scan(step, carry, jnp.arange(steps))
            params = carry[0]
            logits = forward(params, x, a)
            evals = {"train_loss": bce(logits, y),
                     "train_acc": ((logits > 0) == (y > 0.5)).mean(),
                     "weight_mean": jnp.stack([w.mean() for w, _ in params]),
                     "weight_std": jnp.stack([w.std() for w, _ in params])}
            return carry, (stats, evals)

        (final, _), (stats, evals) = jax.lax.scan(epoch, (params, nu), jnp.arange(epochs))
        stats = jax.tree.map(lambda s: s.reshape(epochs * steps, *s.shape[2:]), stats)
        return {"initial": params, "final": final, "stats": stats, "evals": evals}

    return jax.jit(jax.vmap(run))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--acts", default="sigmoid,tanh,relu,elu",
                        help=f"comma-separated, of {','.join(ACTS)}")
    parser.add_argument("--inits", default="normal,he_normal,glorot_uniform",
                        help=f"comma-separated, of {','.join(INITS)}")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--quick", action="store_true", help="1 epoch")
    parser.add_argument("--devices", type=int, default=None,
                        help="CPU devices to split the members across (default: one per "
                             "core, as vgrad; 1: the default device only)")
    args = parser.parse_args(argv)
    acts, inits = args.acts.split(","), args.inits.split(",")
    for given, known in ((acts, ACTS), (inits, INITS)):
        if unknown := set(given) - set(known):
            parser.error(f"unknown: {sorted(unknown)} (known: {known})")
    epochs = 1 if args.quick else args.epochs
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    request_devices(args.devices or cores or 1)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    jobs = [(a, i) for a in acts for i in inits]  # Hydra's order: the last axis varies fastest
    members = len(jobs)
    devices = jax.devices()  # (starts the backend)
    count = max(d for d in range(1, len(devices) + 1) if members % d == 0)
    sharding = NamedSharding(Mesh(np.array(devices[:count]), ("members",)),
                             PartitionSpec("members"))
    t_imports = time.perf_counter()

    x, y = make_data()
    t_data = time.perf_counter()

    fn = make_train(x, y, acts, inits, epochs)
    member_args = [jax.device_put(jnp.asarray(v, jnp.int32), sharding) for v in (
        [acts.index(a) for a, _ in jobs], [inits.index(i) for _, i in jobs], [SEED] * members)]
    lowered = fn.lower(*member_args)
    t_lower = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter()

    result = jax.device_get(compiled(*member_args))
    t_train = time.perf_counter()

    args.out.mkdir(parents=True, exist_ok=True)
    for j, (a, i) in enumerate(jobs):
        folder = args.out / str(j)
        folder.mkdir(exist_ok=True)
        arrays = {k: v[j] for part in ("stats", "evals") for k, v in result[part].items()}
        for which in ("initial", "final"):
            for layer, (w, b) in enumerate(result[which]):
                arrays[f"{which}/dense_{layer}/kernel"] = w[j]
                arrays[f"{which}/dense_{layer}/bias"] = b[j]
        np.savez(folder / "metrics.npz", act=a, init=i, seed=SEED, **arrays)
    t_write = time.perf_counter()

    timing = {"imports_s": t_imports - T0, "data_s": t_data - t_imports,
              "compile_s": t_compile - t_data, "trace_s": t_lower - t_data,
              "train_s": t_train - t_compile,
              "write_s": t_write - t_train, "in_process_s": t_write - T0,
              "jobs": members, "epochs": epochs, "devices": count,
              "steps_per_epoch": len(x) // BATCH}
    (args.out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    acc = result["evals"]["train_acc"][:, -1]
    print(f"{members} jobs x {epochs} epochs on {count} device(s): " + ", ".join(
        f"{a}/{i} {acc[j]:.3f}" for j, (a, i) in enumerate(jobs)) + " (final train acc)")
    print(f"imports+JAX start {timing['imports_s']:.2f} s, data {timing['data_s']:.2f} s, "
          f"compile {timing['compile_s']:.2f} s (trace {timing['trace_s']:.2f} s), train "
          f"{timing['train_s']:.2f} s, write {timing['write_s']:.2f} s; in process "
          f"{timing['in_process_s']:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
