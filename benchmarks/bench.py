#!/usr/bin/env python
"""Throughput of the visualize preset ("Visualizing the vanishing gradient problem")
three ways, in one process, on the same data.

    python benchmarks/bench.py                    # S = 1, 10, 100, 1000 seeds
    python benchmarks/bench.py --seeds 1 10 --json out.json
    python benchmarks/bench.py --tiny             # seconds: checks the bookkeeping only

The experiment: circles (n 1000, factor 0.5, noise 0.1), MLP 2-5-5-5-5-1 with N(0, 1)
kernels, RMSprop (Keras defaults), BCE, batch 32, 100 epochs, per-layer gradient
statistics recorded every step. The three ways:

1. vgrad as a user runs it: ``vgrad.train.train`` (timed from the composed config to
   the written run folder: data, validation, training, outputs), in two
   configurations: ``same work`` records exactly what the references record (the
   gradient statistics, losses, accuracies and weight statistics:
   ``record.step_probes=[global_norms,kernel_grad_stats,bias_grad_norm]
   record.epoch_probes=[weight_stats]``), ``all instruments`` is the default config
   (adds deltas, update ratios, clipping, activation statistics and histograms);
2. plain JAX (``plain_jax.py``): one ``lax.scan`` over all steps, ``vmap`` over seeds,
   no framework, the seeds split over the same devices as vgrad's;
3. PyTorch (``torch_loop.py``), the idiomatic loop, skipped when torch is absent.
   It trains seeds one after the other, so its runs per second do not depend on S;
   it is timed on ``--torch-runs`` runs.

Run times are the best of ``--repeats`` runs after the first (which compiles); compile
times are measured with the persistent compilation cache off. Peak memory is the
process's peak resident size when the row was measured (it never decreases).
Output: a table on stdout and, with ``--json``, the same numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from hydra import compose, initialize_config_dir

# (vgrad sets up one host device per core on import; JAX starts its backend lazily,
# after that, so the import order does not matter.)
from vgrad import data, store
from vgrad.compiled import member_mesh, shard_members
from vgrad.train import CONF_DIR, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plain_jax  # noqa: E402

SAME_WORK = ["record.step_probes=[global_norms,kernel_grad_stats,bias_grad_norm]",
             "record.epoch_probes=[weight_stats]"]


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("config", overrides=list(overrides))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_vgrad(seeds: int, epochs: int, repeats: int, extra: list[str], out: Path) -> dict:
    base = [f"seeds={seeds}", f"epochs={epochs}", "progress=false", "compile_cache=null",
            *extra]
    first = out / "first"
    train(compose_cfg(*base), first)  # compiles
    compile_s = store.read_summary(first)["timing"]["compile_s"]
    best = float("inf")
    for r in range(repeats):  # other seeds, same programs: no compilation
        cfg = compose_cfg(*base, f"seed={1000 + r * seeds}")  # (Hydra's part, untimed)
        t0 = time.perf_counter()
        train(cfg, out / f"r{r}")
        best = min(best, time.perf_counter() - t0)
    return {"compile_s": compile_s, "run_s": best, "peak_rss_mb": peak_rss_mb()}


def bench_plain(x, y, seeds: int, epochs: int, repeats: int) -> dict:
    fn = plain_jax.make_train(x, y, epochs, 32)
    mesh = member_mesh(seeds)
    args = shard_members(jnp.arange(seeds), mesh)
    t0 = time.perf_counter()
    compiled = fn.lower(args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(args))
    best = float("inf")
    for r in range(repeats):
        t0 = time.perf_counter()
        jax.device_get(compiled(args + 1000 + r * seeds))  # to the host, as vgrad does
        best = min(best, time.perf_counter() - t0)
    return {"compile_s": compile_s, "run_s": best, "peak_rss_mb": peak_rss_mb()}


def bench_torch(x, y, epochs: int, runs: int) -> dict | None:
    if runs < 1:  # --torch-runs 0: vgrad and plain JAX only
        return None
    try:
        import torch_loop
    except ImportError:
        return None
    torch_loop.train(x, y, 0, 1, 32)  # warm up
    t0 = time.perf_counter()
    for r in range(runs):
        torch_loop.train(x, y, r, epochs, 32)
    return {"run_s_per_seed": (time.perf_counter() - t0) / runs, "peak_rss_mb": peak_rss_mb()}


def rates(run_s: float, seeds: int, steps: int) -> dict:
    return {"steps_per_s": steps / run_s, "seed_steps_per_s": steps * seeds / run_s,
            "runs_per_s": seeds / run_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--tiny", action="store_true",
                        help="2 epochs, S = 2, one repeat: the bookkeeping in seconds")
    args = parser.parse_args(argv)
    if args.tiny:
        args.seeds, args.epochs, args.repeats, args.torch_runs = [2], 2, 1, 1

    ds = data.load(compose_cfg().data)
    x_np, y_np = ds.x_train, ds.y_train.astype(np.float32)
    steps = args.epochs * (len(x_np) // 32)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    torch_row = bench_torch(x_np, y_np, args.epochs, args.torch_runs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.seeds:
            plain = bench_plain(x, y, s, args.epochs, args.repeats)
            same = bench_vgrad(s, args.epochs, args.repeats, SAME_WORK, Path(tmp) / f"same{s}")
            full = bench_vgrad(s, args.epochs, args.repeats, [], Path(tmp) / f"full{s}")
            row = {"seeds": s,
                   "plain_jax": {**plain, **rates(plain["run_s"], s, steps)},
                   "vgrad_same_work": {**same, **rates(same["run_s"], s, steps)},
                   "vgrad_all_instruments": {**full, **rates(full["run_s"], s, steps)}}
            row["ratio_vgrad_same_work_to_plain_jax"] = plain["run_s"] / same["run_s"]
            row["ratio_vgrad_all_instruments_to_plain_jax"] = plain["run_s"] / full["run_s"]
            if torch_row is not None:
                torch_s = torch_row["run_s_per_seed"] * s
                row["torch"] = {"run_s": torch_s, **rates(torch_s, s, steps),
                                "peak_rss_mb": torch_row["peak_rss_mb"]}
                row["ratio_vgrad_same_work_to_torch"] = torch_s / same["run_s"]
                row["ratio_vgrad_all_instruments_to_torch"] = torch_s / full["run_s"]
            rows.append(row)
            print_row(row)
    result = {"experiment": "visualize preset: circles, 2-5-5-5-5-1, RMSprop, batch 32",
              "epochs": args.epochs, "steps_per_run": steps,
              "devices": [str(d) for d in jax.devices()], "python": platform.python_version(),
              "jax": jax.__version__, "torch_runs_timed": args.torch_runs if torch_row else 0,
              "rows": rows}
    if torch_row is None and args.torch_runs > 0:
        print("PyTorch: not installed, its column is skipped (pip install torch)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


HEADER = False


def print_row(row: dict) -> None:
    global HEADER
    cols = [("plain_jax", "plain JAX"), ("vgrad_same_work", "vgrad same work"),
            ("vgrad_all_instruments", "vgrad all instr."), ("torch", "PyTorch")]
    if not HEADER:
        print(f"{'S':>5} | " + " | ".join(f"{name:>28}" for _, name in cols)
              + " | same/plain | all/plain | same/torch | peak MB")
        print(f"{'':>5} | " + " | ".join(f"{'seed-steps/s  runs/s  compile':>28}" for _ in cols))
        HEADER = True
    cells = []
    for key, _ in cols:
        r = row.get(key)
        compile_s = f"{r['compile_s']:>6.2f}s" if r and "compile_s" in r else f"{'—':>7}"
        cells.append(f"{'—':>28}" if r is None else
                     f"{r['seed_steps_per_s']:>12.0f} {r['runs_per_s']:>7.3f} {compile_s}")
    torch_ratio = row.get("ratio_vgrad_same_work_to_torch")
    print(f"{row['seeds']:>5} | " + " | ".join(cells)
          + f" | {row['ratio_vgrad_same_work_to_plain_jax']:>10.2f}"
          + f" | {row['ratio_vgrad_all_instruments_to_plain_jax']:>9.2f}"
          + f" | {'—' if torch_ratio is None else f'{torch_ratio:.0f}x':>10}"
          + f" | {row['vgrad_all_instruments']['peak_rss_mb']:>7.0f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
