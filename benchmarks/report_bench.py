#!/usr/bin/env python
"""How long a sweep's report takes beside the sweep itself.

    python benchmarks/report_bench.py                     # the 4- and 130-run sweeps
    python benchmarks/report_bench.py --cases 4 130 1000  # a selection (1000: ~20 min here)
    python benchmarks/report_bench.py --sweep DIR [DIR ...]   # reports of existing sweeps
    python benchmarks/report_bench.py --cases 4 --profile     # and what the report spends on

Each case trains its sweep as a user does (``python -m vgrad.train -m ...`` in a fresh
process, the persistent compilation cache as configured), then writes its report in a
fresh process (``write_report``: imports, loading, theory, drawing and saving every
figure, the page), and prints the wall seconds of both, the CPU seconds of the report
(its drawing processes included: on a shared machine the steadier number) and the
figures written. The sweeps:

- ``4``: four activations (sigmoid, tanh, relu, elu) of a He-initialised 6 x 32 MLP on
  circles, 20 epochs, every default probe: each run draws its five figures, and the
  profile figure draws the mean-field prediction of each line (elu: the reference
  quadrature);
- ``130``: the ``phase_diagram`` preset as its header gives it: tanh, width 100,
  sigma_w^2 = 1 ... 4 (13 values) x depth 10 ... 100 (10 values), standardised digits,
  6 epochs (the phase diagram, the signal-theory figure, the profile with 130 lines);
- ``1000``: the same preset on a denser grid that trains in minutes: sigma_w^2 = 1 ...
  4.96 in steps of 0.04 (100 values) x depth 10 ... 100, width 32, 2 epochs.

``--runs all`` draws every run's figures instead of the report's default
(representative runs of a sweep longer than ``report.MAX_RUN_FIGURES``). Sweeps are
written under ``--root`` (default a temporary folder, removed at the end unless
``--keep``). Timings depend on the machine and what else runs on it: the output starts
with the core count and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CASES: dict[str, list[str]] = {
    "4": ["act=sigmoid,tanh,relu,elu", "init=he_normal", "depth=6", "width=32",
          "epochs=20"],
    "130": ["+experiment=phase_diagram", "init.sigma_w2=range(1,4.25,0.25)",
            "depth=range(10,101,10)"],
    "1000": ["+experiment=phase_diagram", "init.sigma_w2=range(1,5,0.04)",
             "depth=range(10,101,10)", "width=32", "epochs=2"],
}

#: The report, in a fresh process; prints one JSON line (and the profile, if asked).
_REPORT = """
import cProfile, json, pstats, sys, time
from vgrad.analysis.report import write_report
sweep, out, runs, profile = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
runs = json.loads(runs) if runs.startswith("[") else runs
start = time.perf_counter()
prof = cProfile.Profile() if profile else None
if prof:
    prof.enable()
write_report(sweep, out, runs=runs)
if prof:
    prof.disable()
seconds = time.perf_counter() - start
if prof:
    pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(30)
print(json.dumps({"write_report_s": seconds}))
"""


def train(overrides: list[str], out: Path) -> float:
    cmd = [sys.executable, "-m", "vgrad.train", "-m", *overrides, "progress=false",
           f"hydra.sweep.dir={out}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall


def report(sweep: Path, out: Path, runs: str, profile: bool) -> dict:
    if out.exists():
        shutil.rmtree(out)
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-c", _REPORT, str(sweep), str(out), runs,
                           "1" if profile else "0"], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"the report of {sweep} failed:\n{proc.stderr[-3000:]}")
    inner = json.loads(proc.stdout.strip().splitlines()[-1])
    figures = out / "figures"
    page = (out / "index.html").read_text()
    return {"report_s": wall, "report_cpu_s": cpu, **inner,
            "sweep_figures": len(list(figures.glob("sweep_*.png"))),
            "run_figures": len(list(figures.glob("run_*.png"))),
            "runs_drawn": page.count('<section id="run-'),
            "profile": proc.stderr if profile else ""}


def runs_in(sweep: Path) -> int:
    return sum(1 for _ in sweep.rglob("summary.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["4", "130"])
    parser.add_argument("--sweep", nargs="+", type=Path, default=[],
                        help="existing sweep folders: time their reports, train nothing")
    parser.add_argument("--runs", default="representative",
                        help="representative (default), all, or a JSON list of run names")
    parser.add_argument("--profile", action="store_true",
                        help="print the report's top functions (cProfile, main process)")
    parser.add_argument("--root", type=Path, help="where sweeps are written")
    parser.add_argument("--keep", action="store_true", help="keep the sweeps and reports")
    args = parser.parse_args()

    print(f"{platform.node()}: {os.cpu_count()} cores, load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())} (1, 5, 15 min), "
          f"Python {platform.python_version()}", flush=True)
    root = args.root or Path(tempfile.mkdtemp(prefix="vgrad-report-bench-"))
    jobs = ([(str(s), s, None) for s in args.sweep] if args.sweep
            else [(c, root / f"sweep_{c}", CASES[c]) for c in args.cases])
    rows = []
    try:
        for name, sweep, overrides in jobs:
            train_s = train(overrides, sweep) if overrides is not None else None
            result = report(sweep, root / f"report_{Path(name).name}" if args.sweep
                            else sweep / "report", args.runs, args.profile)
            row = {"case": name, "runs": runs_in(sweep), "train_s": train_s, **result}
            rows.append(row)
            print(f"{name}: {row['runs']} runs; train "
                  f"{'(reused)' if train_s is None else f'{train_s:.1f} s'}; report "
                  f"{row['report_s']:.1f} s (write_report {row['write_report_s']:.1f} s; "
                  f"CPU {row['report_cpu_s']:.1f} s, workers included): "
                  f"{row['sweep_figures']} sweep figures, {row['run_figures']} run figures "
                  f"of {row['runs_drawn']} runs; load average "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
            if args.profile:
                print(row["profile"])
    finally:
        if not args.keep and args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps([{k: v for k, v in r.items() if k != "profile"} for r in rows]))


if __name__ == "__main__":
    main()
