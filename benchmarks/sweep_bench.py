#!/usr/bin/env python
"""Sweeps through vgrad's launcher (grouped) against Hydra's basic launcher (job by job).

    python benchmarks/sweep_bench.py                  # every sweep below, both launchers
    python benchmarks/sweep_bench.py --sweeps 3 12    # a selection
    python benchmarks/sweep_bench.py --depth          # compile time against depth only
    python benchmarks/sweep_bench.py --quick          # seconds: checks the bookkeeping only
    python benchmarks/sweep_bench.py --sweeps 12 --no-basic   # vgrad against plain JAX only

Each sweep runs as a user runs it: ``python -m vgrad.train -m ...`` in a fresh process
(process start, Hydra, data, compilation, training and writing included), with the
persistent compilation cache off, once with ``hydra/launcher=basic`` and once with the
default ``hydra/launcher=vgrad``, one after the other on the same machine. The sweeps
are the ``visualize`` preset ("Visualizing the vanishing gradient problem") over

- 3 jobs:  act=sigmoid,tanh,relu
- 12 jobs: act=sigmoid,tanh,relu,elu x init=normal,he_normal,glorot_uniform
- 48 jobs: act=sigmoid,tanh,relu,elu,gelu,swish x init=normal,glorot_uniform,he_normal,
  lecun_normal x optim.lr=1e-3,1e-2

For each: wall time of both, their ratio, the programs compiled, the summed compile and
train seconds of the jobs' ``summary.json`` (a group's are counted once; the basic
launcher's jobs reuse the programs of earlier jobs of the same structure), and the
training throughput of the grouped programs relative to the same jobs trained one by
one (seed-steps per second of training, compilation excluded; 1.0 = grouping costs
nothing at run time).

Against hand-written JAX (the 3- and 12-job sweeps, whose axes are act and init only;
``--no-plain`` skips it): ``plain_sweep.py``, a standalone JAX script that trains the
same members as one ``jit(vmap(scan))`` program with the statistics of ``plain_jax.py``
and writes one ``.npz`` per job, run as a fresh process (``python
benchmarks/plain_sweep.py --out DIR``) and timed end to end like the sweeps; the figure
is vgrad's sweep wall / the plain process's wall (1.0 = the framework costs nothing).
The vgrad sweep's wall is also split from its log's timestamps: process start to the
launcher's first line (Python, JAX, Hydra), composing the jobs, the programs (compile and
train, from the summaries; data and set-up the rest), writing the jobs' folders, exiting.

``--depth`` measures the compile time of the default program at depth 4, 25 and 100
(width 5) and whether depth 1000 runs at all (width 32, one epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SWEEPS = {
    3: ["act=sigmoid,tanh,relu"],
    12: ["act=sigmoid,tanh,relu,elu", "init=normal,he_normal,glorot_uniform"],
    48: ["act=sigmoid,tanh,relu,elu,gelu,swish",
         "init=normal,glorot_uniform,he_normal,lecun_normal", "optim.lr=1e-3,1e-2"],
}
COMMON = ["+experiment=visualize", "compile_cache=null", "progress=false"]
PLAIN = REPO / "benchmarks" / "plain_sweep.py"
LOG_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def log_phases(text: str, started: float, ended: float) -> dict:
    """Seconds between the launcher's log lines (wall-clock stamps, to the millisecond):
    ``start`` (process start to "Launching"), ``compose`` (to "... jobs to train in"),
    ``programs`` (to the last "program k of n"), ``write`` (to the last log line: the
    jobs' folders and the runs table), ``exit`` (to the process's end). None where a
    line is missing."""
    marks: dict[str, float] = {}
    for line in text.splitlines():
        m = LOG_STAMP.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        marks["last"] = t
        if "Launching" in line:
            marks.setdefault("launch", t)
        elif "jobs to train in" in line:
            marks["grouped"] = t
        elif re.search(r"program \d+ of \d+", line):
            marks["programs"] = t
    points = [started, *(marks.get(k) for k in ("launch", "grouped", "programs", "last")),
              ended]
    names = ["start_s", "compose_s", "programs_s", "write_s", "exit_s"]
    return {n: (b - a if a is not None and b is not None else None)
            for n, a, b in zip(names, points[:-1], points[1:], strict=True)}


def run_sweep(axes: list[str], launcher: str, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "vgrad.train", "-m", *COMMON, *axes, *extra,
           f"hydra/launcher={launcher}", f"hydra.sweep.dir={out}"]
    started = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    phases = log_phases(proc.stdout + "\n" + proc.stderr, started, started + wall)
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("*/summary.json"))]
    groups: dict[int, dict] = {}
    seed_steps = 0.0
    for s in summaries:
        t = s["timing"]
        key = t["group"]["id"] if launcher == "vgrad" else len(groups)
        groups.setdefault(key, {"compile_s": t["compile_s"], "run_s": t["run_s"],
                                "compiled": not t["group"].get("reused_program", False)})
        seed_steps += s["steps_per_epoch"] * s["epochs_done"] * len(s["seeds"])
    # (a program reused by a later job of the same process records no compile time)
    compile_s = sum(g["compile_s"] for g in groups.values())
    run_s = sum(g["run_s"] for g in groups.values())
    programs = sum(g["compiled"] for g in groups.values())
    return {"wall_s": wall, "jobs": len(summaries), "programs": programs,
            "compile_s": compile_s, "train_s": run_s,
            "seed_steps_per_train_s": seed_steps / run_s if run_s else None, "phases": phases}


def plain_args(axes: list[str]) -> list[str] | None:
    """plain_sweep.py's options for a sweep's axes; None if it cannot run them."""
    values = {"act": "sigmoid", "init": "normal"}  # the preset's, where not swept
    for axis in axes:
        key, swept = axis.split("=", 1)
        if key not in values:
            return None
        values[key] = swept
    return ["--acts", values["act"], "--inits", values["init"]]


def run_plain(args: list[str], out: Path, epochs: int | None) -> dict:
    """plain_sweep.py in a fresh process, timed end to end, with its own split."""
    cmd = [sys.executable, str(PLAIN), "--out", str(out), *args]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    split = json.loads((out / "timing.json").read_text())
    return {"wall_s": wall, **split,
            "outside_s": wall - split["in_process_s"]}  # interpreter start and exit


def bench_sweeps(sizes: list[int], extra: list[str], basic_too: bool = True,
                 plain_too: bool = True, epochs: int | None = None) -> list[dict]:
    rows = []
    for n in sizes:
        plain_opts = plain_args(SWEEPS[n]) if plain_too else None
        with tempfile.TemporaryDirectory() as tmp:
            basic = run_sweep(SWEEPS[n], "basic", Path(tmp) / "basic", extra) \
                if basic_too else None
            grouped = run_sweep(SWEEPS[n], "vgrad", Path(tmp) / "vgrad", extra)
            plain = run_plain(plain_opts, Path(tmp) / "plain", epochs) \
                if plain_opts is not None else None
        row = {"jobs": n, "basic": basic, "vgrad": grouped, "plain": plain,
               "speedup": basic["wall_s"] / grouped["wall_s"] if basic else None,
               "train_throughput_ratio": grouped["seed_steps_per_train_s"]
               / basic["seed_steps_per_train_s"] if basic else None,
               "vgrad_over_plain": grouped["wall_s"] / plain["wall_s"] if plain else None}
        rows.append(row)
        line = f"{n:>3} jobs  "
        if basic:
            line += (f"basic {basic['wall_s']:7.1f} s ({basic['programs']} programs, "
                     f"compile {basic['compile_s']:6.1f} s, train {basic['train_s']:5.2f} s)   ")
        line += (f"vgrad {grouped['wall_s']:6.1f} s ({grouped['programs']} program(s), compile "
                 f"{grouped['compile_s']:5.1f} s, train {grouped['train_s']:5.2f} s)")
        if basic:
            line += (f"   speed-up {row['speedup']:5.1f}x   grouped/one-by-one training "
                     f"throughput {row['train_throughput_ratio']:.2f}")
        if plain:
            line += (f"   plain JAX process {plain['wall_s']:5.1f} s (compile "
                     f"{plain['compile_s']:4.1f} s, train {plain['train_s']:5.2f} s)   "
                     f"vgrad / plain {row['vgrad_over_plain']:.2f}")
        print(line, flush=True)
        ph = grouped["phases"]
        if None not in ph.values():
            rest = ph["programs_s"] - grouped["compile_s"] - grouped["train_s"]
            print(f"      vgrad sweep: start {ph['start_s']:.2f} s, composing jobs "
                  f"{ph['compose_s']:.2f} s, programs {ph['programs_s']:.2f} s (compile "
                  f"{grouped['compile_s']:.2f}, train {grouped['train_s']:.2f}, data and "
                  f"set-up {rest:.2f}), job folders {ph['write_s']:.2f} s, exit "
                  f"{ph['exit_s']:.2f} s", flush=True)
        if plain:
            print(f"      plain process: start and exit {plain['outside_s']:.2f} s, imports "
                  f"and JAX start {plain['imports_s']:.2f} s, data {plain['data_s']:.2f} s, "
                  f"compile {plain['compile_s']:.2f} s, train {plain['train_s']:.2f} s, "
                  f"write {plain['write_s']:.2f} s ({plain['devices']} device(s))", flush=True)
    return rows


def compile_seconds(overrides: list[str]) -> dict:
    """compile_s and run_s of one run of the default program, in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "vgrad.train", "compile_cache=null", "progress=false",
               *overrides, f"hydra.run.dir={tmp}/run"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        t = json.loads((Path(tmp) / "run" / "summary.json").read_text())["timing"]
    return {"compile_s": t["compile_s"], "run_s": t["run_s"], "wall_s": wall}


