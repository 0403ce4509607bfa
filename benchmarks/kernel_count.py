#!/usr/bin/env python
"""XLA kernels in one compiled training step: hand-written JAX against vgrad.

    python benchmarks/kernel_count.py                 # 100 seeds, the visualize net
    python benchmarks/kernel_count.py --seeds 1000

A figure that predicts GPU cost and can be checked without a GPU: on a GPU each
top-level instruction of the step's loop body is (at least) one kernel launch, and at
thousands of seeds a small net's step is launch-bound. The programs are compiled for the
host's CPU (the member axis split over its devices as in a run) and their optimised HLO
is read: the step is the body of the innermost ``while`` (the scan over an epoch's
steps; vgrad's step loop may branch, ``record.every``, and the branches' instructions
are counted too). Counted: every instruction of the body and of the computations it
calls other than fusions' insides (a fusion is one kernel), less parameters, constants,
tuples, get-tuple-element and bitcasts (no kernel). Rows:

- ``plain``: ``plain_jax.py``, the hand-written program computing the same gradient
  statistics as the ``same work`` row records;
- ``same work``: vgrad recording what ``plain`` computes (``record.step_probes=
  [global_norms,kernel_grad_stats,bias_grad_norm] record.epoch_probes=[evaluation,
  weight_stats]``);
- ``default``: vgrad with its default probes;
- ``+ gradient_noise``: the default probes and the per-example statistics.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plain_jax  # noqa: E402
from bench import compose_cfg  # noqa: E402

from vgrad import group as vgroup  # noqa: E402
from vgrad import runner  # noqa: E402
from vgrad.compiled import (  # noqa: E402
    Compiled,
    device_data,
    member_mesh,
    shard_members,
    trains_on_one_device,
)
from vgrad.program import Program  # noqa: E402

SAME_WORK = ["record.step_probes=[global_norms,kernel_grad_stats,bias_grad_norm]",
             "record.epoch_probes=[evaluation,weight_stats]"]
NO_KERNEL = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = [^=]*? ([a-z\-]+)\(")


def computations(hlo: str) -> dict[str, list[str]]:
    """Each computation's instruction lines, by name."""
    out: dict[str, list[str]] = {}
    name = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)  # (at column 0)
        if head:
            name = head.group(1)
            out[name] = []
        elif name is not None and line.strip() and line.strip() != "}":
            out[name].append(line)
    return out


def _called(line: str) -> list[str]:
    names = []
    for key in ("body", "condition", "to_apply", "branch_computations", "true_computation",
                "false_computation", "calls"):
        m = re.search(key + r"=\{?([^,}\s]+(?:, *%?[\w.\-]+)*)\}?", line)
        if m:
            names += [n.strip().lstrip("%") for n in m.group(1).split(",")]
    return names


def kernels(name: str, comps: dict[str, list[str]]) -> collections.Counter:
    """Kernels of computation ``name`` and of what it calls (fusions count once)."""
    count: collections.Counter = collections.Counter()
    for line in comps[name]:
        m = _INSTRUCTION.match(line)
        if not m or m.group(1) in NO_KERNEL:
            continue
        op = m.group(1)
        count[op] += 1
        if op in ("while", "conditional", "call"):
            for sub in _called(line):
                if sub in comps:
                    count.update(kernels(sub, comps))
    return count


def step_kernels(hlo: str) -> collections.Counter:
    """The kernels of the innermost while loop's body (the training step)."""
    comps = computations(hlo)
    bodies = [b for lines in comps.values() for line in lines if " while(" in line
              for b in [re.search(r"body=%?([\w.\-]+)", line).group(1)]]

    def has_while(name: str, seen=()) -> bool:
        for line in comps[name]:
            if " while(" in line:
                return True
            for sub in _called(line):
                if sub in comps and sub not in seen and "fused" not in sub and has_while(
                        sub, (*seen, name)):
                    return True
        return False

    inner = [b for b in bodies if not has_while(b)]
    # the step loop: the innermost body with the most work (vgrad's init has small loops)
    return max((kernels(b, comps) for b in inner), key=lambda c: sum(c.values()))


def vgrad_program(overrides: list[str], seeds: int, epochs: int = 2
                  ) -> tuple[Compiled, Any, Any]:
    """vgrad's program for ``seeds`` members of the ``visualize`` run (``overrides``
    added), placed as a run places it: (compiled, members, device data)."""
    cfg = compose_cfg("+experiment=visualize", "progress=false", f"seeds={seeds}",
                      f"epochs={epochs}", *overrides)
    with tempfile.TemporaryDirectory() as tmp:
        job = runner.prepare(cfg, Path(tmp))
    group = vgroup.group_jobs([job])[0]
    mesh = member_mesh(group.n_members, trains_on_one_device(group))
    data = device_data(group.datasets, cfg.record.probe_size, mesh)
    members = shard_members(group.members(), mesh)
    return Compiled(Program(group, mesh.devices.size), members, data, mesh), members, data


def plain_program(seeds: int, epochs: int = 2) -> tuple[Any, Any]:
    """``plain_jax.py``'s program for ``seeds`` members, compiled: (executable, its
    argument, the seeds split as a run splits its members)."""
    from vgrad import data

    ds = data.load(compose_cfg("+experiment=visualize").data)
    fn = plain_jax.make_train(jnp.asarray(ds.x_train), jnp.asarray(ds.y_train), epochs, 32)
    args = shard_members(jnp.arange(seeds), member_mesh(seeds))
    return fn.lower(args).compile(), args


def vgrad_hlo(overrides: list[str], seeds: int) -> str:
    compiled, _, _ = vgrad_program(overrides, seeds)
    return compiled.chunk(compiled.program.plan.chunk_epochs).as_text()


def plain_hlo(seeds: int) -> str:
    return plain_program(seeds)[0].as_text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=100)
    args = parser.parse_args(argv)
    default = list(compose_cfg("+experiment=visualize").record.step_probes)
    rows = {"plain": plain_hlo(args.seeds),
            "same work": vgrad_hlo(SAME_WORK, args.seeds),
            "default": vgrad_hlo([], args.seeds),
            "+ gradient_noise": vgrad_hlo(
                [f"record.step_probes=[{','.join([*default, 'gradient_noise'])}]"],
                args.seeds)}
    print(f"kernel_count: visualize net, {args.seeds} seeds, "
          f"{datetime.date.today()}, JAX {jax.__version__}, {os.cpu_count()} cores, "
          f"devices {len(jax.devices())} x {jax.devices()[0].platform}")
    counts = {k: step_kernels(v) for k, v in rows.items()}
    plain = sum(counts["plain"].values())
    print(f"{'program':>18} | {'kernels':>7} | {'/ plain':>7} | {'fusion':>6} | "
          f"{'dot':>4} | {'copy':>4} | other")
    for key, c in counts.items():
        total = sum(c.values())
        other = {k: v for k, v in c.items() if k not in ("fusion", "dot", "copy")}
        print(f"{key:>18} | {total:>7} | {total / plain:>7.2f} | {c['fusion']:>6} | "
              f"{c['dot']:>4} | {c['copy']:>4} | "
              + ", ".join(f"{k} {v}" for k, v in sorted(other.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
