"""vgrad: measure vanishing and exploding gradients layer by layer.

``python -m vgrad.train`` trains a Flax network (an MLP or a residual MLP: ``vgrad.models``)
with a jit-compiled optax step that returns its gradient pytree every step, reduces it to
per-layer statistics inside the compiled program, and writes a self-describing run
folder. See the README for the output contract.

On import, vgrad asks XLA for one CPU device per core (``VGRAD_HOST_DEVICES``, default:
the cores this process may use; ``1`` turns it off), so that the seeds of a run are
split across the cores like across several GPUs: XLA runs a small network's operations
on one core per device, and a run of 100 seeds went 1.9x faster on 2 cores. It only
takes effect if JAX's CPU backend has not started yet and ``XLA_FLAGS`` does not already
set ``--xla_force_host_platform_device_count``; GPUs are unaffected.
"""

import os

__version__ = "0.1.0"


def _request_host_devices() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    count = int(os.environ.get("VGRAD_HOST_DEVICES", cores or 1))
    if count > 1:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


_request_host_devices()


def __getattr__(name: str):
    """``vgrad.api`` on first use (``import vgrad`` stays light)."""
    if name == "api":
        import importlib

        return importlib.import_module("vgrad.api")
    raise AttributeError(f"module 'vgrad' has no attribute {name!r}")
