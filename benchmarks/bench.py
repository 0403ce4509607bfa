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
   it is timed on ``--torch-runs`` runs;
4. PyTorch with ``torch.func.vmap`` over the S seeds (``torch_vmap.py``: stacked
   parameters, the step's gradients, statistics and RMSprop batched over seeds, the
   Python loop over steps kept), eager and, with ``--torch-compile`` (default
   ``default``; ``off``, and ``--tiny`` unless it is given, skip it), its step in
   ``torch.compile``; timed as plain JAX:
   one warm-up run of one epoch (which compiles), then the best of ``--repeats``.
   Skipped with the loop (torch absent, or ``--torch-runs 0``).

``--torch-device cuda`` runs both PyTorch ways on the GPU (JAX then on the same GPU
when it has CUDA: the comparison on one device); ``--torch-threads N`` sets PyTorch's
CPU threads (default: PyTorch's own, one per core; on the 2-core VM at load 4-5 two
threads made the eager vmap step ~7x slower than one, at load 1.5 the two were alike).
The PyTorch figures are printed in a second table after the first.

Run times are the best of ``--repeats`` runs after the first (which compiles); compile
times are measured with the persistent compilation cache off (Inductor's caches too:
``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` unless set). Peak memory is the
process's peak resident size when the row was measured (it never decreases).
Output: a table on stdout and, with ``--json``, the same numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
import warnings
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


def bench_torch(x, y, epochs: int, runs: int, device: str = "cpu") -> dict | None:
    if runs < 1:  # --torch-runs 0: vgrad and plain JAX only
        return None
    try:
        import torch_loop
    except ImportError:
        return None
    torch_loop.train(x, y, 0, 1, 32, device=device)  # warm up
    t0 = time.perf_counter()
    for r in range(runs):
        torch_loop.train(x, y, r, epochs, 32, device=device)
    return {"run_s_per_seed": (time.perf_counter() - t0) / runs, "peak_rss_mb": peak_rss_mb(),
            "device": device}


def bench_torch_vmap(x, y, seeds: int, epochs: int, repeats: int, device: str,
                     compile: bool | str) -> dict:
    """torch.func.vmap over the seeds: a warm-up run of one epoch (same step shapes: it
    compiles when ``compile``), then the best of ``repeats`` full runs on other seeds.
    A failure (torch.compile on some machine, say) is recorded, not raised."""
    import torch_vmap
    try:
        t0 = time.perf_counter()
        torch_vmap.train(x, y, seeds, 1, 32, device=device, compile=compile)
        compile_s = time.perf_counter() - t0
        best = float("inf")
        for r in range(repeats):
            t0 = time.perf_counter()
            torch_vmap.train(x, y, [1000 + r * seeds + i for i in range(seeds)], epochs, 32,
                             device=device, compile=compile)
            best = min(best, time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        print(f"PyTorch vmap{' compiled' if compile else ''} at S={seeds} failed: {msg[:300]}",
              flush=True)
        return {"error": msg[:2000], "device": device}
    return {"compile_s": compile_s, "run_s": best, "peak_rss_mb": peak_rss_mb(),
            "device": device}


def rates(run_s: float, seeds: int, steps: int) -> dict:
    return {"steps_per_s": steps / run_s, "seed_steps_per_s": steps * seeds / run_s,
            "runs_per_s": seeds / run_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-runs", type=int, default=3)
    parser.add_argument("--torch-device", default="cpu",
                        help="where PyTorch's loop and vmap rows run: cpu or cuda")
    parser.add_argument("--torch-compile", default=None,
                        help="torch.compile mode of the vmap row's step: default (the "
                             "default, but off with --tiny), reduce-overhead (CUDA graphs), "
                             "max-autotune..., or off")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch.set_num_threads (0: PyTorch's default)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--tiny", action="store_true",
                        help="2 epochs, S = 2, one repeat: the bookkeeping in seconds")
    args = parser.parse_args(argv)
    if args.tiny:
        args.seeds, args.epochs, args.repeats, args.torch_runs = [2], 2, 1, 1
        args.torch_compile = args.torch_compile or "off"  # (compiling takes ~20 s on CPU)
    args.torch_compile = args.torch_compile or "default"
    if args.torch_device.startswith("cuda"):  # JAX and PyTorch share the GPU
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
    warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
    compile_mode = {"off": False, "none": False, "default": True}.get(args.torch_compile,
                                                                      args.torch_compile)

    ds = data.load(compose_cfg().data)
    x_np, y_np = ds.x_train, ds.y_train.astype(np.float32)
    steps = args.epochs * (len(x_np) // 32)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    torch_info = None
    if args.torch_runs > 0:
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None:
            if args.torch_threads > 0:
                torch.set_num_threads(args.torch_threads)
            torch_info = {"version": torch.__version__, "device": args.torch_device,
                          "threads": torch.get_num_threads(), "compile": args.torch_compile,
                          "cuda_device": (torch.cuda.get_device_name(args.torch_device)
                                          if args.torch_device.startswith("cuda") else None)}
    torch_row = bench_torch(x_np, y_np, args.epochs, args.torch_runs, args.torch_device)
    rows = []
    result = {"experiment": "visualize preset: circles, 2-5-5-5-5-1, RMSprop, batch 32",
              "epochs": args.epochs, "steps_per_run": steps,
              "devices": [str(d) for d in jax.devices()], "python": platform.python_version(),
              "jax": jax.__version__, "torch_runs_timed": args.torch_runs if torch_row else 0,
              "torch": torch_info, "load_average_at_start": list(os.getloadavg()),
              "cpu_count": os.cpu_count(), "rows": rows}
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
                ways = [("torch_vmap", False)]
                if compile_mode:
                    ways.append(("torch_vmap_compiled", compile_mode))
                for key, mode in ways:
                    r = bench_torch_vmap(x_np, y_np, s, args.epochs, args.repeats,
                                         args.torch_device, mode)
                    if "run_s" in r:
                        r.update(rates(r["run_s"], s, steps))
                        row[f"ratio_vgrad_same_work_to_{key}"] = r["run_s"] / same["run_s"]
                    row[key] = r
            rows.append(row)
            print_row(row)
            if args.json:  # after every row: a run cut short keeps the rows it finished
                args.json.write_text(json.dumps(result, indent=2))
    if torch_row is None and args.torch_runs > 0:
        print("PyTorch: not installed, its column is skipped (pip install torch)")
    elif torch_row is not None:
        print_torch_table(rows, torch_info, result["load_average_at_start"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


HEADER = False


def print_row(row: dict) -> None:
    global HEADER
    cols = [("plain_jax", "plain JAX"), ("vgrad_same_work", "vgrad same work"),
            ("vgrad_all_instruments", "vgrad all instr."), ("torch", "PyTorch loop")]
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


def print_torch_table(rows: list[dict], info: dict, load: list[float]) -> None:
    """PyTorch's three ways beside vgrad's same work: seed-steps per second, and how many
    times faster vgrad same work is (PyTorch's run time / vgrad's)."""
    where = info["device"] + (f" ({info['cuda_device']})" if info.get("cuda_device") else
                              f", torch threads: {info['threads']}")
    print(f"\nPyTorch {info['version']} on {where}, seed-steps/s "
          f"(vgrad same work's speed-up over each in brackets; compile: warm-up run, s); "
          f"load average at start {load[0]:.2f} on {os.cpu_count()} CPUs")
    cols = [("torch", "loop"), ("torch_vmap", "vmap"),
            ("torch_vmap_compiled", f"vmap+compile ({info['compile']})"),
            ("vgrad_same_work", "vgrad same work")]
    print(f"{'S':>5} | " + " | ".join(f"{name:>24}" for _, name in cols))
    for row in rows:
        cells = []
        for key, _ in cols:
            r = row.get(key)
            if r is None:
                cells.append(f"{'—':>24}")
            elif "error" in r:
                cells.append(f"{'failed':>24}")
            else:
                ratio = row.get(f"ratio_vgrad_same_work_to_{key}")
                comp = f" c{r['compile_s']:.1f}" if key.startswith("torch_vmap") else ""
                extra = f"({ratio:.1f}x){comp}" if ratio is not None else ""
                cells.append(f"{r['seed_steps_per_s']:>11.0f} {extra:>12}")
        print(f"{row['seeds']:>5} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    sys.exit(main())
