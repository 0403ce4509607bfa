#!/usr/bin/env python
"""The visualize preset's experiment in PyTorch for S seeds at once, with ``torch.func.vmap``:
the same work as ``torch_loop.py`` (and ``plain_jax.py``), per step the loss, every
kernel gradient's mean, std (population), L2 norm, mean |g| and max |g|, every bias
gradient's norm and the global gradient norm; per epoch the loss and accuracy on all
points and each kernel's mean and std. MLP 2-5-5-5-5-1 (sigmoid), N(0, 1) kernels, zero
biases, BCE on the logit, batch 32 (last partial batch dropped), a fresh shuffle per seed
and epoch, RMSprop with Keras's defaults as ``torch.optim.RMSprop`` computes it
(lr 1e-3, alpha 0.9, eps 1e-7 added outside the square root, as ``torch_loop.py``).

The parameters are stacked along a leading seed axis; each step takes every seed's
loss gradient at once by ``vmap(grad_and_value(loss))`` over ``functional_call`` of one
``nn.Sequential``, updates the stacked parameters by hand with the ops
``torch.optim.RMSprop`` uses (``addcmul``, ``sqrt``, ``add``, ``addcdiv``), and computes
the statistics batched over seeds. ``compile=True`` wraps that step in ``torch.compile``
(``dynamic=False``: one program per S); a string names a ``torch.compile`` mode
(``"reduce-overhead"``: CUDA graphs). The Python loop over steps stays.

Seeding: ``seeding="loop"`` draws seed s's initial parameters and shuffles exactly as
``torch_loop.train(..., seed=s)`` does (``torch.manual_seed(s)``, ``make_model()``, one
``torch.randperm`` per epoch, on the CPU), so seed s here equals the loop's seed s to
float32 rounding; ``seeding="batched"`` (the benchmark's) draws all seeds' kernels with
one ``randn`` and each epoch's shuffles with one ``argsort`` of uniform draws on the
device, as ``plain_jax.py`` does inside its program. ``init`` and ``perms`` take both
from the caller instead.

    python benchmarks/torch_vmap.py --check        # 3 seeds, 2 epochs: equal to torch_loop
    python benchmarks/torch_vmap.py --seeds 100 --epochs 10 [--compile] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_loop  # noqa: E402

LR, ALPHA, EPS = 1e-3, 0.9, 1e-7
COLUMNS = ["loss", "grad_global_norm"] + [
    f"{s}_{i}" for i in range(len(torch_loop.SIZES) - 1)
    for s in ("grad_mean", "grad_std", "grad_norm", "grad_absmean", "grad_maxabs",
              "bias_grad_norm")]


def loop_seeding(seeds, n: int, epochs: int):
    """Seed s's initial parameters and shuffles as ``torch_loop.train`` draws them:
    ({name: (S, ...)} on the CPU, (epochs, S, n) permutations)."""
    params, perms = [], []
    for s in seeds:
        torch.manual_seed(int(s))
        params.append({k: v.detach().clone()
                       for k, v in torch_loop.make_model().named_parameters()})
        perms.append(torch.stack([torch.randperm(n) for _ in range(epochs)]))
    return ({k: torch.stack([p[k] for p in params]) for k in params[0]},
            torch.stack(perms, dim=1))


def batched_init(model: torch.nn.Module, S: int, gen: torch.Generator, device) -> dict:
    """N(0, 1) kernels and zero biases for S seeds, one draw per kernel, on the device."""
    return {k: (torch.randn(S, *v.shape, generator=gen, device=device) if k.endswith("weight")
                else torch.zeros(S, *v.shape, device=device))
            for k, v in model.named_parameters()}


def make_step(model: torch.nn.Module, kernels: list[str], biases: list[str]):
    """One training step of every seed: (params, nu, x, y, idx) -> (params, nu, stats)."""

    def loss(params, xb, yb):
        logits = functional_call(model, params, (xb,))[:, 0]
        return F.binary_cross_entropy_with_logits(logits, yb)

    grad_loss = vmap(grad_and_value(loss))

    def step(params: dict, nu: dict, x, y, idx):
        grads, value = grad_loss(params, x[idx], y[idx])  # idx: (S, batch)
        cols = [value, torch.sqrt(sum((g * g).flatten(1).sum(1) for g in grads.values()))]
        for k, b in zip(kernels, biases, strict=True):
            g = grads[k].flatten(1)
            a = g.abs()
            cols += [g.mean(1), g.std(1, unbiased=False), torch.linalg.vector_norm(g, dim=1),
                     a.mean(1), a.amax(1), torch.linalg.vector_norm(grads[b].flatten(1), dim=1)]
        # torch.optim.RMSprop's arithmetic (single-tensor path), out of place
        new_nu = {k: torch.addcmul(nu[k] * ALPHA, g, g, value=1 - ALPHA)
                  for k, g in grads.items()}
        new_params = {k: torch.addcdiv(params[k], g, new_nu[k].sqrt() + EPS, value=-LR)
                      for k, g in grads.items()}
        return new_params, new_nu, torch.stack(cols, dim=1)

    return step


_STEPS: dict = {}


def compiled_step(model, kernels, biases, device, compile: bool | str):
    """The step, made (and compiled) once per device and compile mode, so that later runs
    reuse torch.compile's programs (dynamo guards on the closure's model: a fresh step
    per run would recompile every run). The model only gives the structure."""
    key = (str(device), compile)
    if key not in _STEPS:
        step = make_step(model, kernels, biases)
        if compile:
            mode = compile if isinstance(compile, str) else None
            step = torch.compile(step, dynamic=False, mode=mode)
        _STEPS[key] = step
    return _STEPS[key]


def train(x: np.ndarray, y: np.ndarray, seeds, epochs: int, batch: int = 32,
          device: str = "cpu", compile: bool | str = False, seeding: str = "batched",
          init: dict | None = None, perms=None) -> dict[str, np.ndarray]:
    """Train len(seeds) seeds at once (``seeds``: a sequence of ints, or S for 0..S-1).
    Returns {"steps": (S, epochs * steps, 6L + 2), "epochs": (S, epochs, 2 + 2L)}, each
    seed's rows in ``torch_loop.train``'s layout."""
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    S = len(seeds)
    xt = torch.tensor(np.array(x, dtype=np.float32), device=device)
    yt = torch.tensor(np.array(y, dtype=np.float32), device=device)
    n, steps = len(xt), len(xt) // batch
    model = torch_loop.make_model().to(device)  # the structure; its own parameters unused
    names = [k for k, _ in model.named_parameters()]
    kernels = [k for k in names if k.endswith("weight")]
    biases = [k for k in names if k.endswith("bias")]
    L = len(kernels)
    gen = None
    if seeding == "loop" and (init is None or perms is None):
        init0, perms0 = loop_seeding(seeds, n, epochs)
        init = init0 if init is None else init
        perms = perms0 if perms is None else perms
    elif seeding == "batched":
        gen = torch.Generator(device=device)
        gen.manual_seed(seeds[0] * 1_000_003 + S)
    elif seeding != "loop":
        raise ValueError(f"seeding must be 'loop' or 'batched', not {seeding!r}")
    if init is None:
        params = batched_init(model, S, gen, device)
    else:
        params = {k: torch.as_tensor(init[k], dtype=torch.float32).to(device).clone()
                  for k in names}
    if perms is not None:
        perms = torch.as_tensor(perms).to(device)
    nu = {k: torch.zeros_like(v) for k, v in params.items()}

    step = compiled_step(model, kernels, biases, device, compile)
    forward = vmap(lambda p, xs: functional_call(model, p, (xs,))[:, 0], in_dims=(0, None))

    # CUDA graphs (mode "reduce-overhead") overwrite a step's outputs at the next replay:
    # keep copies of the state that the next step reads.
    graphs = compile == "reduce-overhead"
    step_stats = torch.zeros(S, epochs * steps, 6 * L + 2, device=device)
    epoch_stats = torch.zeros(S, epochs, 2 + 2 * L, device=device)
    t = 0
    for e in range(epochs):
        perm = (perms[e] if perms is not None
                else torch.argsort(torch.rand(S, n, generator=gen, device=device), dim=1))
        for i in range(steps):
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            params, nu, stats = step(params, nu, xt, yt, perm[:, i * batch:(i + 1) * batch])
            step_stats[:, t] = stats
            if graphs:
                params = {k: v.clone() for k, v in params.items()}
                nu = {k: v.clone() for k, v in nu.items()}
            t += 1
        with torch.no_grad():
            logits = forward(params, xt)  # (S, n)
            losses = F.binary_cross_entropy_with_logits(
                logits, yt.expand(S, n), reduction="none").mean(1)
            acc = ((logits > 0) == (yt > 0.5)).float().mean(1)
            w = [params[k].flatten(1) for k in kernels]
            weights = torch.stack([torch.stack([v.mean(1), v.std(1, unbiased=False)], dim=1)
                                   for v in w], dim=1).flatten(1)  # (S, 2L), loop's order
            epoch_stats[:, e] = torch.cat([losses[:, None], acc[:, None], weights], dim=1)
    if xt.is_cuda:
        torch.cuda.synchronize(xt.device)
    return {"steps": step_stats.cpu().numpy(), "epochs": epoch_stats.cpu().numpy()}


def load_data():
    """The visualize preset's training set, as bench.py loads it."""
    from hydra import compose, initialize_config_dir

    from vgrad import data
    from vgrad.train import CONF_DIR
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        ds = data.load(compose("config").data)
    return ds.x_train, ds.y_train.astype(np.float32)


