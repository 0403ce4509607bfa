#!/usr/bin/env python
"""What a sweep of many short jobs costs per job: wall time against compile and train time.

    python benchmarks/per_job_bench.py                 # 200 and 1,000 jobs
    python benchmarks/per_job_bench.py --jobs 200 --repo /path/to/other/checkout

A sweep of thousands of short runs (2 activations x N/2 learning rates of the
``visualize`` preset, 10 epochs, 1 seed: ``+experiment=visualize act=sigmoid,tanh
"optim.lr=range(...)"``) runs as a user runs it, ``python -m vgrad.train -m ...`` in a
fresh process with the persistent compilation cache off. Its wall time is set against
the compile and train seconds its programs report (``summary.json`` timing, each group
counted once): the rest is what the sweep spends per job (composing, validating and
writing jobs). ``--repo`` runs another checkout's code (a worktree of an earlier
commit), for a before/after comparison on the same machine; run the two one after the
other on an otherwise idle machine (each row ends with the 1-minute load average after
its sweep: on 2 cores, another busy process inflates every column).

Where a job's milliseconds went (2 cores, 200 jobs, ``py-spy``): before, Hydra's
``run_job`` (~40 ms: four copies of the config for ``HydraConfig`` and the job's own
config, then ``.hydra/``'s three yaml files) and composing (~30 ms: a copy of the
composed config, another without its hydra node, ``HydraConfig``'s copy); vgrad's
launcher now takes ``run_job``'s steps without its copies (``_run_job``, same files byte
for byte), writes the yaml of what jobs share once, parses each distinct override once,
and keeps the garbage collector from rescanning the process while composing. What is
left per job: composing (one copy of the config, ~5 ms), validating and preparing
(``vgrad.runner.prepare``), writing the run folder twice (first chunk, end), the job
log's set-up and the task function's report. (``vgrad.group.group_jobs``'s batching
was quadratic in a group's jobs, 6 s at 1,000: now linear.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sweep(repo: Path, jobs: int, out: Path) -> dict:
    lrs = jobs // 2
    step = 0.0001
    cmd = [sys.executable, "-m", "vgrad.train", "-m", "+experiment=visualize",
           "act=sigmoid,tanh", f"optim.lr=range({step},{step * (lrs + 0.5):.6f},{step})",
           "epochs=10", "seeds=1", "progress=false", "compile_cache=null",
           f"hydra.sweep.dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    groups: dict[str, dict] = {}
    runs = 0
    for summary in out.glob("*/summary.json"):
        s = json.loads(summary.read_text())
        runs += 1
        group = s["timing"]["group"]
        groups.setdefault(str(group.get("id")), s["timing"])
    compile_s = sum(t["compile_s"] for t in groups.values())
    train_s = sum(t["run_s"] for t in groups.values())
    return {"jobs": runs, "wall_s": wall, "compile_s": compile_s, "train_s": train_s,
            "other_s": wall - compile_s - train_s,
            "per_job_ms": 1e3 * (wall - compile_s - train_s) / runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = []
    print(f"per_job_bench: {args.repo}, "
          f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}, "
          f"{os.cpu_count()} cores, load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'jobs':>6} | {'wall s':>7} | {'compile s':>9} | {'train s':>7} | "
          f"{'other s':>7} | {'ms per job':>10} | {'load':>4}")
    for n in args.jobs:
        with tempfile.TemporaryDirectory() as tmp:
            r = sweep(args.repo, n, Path(tmp) / "sweep")
        rows.append(r)
        print(f"{r['jobs']:>6} | {r['wall_s']:>7.1f} | {r['compile_s']:>9.1f} | "
              f"{r['train_s']:>7.1f} | {r['other_s']:>7.1f} | {r['per_job_ms']:>10.0f} | "
              f"{os.getloadavg()[0]:>4.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