def bench_depth(quick: bool) -> dict:
    depths = [4, 25] if quick else [4, 25, 100]
    rows = {}
    for d in depths:
        rows[d] = compile_seconds([f"depth={d}", "epochs=2"])
        print(f"depth {d:>4} width 5: compile {rows[d]['compile_s']:5.1f} s", flush=True)
    ratio = rows[depths[-1]]["compile_s"] / rows[4]["compile_s"]
    print(f"compile time, depth {depths[-1]} / depth 4: {ratio:.2f}", flush=True)
    deep = None
    if not quick:
        deep = compile_seconds(["depth=1000", "width=32", "epochs=1", "act=tanh",
                                "init=variance_scaling"])
        print(f"depth 1000 width 32: compile {deep['compile_s']:.1f} s, one epoch "
              f"{deep['run_s']:.2f} s", flush=True)
    return {"by_depth": rows, "ratio": ratio, "depth_1000": deep}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", type=int, nargs="+", default=sorted(SWEEPS),
                        choices=sorted(SWEEPS))
    parser.add_argument("--depth", action="store_true", help="only the compile-vs-depth rows")
    parser.add_argument("--quick", action="store_true",
                        help="2 epochs, the 3-job sweep and depths 4 and 25: a smoke test")
    parser.add_argument("--no-basic", action="store_true",
                        help="skip Hydra's basic launcher (vgrad's and plain JAX only)")
    parser.add_argument("--no-plain", action="store_true",
                        help="skip the hand-written JAX process (plain_sweep.py)")
    parser.add_argument("--no-depth", action="store_true", help="skip the compile-vs-depth rows")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    extra = ["epochs=2"] if args.quick else []
    print(f"# {platform.node()}: {os.cpu_count()} CPU(s), {platform.platform()}, load "
          f"average {os.getloadavg()[0]:.2f}; compilation cache off, process start included",
          flush=True)
    result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                    "date": datetime.now().isoformat(timespec="seconds"),
                    "load_before": os.getloadavg()}
    if not args.depth:
        result["sweeps"] = bench_sweeps([3] if args.quick else args.sweeps, extra,
                                        basic_too=not args.no_basic,
                                        plain_too=not args.no_plain,
                                        epochs=2 if args.quick else None)
    if args.depth or not args.no_depth:
        result["depth"] = bench_depth(args.quick)
    result["load_after"] = os.getloadavg()
    print(f"# load average after: {result['load_after'][0]:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
