#!/usr/bin/env python
"""What the gradient-noise and curvature probes (issue 26) cost on the visualize preset,
as ratios to the default program measured beside them in one process.

    python benchmarks/noise_bench.py                  # S = 100 seeds, 50 + 5 epochs
    python benchmarks/noise_bench.py --epochs 20 --hess-epochs 5 --json out.json
    python benchmarks/noise_bench.py --tiny           # seconds: checks the bookkeeping only

The experiment: the ``visualize`` preset (circles, MLP 2-5-5-5-5-1, RMSprop, BCE, batch
32; ``+experiment=visualize``), ``--seeds`` seeds in one program, trained by
``vgrad.train.train`` as a user runs it (timed from the composed config to the written
run folder, as ``bench.py`` does). Two measurements:

1. **Step probe** ``gradient_noise`` (per-example gradient statistics, ``vgrad/noise.py``),
   ``--epochs`` epochs, three configurations: ``default`` (the composed config's
   ``record.step_probes`` and epoch probes), ``+ gradient_noise`` (the same step probes
   with ``gradient_noise`` appended) and ``minimal`` (``record.step_probes=[global_norms]``,
   for reference). The ratio that matters is ``+ gradient_noise`` / ``default``: run
   time and time per step. The first run of each configuration compiles (its
   ``compile_s``, persistent cache off, is reported); run times are the best of
   ``--repeats`` runs after it, on other seeds, the configurations interleaved repeat by
   repeat so that a noisy neighbour slows them alike. Then the same on a wide variant
   of the net (``WIDE``: 256 units, batch 128, ``--wide-seeds`` seeds), whose layers are
   matrices: there the probe's matrix product per layer is what it costs, where on the
   5-unit net its fixed per-operation costs dominate.
2. **Epoch probes** ``hessian`` (Lanczos, ``LANCZOS_STEPS`` = 40 HVPs, and Hutchinson's
   trace, ``TRACE_PROBES`` = 32 HVPs, on the 512-example probe batch;
   ``vgrad/curvature.py``) and ``hessian_blocks`` (Lanczos on each layer's diagonal
   block: layers x 40 HVPs), ``--hess-epochs`` epochs with
   ``record.step_probes=[global_norms]`` (a short step, so that the boundary dominates)
   and ``record.epoch_probes=[evaluation]``, ``[evaluation,hessian]`` and
   ``[evaluation,hessian,hessian_blocks]``. Epoch probes run at E + 1 boundaries
   (initialisation and after every epoch): the difference in run time divided by E + 1
   is the cost of one curvature evaluation of all S members; divided by S, per member.

Both the wall time of ``train`` and the program's own run time (``summary.json``'s
``timing.run_s``: the compiled chunks only) are reported; ratios use the wall time.
Output: a table on stdout (with the conditions: cores, devices, JAX version, date, load)
and, with ``--json``, the same numbers as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax

from vgrad import curvature, store
from vgrad.train import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import compose_cfg, peak_rss_mb  # noqa: E402

EXPERIMENT = ["+experiment=visualize", "progress=false", "compile_cache=null"]
MINIMAL_STEP = "record.step_probes=[global_norms]"
#: The wide variant of part 1: the same data and optimizer, layers that are matrices.
WIDE = ("width=256", "batch_size=128")
EPOCH_CONFIGS = {"evaluation": ["evaluation"],
                 "+ hessian": ["evaluation", "hessian"],
                 "+ hessian, hessian_blocks": ["evaluation", "hessian", "hessian_blocks"]}


def probe_list(name: str, probes: list[str]) -> str:
    return f"record.{name}=[{','.join(probes)}]"


def bench_configs(configs: dict[str, list[str]], seeds: int, epochs: int, repeats: int,
                  out: Path, net: tuple[str, ...] = ()) -> dict[str, dict]:
    """``bench.bench_vgrad`` for several configurations at once: each compiles in a first
    run, then the repeats (other seeds, same programs) go round the configurations.
    ``net``: overrides of the preset's net (the wide variant)."""
    rows: dict[str, dict] = {}
    bases = {k: [*EXPERIMENT, *net, f"seeds={seeds}", f"epochs={epochs}", *extra]
             for k, extra in configs.items()}
    for i, (key, base) in enumerate(bases.items()):
        first = out / f"c{i}_first"
        train(compose_cfg(*base), first)  # compiles
        summary = store.read_summary(first)
        rows[key] = {"overrides": base, "compile_s": summary["timing"]["compile_s"],
                     "run_s": float("inf"), "program_run_s": float("inf"),
                     "arrays": sorted(summary["arrays"]), "notes": summary["notes"],
                     "steps_per_epoch": summary["steps_per_epoch"],
                     "n_params": summary["n_params"], "layers": summary["layers"]}
    for r in range(repeats):
        for i, (key, base) in enumerate(bases.items()):
            cfg = compose_cfg(*base, f"seed={1000 + r * seeds}")  # (Hydra's part, untimed)
            run = out / f"c{i}_r{r}"
            t0 = time.perf_counter()
            train(cfg, run)
            wall = time.perf_counter() - t0
            rows[key]["run_s"] = min(rows[key]["run_s"], wall)
            rows[key]["program_run_s"] = min(rows[key]["program_run_s"],
                                             store.read_summary(run)["timing"]["run_s"])
    for row in rows.values():
        row["peak_rss_mb"] = peak_rss_mb()
    return rows