def rel_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| / max(|a|, |b|), 0 where both are 0."""
    scale = np.maximum(np.abs(a), np.abs(b))
    return np.where(scale > 0, np.abs(a - b) / np.where(scale > 0, scale, 1), 0.0)


def check(seeds=(0, 1, 2), epochs: int = 2, device: str = "cpu", compile: bool | str = False,
          rtol: float = 1e-4) -> bool:
    """Seed s of the vmap version (``seeding="loop"``) against ``torch_loop.train(seed=s)``:
    every per-step statistic and per-epoch figure within rtol. Printed: the plain maximum
    relative difference, and the one judged, where a kernel gradient's mean is measured
    against its layer's mean |g| when that is larger: a mean of entries of both signs
    (1e-7 where |g| averages 2e-4, say) carries the rounding of its terms, not its own,
    and a different summation order (torch.compile's fused reductions) moves it by ~1e-7
    of |g| relative to itself by more than 1e-4."""
    x, y = load_data()
    vm = train(x, y, seeds, epochs, 32, device=device, compile=compile, seeding="loop")
    gm = [i for i, c in enumerate(COLUMNS) if c.startswith("grad_mean")]
    am = [i for i, c in enumerate(COLUMNS) if c.startswith("grad_absmean")]
    plain = {"steps": 0.0, "epochs": 0.0}
    judged = 0.0
    for j, s in enumerate(seeds):
        ref = torch_loop.train(x, y, s, epochs, 32, device=device)
        for part in plain:
            a, b = vm[part][j].astype(np.float64), ref[part].astype(np.float64)
            d = rel_diff(a, b)
            plain[part] = max(plain[part], float(d.max()))
            if part == "steps":
                scale = np.maximum(np.abs(a), np.abs(b))
                scale[:, gm] = np.maximum(scale[:, gm], np.abs(b[:, am]))
                dj = np.where(scale > 0, np.abs(a - b) / np.where(scale > 0, scale, 1), 0.0)
                judged = max(judged, float(dj.max()))
                col = np.unravel_index(d.argmax(), d.shape)[1]
                print(f"seed {s}: per-step max rel. diff {d.max():.2e} ({COLUMNS[col]}), "
                      f"judged {dj.max():.2e}, bit-equal entries {np.mean(a == b):.1%}")
            else:
                judged = max(judged, float(d.max()))
    ok = judged <= rtol
    print(f"torch_vmap vs torch_loop, {len(seeds)} seeds x {epochs} epochs on {device}"
          f"{' (compiled)' if compile else ''}: max relative difference per-step "
          f"{plain['steps']:.3e}, per-epoch {plain['epochs']:.3e}; judged (grad_mean "
          f"against mean |g|) {judged:.3e} (rtol {rtol:g}): {'OK' if ok else 'FAILED'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="3 seeds, 2 epochs: per-step statistics equal to torch_loop's")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=None, help="default 2 (--check), 10")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", nargs="?", const=True, default=False,
                        help="torch.compile the step (optionally a mode: reduce-overhead)")
    args = parser.parse_args(argv)
    if args.check:
        ok = check(seeds=tuple(range(3)), epochs=args.epochs or 2, device=args.device,
                   compile=args.compile)
        return 0 if ok else 1
    x, y = load_data()
    epochs = args.epochs or 10
    steps = epochs * (len(x) // 32)
    train(x, y, args.seeds, 1, device=args.device, compile=args.compile)  # warm-up/compile
    t0 = time.perf_counter()
    train(x, y, args.seeds, epochs, device=args.device, compile=args.compile)
    run_s = time.perf_counter() - t0
    print(f"S={args.seeds}, {epochs} epochs on {args.device}"
          f"{' compiled' if args.compile else ''}: {run_s:.2f} s, "
          f"{steps * args.seeds / run_s:,.0f} seed-steps/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
