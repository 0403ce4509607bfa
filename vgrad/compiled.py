"""Compiled programs: devices, sharding, ahead-of-time compilation and the program cache.

A group's members are split along one mesh axis across the devices that divide them
evenly (:func:`member_mesh`, :func:`shard_members`); its datasets sit whole on every
device (:func:`device_data`). :class:`Compiled` holds a :class:`~vgrad.program.Program`'s
jitted entry points, compiled ahead of time with vgrad's XLA options
(:func:`compiler_options`), and :func:`compile_program` keeps the compiled programs of
this process for later groups of the same structure (``_CACHE``, at most
``MAX_PROGRAMS``).
"""

from __future__ import annotations

import collections
import functools
import json
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vgrad import probes, views
from vgrad.data import Dataset
from vgrad.group import Group, Members, family, structure
from vgrad.program import Program
from vgrad.views import DeviceData

# --- devices and data on them -----------------------------------------------------------------


def device_data(datasets: list[Dataset], probe_size: int, mesh: Mesh,
                dtype: str = "float32") -> DeviceData:
    """The datasets on every device of ``mesh`` (each holds a whole copy), inputs in
    ``dtype``; one dataset as is, several stacked on a leading axis."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def arrays(ds: Dataset) -> tuple[np.ndarray, ...]:
        x_train, x_test = ds.x_train.astype(dtype), ds.x_test.astype(dtype)
        block = views.EVAL_BLOCK
        return (views.pad_to_blocks(x_train, block), views.pad_to_blocks(ds.y_train, block),
                views.pad_to_blocks(x_test, block), views.pad_to_blocks(ds.y_test, block),
                x_train[:probe_size], ds.y_train[:probe_size])

    parts = [arrays(ds) for ds in datasets]
    joined = parts[0] if len(parts) == 1 else [np.stack(a) for a in zip(*parts, strict=True)]
    return DeviceData(*(jax.device_put(a, replicated) for a in joined))


def trains_on_one_device(group: Group) -> bool:
    """Whether ``group`` trains on one device: on CPUs, when one of its epoch probes
    needs what hangs split across devices (``vgrad.probes.ONE_CPU_DEVICE``)."""
    needs = probes.needs(probes.EPOCH_PROBES, group.cfg.record.epoch_probes)
    return jax.default_backend() == "cpu" and bool(needs & probes.ONE_CPU_DEVICE)


def member_mesh(n_members: int, one_device: bool = False) -> Mesh:
    """The devices the member axis is split across: as many as divide ``n_members``
    evenly (all of them when they do), so each device trains an equal share; only the
    first with ``one_device``."""
    devices = jax.devices()[:1] if one_device else jax.devices()
    count = max(d for d in range(1, len(devices) + 1) if n_members % d == 0)
    return Mesh(np.array(devices[:count]), ("members",))


def shard_members(tree: Any, mesh: Mesh) -> Any:
    """Place (or, for ShapeDtypeStructs, describe) an [M, ...] pytree split along members."""
    sharding = NamedSharding(mesh, PartitionSpec("members"))

    def place(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return jax.device_put(x, sharding)

    return jax.tree.map(place, tree)


# --- compiled programs (cached per configuration) ---------------------------------------------


class Compiled:
    """A :class:`Program` with its jitted entry points, compiled ahead of time.

    The initialisation and chunk programs are traced and compiled one after the other.
    The chunk program is compiled once per distinct chunk length (one, unless
    ``record.chunk_epochs`` does not divide ``epochs``); ``compile_s`` accumulates.
    """

    def __init__(self, prog: Program, members: Members, data: DeviceData, mesh: Mesh):
        self.program = prog
        self.mesh = mesh
        self.compile_s = 0.0
        # Every output has the member axis first and stays split along it (without this,
        # XLA may replicate outputs that do not depend on the member, such as zero biases).
        by_member = NamedSharding(mesh, PartitionSpec("members"))

        def jit(fn: Callable, **kwargs: Any) -> Any:
            return jax.jit(_traced_at(prog.matmul_precision, fn), out_shardings=by_member,
                           compiler_options=compiler_options(), **kwargs)

        self._chunk_jit = jit(prog.chunk, static_argnums=4, donate_argnums=0)
        self._members, self._data = members, data
        t0 = time.perf_counter()
        start = jit(prog.start).lower(members, data)
        self._state = shard_members(jax.tree.map(
            lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype), start.out_info), mesh)
        n = prog.plan.chunk_epochs
        chunk = self._chunk_jit.lower(self._state, members, jnp.int32(0), data, n)
        # One after the other: compiling (and reading JAX's cache) in two threads at once
        # crashed the process in CI (segfaults inside XLA, not reproducible alone).
        self.start, first = start.compile(), chunk.compile()
        self._chunks: dict[int, Any] = {n: first}
        self.compile_s = time.perf_counter() - t0
        # The debugging engine's per-step pieces, compiled on first use (with the same
        # options, so that both engines give the same numbers).
        self.permutations = jit(prog.permutations)
        self.step = jit(prog.step, donate_argnums=0)
        self.epoch_stats = jit(prog.epoch_stats)

    def _compile(self, jitted: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        compiled = jitted.lower(*args).compile()
        self.compile_s += time.perf_counter() - t0
        return compiled

    def chunk(self, n_epochs: int) -> Any:
        """The compiled chunk program for ``n_epochs`` epochs."""
        if n_epochs not in self._chunks:
            self._chunks[n_epochs] = self._compile(
                self._chunk_jit, self._state, self._members, jnp.int32(0), self._data,
                n_epochs)
        return self._chunks[n_epochs]


def _traced_at(precision: str, fn: Callable) -> Callable:
    """``fn`` traced under ``jax.default_matmul_precision(precision)``: a jitted function
    keeps the matrix-product precision of its tracing, whenever it is first called."""
    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        with jax.default_matmul_precision(precision):
            return fn(*args, **kwargs)

    return traced


def compiler_options() -> dict[str, Any]:
    """XLA options for vgrad's programs.

    On CPU, LLVM optimisation level 1 instead of XLA's default 2: it compiles vgrad's
    programs 15-30% faster and they run as fast (measured on the ``visualize`` preset's
    net at 1 and 100 seeds, and a 64-512x4-10 ReLU net: run times within 1%, while level
    0 runs 2.5x slower). Matrix products call Eigen/oneDNN kernels either way, and the
    rest is small fused loops. Other backends keep XLA's defaults, and so does
    ``jax_disable_most_optimizations`` (level 0: the tests' fast compiles).
    """
    if jax.default_backend() != "cpu" or jax.config.read("jax_disable_most_optimizations"):
        return {}
    return {"xla_backend_optimization_level": 1}


#: Compiled programs kept in this process, most recently used last (see MAX_PROGRAMS).
_CACHE: collections.OrderedDict[str, Compiled] = collections.OrderedDict()
#: At most this many compiled programs stay loaded in one process. Each program XLA
#: compiles for the CPU maps about 700 memory regions (LLVM's JIT), and Linux allows a
#: process 65,530 (``vm.max_map_count``): a process that kept every program segfaulted
#: inside XLA's compiler after about 90 of them (seen in the test suite, whose workers
#: train hundreds of programs). Evicting the least recently used program releases them.
MAX_PROGRAMS = 16


def _cache_key(group: Group) -> str:
    """Everything that shapes a group's program: the structure and data shapes of its
    jobs, the families it selects from, the knobs it takes, and the member count."""
    ds = group.datasets[0]
    families = {g: [family(f, g) for f in fs] for g, fs in group.families.items()}
    return json.dumps([structure(group.jobs[0].config),
                       [ds.x_train.shape, ds.x_test.shape, ds.n_classes],
                       families, group.knob_keys, group.n_members, len(group.datasets),
                       jax.default_backend()], sort_keys=True, default=str)


def compile_program(group: Group, members: Members, data: DeviceData,
                    mesh: Mesh) -> tuple[Compiled, bool]:
    """The compiled programs of a group, reused by later groups of this process that
    share its cache key (other knob values, seeds or data values); and whether they
    were reused."""
    key = _cache_key(group) + repr(mesh.devices.tolist())
    reused = key in _CACHE
    if reused:
        _CACHE.move_to_end(key)
    else:
        while len(_CACHE) >= MAX_PROGRAMS:
            _CACHE.popitem(last=False)
        _CACHE[key] = Compiled(Program(group, mesh.devices.size), members, data, mesh)
    return _CACHE[key], reused