def conditions() -> dict:
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cores": os.cpu_count(), "devices": [str(d) for d in jax.devices()],
            "jax": jax.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "load_avg_at_start": list(os.getloadavg()),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=50,
                        help="epochs of the step-probe runs (part 1)")
    parser.add_argument("--hess-epochs", type=int, default=5,
                        help="epochs of the curvature runs (part 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wide-seeds", type=int, default=10,
                        help="seeds of the wide variant of part 1 (" + " ".join(WIDE) + ")")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--tiny", action="store_true",
                        help="S = 2, 1 epoch, one repeat: the bookkeeping in seconds")
    args = parser.parse_args(argv)
    if args.tiny:
        args.seeds, args.epochs, args.hess_epochs, args.repeats = 2, 1, 1, 1
        args.wide_seeds = 2
    t_start = time.perf_counter()
    cond = conditions()

    default_cfg = compose_cfg(*EXPERIMENT)
    default_steps = list(default_cfg.record.step_probes)
    step_configs = {"default": [],
                    "+ gradient_noise": [probe_list("step_probes",
                                                    [*default_steps, "gradient_noise"])],
                    "minimal": [MINIMAL_STEP]}
    with tempfile.TemporaryDirectory() as tmp:
        step_rows = bench_configs(step_configs, args.seeds, args.epochs, args.repeats,
                                  Path(tmp) / "step")
        wide_rows = bench_configs(step_configs, args.wide_seeds, args.epochs, args.repeats,
                                  Path(tmp) / "wide", WIDE)
        epoch_rows = bench_configs(
            {k: [MINIMAL_STEP, probe_list("epoch_probes", v)] for k, v in EPOCH_CONFIGS.items()},
            args.seeds, args.hess_epochs, args.repeats, Path(tmp) / "epoch")

    noisy = step_rows["+ gradient_noise"]
    if "noise_scale_net" not in noisy["arrays"]:
        raise SystemExit(f"gradient_noise did not run: arrays {noisy['arrays']}, "
                         f"notes {noisy['notes']}")
    steps = args.epochs * noisy["steps_per_epoch"]
    base = step_rows["default"]
    for row in step_rows.values():
        row["steps"] = steps
        row["ms_per_step"] = 1e3 * row["run_s"] / steps
        row["seed_steps_per_s"] = steps * args.seeds / row["run_s"]
        row["ratio_to_default"] = row["run_s"] / base["run_s"]
        row["program_ratio_to_default"] = row["program_run_s"] / base["program_run_s"]
        row["compile_ratio_to_default"] = row["compile_s"] / base["compile_s"]
    wide_steps = args.epochs * wide_rows["default"]["steps_per_epoch"]
    for row in wide_rows.values():
        row["steps"] = wide_steps
        row["ms_per_step"] = 1e3 * row["run_s"] / wide_steps
        row["seed_steps_per_s"] = wide_steps * args.wide_seeds / row["run_s"]
        row["ratio_to_default"] = row["run_s"] / wide_rows["default"]["run_s"]
        row["program_ratio_to_default"] = (row["program_run_s"]
                                           / wide_rows["default"]["program_run_s"])
        row["compile_ratio_to_default"] = row["compile_s"] / wide_rows["default"]["compile_s"]
    noise_extra = {"ms_per_step": 1e3 * (noisy["run_s"] - base["run_s"]) / steps,
                   "us_per_seed_step": 1e6 * (noisy["run_s"] - base["run_s"])
                   / (steps * args.seeds)}

    boundaries = args.hess_epochs + 1
    layers = len(epoch_rows["evaluation"]["layers"])
    hvps = {"evaluation": 0,
            "+ hessian": curvature.LANCZOS_STEPS + curvature.TRACE_PROBES,
            "+ hessian, hessian_blocks": (curvature.LANCZOS_STEPS + curvature.TRACE_PROBES
                                          + layers * curvature.LANCZOS_STEPS)}
    ref = epoch_rows["evaluation"]
    for key, row in epoch_rows.items():
        extra_s = row["run_s"] - ref["run_s"]
        row["boundaries"] = boundaries
        row["hvps_per_member_per_boundary"] = hvps[key]
        row["extra_s_per_boundary"] = extra_s / boundaries
        row["extra_ms_per_boundary_per_member"] = 1e3 * extra_s / boundaries / args.seeds
        row["program_extra_s_per_boundary"] = (row["program_run_s"] - ref["program_run_s"]) \
            / boundaries
        row["ratio_to_evaluation"] = row["run_s"] / ref["run_s"]
        row["extra_compile_s"] = row["compile_s"] - ref["compile_s"]
    h, hb = epoch_rows["+ hessian"], epoch_rows["+ hessian, hessian_blocks"]
    blocks_only_s = hb["extra_s_per_boundary"] - h["extra_s_per_boundary"]

    result = {"experiment": "visualize preset: circles, 2-5-5-5-5-1, RMSprop, batch 32",
              "seeds": args.seeds, "epochs": args.epochs, "hess_epochs": args.hess_epochs,
              "repeats": args.repeats, "layers": layers, "conditions": cond,
              "default_step_probes": default_steps,
              "step_probes": step_rows, "gradient_noise_extra": noise_extra,
              "wide": {"overrides": list(WIDE), "seeds": args.wide_seeds,
                       "step_probes": wide_rows},
              "epoch_probes": epoch_rows,
              "hessian_blocks_alone_s_per_boundary": blocks_only_s,
              "wall_s": time.perf_counter() - t_start}
    print_tables(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


def print_tables(res: dict) -> None:
    c = res["conditions"]
    print(f"noise_bench: {res['experiment']}, S = {res['seeds']} seeds")
    print(f"  {c['date']}, {c['cores']} cores ({c['machine']}), devices {c['devices']}, "
          f"JAX {c['jax']}, Python {c['python']}, load avg at start "
          + " ".join(f"{x:.2f}" for x in c["load_avg_at_start"]))
    print(f"  best of {res['repeats']} runs after a compiling one, configurations "
          "interleaved; compile cache off; wall = vgrad.train.train, program = "
          "summary timing.run_s")
    print()
    print(f"1. step probes: {res['epochs']} epochs = "
          f"{res['step_probes']['default']['steps']} steps per seed; default step probes: "
          + ",".join(res["default_step_probes"]))
    _step_table(res["step_probes"])
    e = res["gradient_noise_extra"]
    print(f"  gradient_noise adds {e['ms_per_step']:.3f} ms per step "
          f"({e['us_per_seed_step']:.2f} us per seed-step)")
    wide = res["wide"]
    print(f"1b. the same, wide: {' '.join(wide['overrides'])}, S = {wide['seeds']} seeds, "
          f"{wide['step_probes']['default']['steps']} steps per seed")
    _step_table(wide["step_probes"])
    print()
    rows = res["epoch_probes"]
    first = next(iter(rows.values()))
    print(f"2. curvature epoch probes: {res['hess_epochs']} epochs, {first['boundaries']} "
          "epoch boundaries, record.step_probes=[global_norms]; "
          f"{res['layers']} layers, {first['n_params']} parameters, probe batch 512")
    print(f"{'epoch probes':>26} | {'wall s':>7} | {'program s':>9} | {'/ eval':>7} | "
          f"{'HVPs/member':>11} | {'+s/boundary':>11} | {'+ms/bnd/member':>14} | "
          f"{'prog +s/bnd':>11} | {'compile s':>9}")
    for key, r in rows.items():
        print(f"{key:>26} | {r['run_s']:>7.2f} | {r['program_run_s']:>9.2f} | "
              f"{r['ratio_to_evaluation']:>7.2f} | {r['hvps_per_member_per_boundary']:>11} | "
              f"{r['extra_s_per_boundary']:>11.3f} | "
              f"{r['extra_ms_per_boundary_per_member']:>14.3f} | "
              f"{r['program_extra_s_per_boundary']:>11.3f} | {r['compile_s']:>9.2f}")
    print(f"  hessian_blocks alone: {res['hessian_blocks_alone_s_per_boundary']:.3f} s per "
          f"boundary ({res['layers']} x {curvature.LANCZOS_STEPS} HVPs per member)")
    print(f"  benchmark wall time: {res['wall_s']:.0f} s, peak RSS "
          f"{max(r['peak_rss_mb'] for r in rows.values()):.0f} MB", flush=True)


def _step_table(rows: dict[str, dict]) -> None:
    print(f"{'config':>18} | {'wall s':>7} | {'program s':>9} | {'ms/step':>7} | "
          f"{'seed-steps/s':>12} | {'/ default':>9} | {'prog / def':>10} | "
          f"{'compile s':>9} | {'comp / def':>10}")
    for key, r in rows.items():
        print(f"{key:>18} | {r['run_s']:>7.2f} | {r['program_run_s']:>9.2f} | "
              f"{r['ms_per_step']:>7.3f} | {r['seed_steps_per_s']:>12.0f} | "
              f"{r['ratio_to_default']:>9.3f} | {r['program_ratio_to_default']:>10.3f} | "
              f"{r['compile_s']:>9.2f} | {r['compile_ratio_to_default']:>10.3f}")


if __name__ == "__main__":
    sys.exit(main())
