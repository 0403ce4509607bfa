#!/usr/bin/env python
"""Where a training step's time goes on the device: a profile of one compiled chunk.

    python benchmarks/gpu_profile.py                          # 1,000 seeds, visualize net
    python benchmarks/gpu_profile.py --seeds 100 --programs plain default
    python benchmarks/gpu_profile.py --json prof.json --keep /tmp/traces

Each program (``plain``: the hand-written JAX of ``plain_jax.py``; ``same``: vgrad
recording the same statistics; ``default``: vgrad's default probes) is compiled for
the ``visualize`` preset's net at ``--seeds`` members, run once to warm up, then run
again under ``jax.profiler`` (a Perfetto trace). The trace's device events are summed by
kernel: launches per training step, total and mean time, share of the device's busy
time, and where the kernel comes from in JAX (the ``op_name`` the optimised HLO keeps
for the instruction: forward, backward, the optimizer, the divergence guard, a probe,
a record write). On a GPU the events are the kernels on the device's streams; on a CPU
they are the XLA thunks run by the host's threads (a check of the bookkeeping, and a
profile of the CPU program). ``--keep`` keeps the trace for Perfetto or TensorBoard.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_count  # noqa: E402

STEPS_PER_EPOCH = 31  # 1,000 circles points, batch 32, the last partial batch dropped
#: Where an instruction comes from, by its JAX op_name (first match wins).
CATEGORIES = (
    ("guard", ("/guard/", "(guard)/")),  # vgrad.step's named scope (vmap: vmap(guard))
    ("record write", ("dynamic_update_slice", "dynamic_update_index")),
    ("backward", ("transpose(jvp",)),
    ("forward", ("jvp(",)),
    ("selects", ("_where", "select_n", "is_finite")),
    ("optimizer", ("rsqrt", "sqrt", "/add", "/mul", "/sub")),
    ("reductions (probes)", ("reduce_", "argmax", "argmin")),
    ("batch gather", ("gather", "dynamic_slice")),
)


def _program(name: str, seeds: int, epochs: int):
    """(run, hlo text, devices used): ``run()`` trains ``epochs`` epochs of ``seeds`` members and
    blocks until the device is done (twice at most: a warm-up and the profiled run)."""
    if name == "plain":
        compiled, args = kernel_count.plain_program(seeds, epochs)
        return ((lambda: jax.block_until_ready(compiled(args))), compiled.as_text(),
                len(args.sharding.device_set))
    extra = kernel_count.SAME_WORK if name == "same" else []
    compiled, members, data = kernel_count.vgrad_program(extra, seeds, epochs)
    chunk = compiled.chunk(epochs)
    states = [compiled.start(members, data) for _ in range(2)]  # (a chunk donates it)
    return ((lambda: jax.block_until_ready(chunk(states.pop(), members, jnp.int32(0), data))),
            chunk.as_text(), compiled.mesh.devices.size)


#: Instructions whose events enclose other kernels' (a CPU trace times them too).
CONTAINERS = {"while", "conditional", "call"}


def instructions(hlo: str) -> dict[str, tuple[str, str]]:
    """Each instruction's opcode and JAX op_name, by instruction name."""
    out = {}
    for line in hlo.splitlines():
        m = kernel_count._INSTRUCTION.match(line)
        if m:
            name = line.split("=")[0].strip().removeprefix("ROOT ").lstrip("%")
            op = re.search(r'op_name="([^"]+)"', line)
            out[name] = (m.group(1), op.group(1) if op else "")
    return out


def category(op_name: str) -> str:
    for label, keys in CATEGORIES:
        if any(k in op_name for k in keys):
            return label
    return "other"


def device_events(trace: dict) -> list[dict]:
    """The kernels of a Perfetto trace: on a GPU the events of the device processes, on a
    CPU the XLA thunks of the host's XLA threads."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    gpu = {pid for pid, n in names.items() if n.startswith("/device:GPU")}
    out = []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if gpu:
            if e["pid"] in gpu and "Stream" in threads.get((e["pid"], e.get("tid")), "Stream"):
                out.append(e)
        elif (threads.get((e["pid"], e.get("tid")), "").startswith("tf_XLA")
              and "::" not in e["name"] and not e["name"].startswith("end: ")):
            out.append(e)
    return out


def summarise(events: list[dict], hlo: str, steps: int, top: int) -> dict:
    ops = instructions(hlo)
    by_kernel: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        key = e.get("args", {}).get("hlo_op") or e["name"]
        if ops.get(key, ("",))[0] not in CONTAINERS and key.split(".")[0] not in CONTAINERS:
            by_kernel[key].append(float(e["dur"]))
    events = [d for durs in by_kernel.values() for d in durs]
    busy = sum(sum(v) for v in by_kernel.values()) or 1.0
    rows = []
    for key, durs in by_kernel.items():
        op = ops.get(key, ("", ""))[1]
        rows.append({"kernel": key, "launches_per_step": len(durs) / steps,
                     "total_ms": sum(durs) / 1e3, "mean_us": sum(durs) / len(durs),
                     "share": sum(durs) / busy, "category": category(op), "op_name": op})
    rows.sort(key=lambda r: -r["total_ms"])
    shares: dict[str, float] = collections.Counter()
    for r in rows:
        shares[r["category"]] += r["share"]
    return {"busy_ms": busy / 1e3, "launches_per_step": len(events) / steps,
            "categories": dict(shares.most_common()), "kernels": rows[:top]}


def profile(name: str, seeds: int, epochs: int, top: int, keep: Path | None) -> dict:
    run, hlo, devices = _program(name, seeds, epochs)
    run()  # compiled above; warm up
    folder = Path(keep) / name if keep else Path(tempfile.mkdtemp())
    t0 = datetime.datetime.now()
    with jax.profiler.trace(str(folder), create_perfetto_trace=True):
        run()
    wall = (datetime.datetime.now() - t0).total_seconds()
    traces = sorted(folder.glob("**/perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    with gzip.open(traces[-1]) as f:
        trace = json.load(f)
    # (every device runs every kernel: per step means per step and device)
    summary = summarise(device_events(trace), hlo, epochs * STEPS_PER_EPOCH * devices, top)
    return {"program": name, "seeds": seeds, "epochs": epochs, "wall_s": wall, **summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--programs", nargs="+", default=["plain", "same", "default"],
                        choices=["plain", "same", "default"])
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", type=Path, help="keep the traces under this folder")
    args = parser.parse_args(argv)
    print(f"gpu_profile: visualize net, {args.seeds} seeds, {args.epochs} epochs "
          f"({args.epochs * STEPS_PER_EPOCH} steps), {datetime.date.today()}, "
          f"JAX {jax.__version__}, devices {jax.devices()}")
    results = []
    for name in args.programs:
        r = profile(name, args.seeds, args.epochs, args.top, args.keep)
        results.append(r)
        print(f"\n== {name}: wall {r['wall_s']:.3f} s, device busy {r['busy_ms']:.1f} ms, "
              f"{r['launches_per_step']:.0f} kernels launched per step")
        print("   by origin: " + ", ".join(f"{k} {v:.0%}" for k, v in r["categories"].items()))
        print(f"   {'kernel':<42} {'/step':>6} {'total ms':>9} {'mean us':>8} {'share':>6}  origin")
        for k in r["kernels"]:
            print(f"   {k['kernel'][:42]:<42} {k['launches_per_step']:>6.1f} "
                  f"{k['total_ms']:>9.2f} {k['mean_us']:>8.1f} {k['share']:>6.1%}  "
                  f"{k['category']}: {k['op_name'][-60:]}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
