"""Shared fixtures: compose the real Hydra config with tiny overrides, run it in-process."""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# One CPU device per test process (set before vgrad asks XLA for one per core): the
# suite runs one pytest-xdist worker per core already, and two workers of two devices
# each oversubscribed CI's two cores; programs split across host devices also compile
# about 8% slower. (XLA segfaulted three times in CI while compiling such split programs,
# never reproducibly; whether one device avoids it is not established.) The test that
# compares one and two devices sets VGRAD_HOST_DEVICES itself.
os.environ.setdefault("VGRAD_HOST_DEVICES", "1")
# XLA's CPU fusion emitters off: the tests' programs compile ~40% faster (6.1 -> 3.6 s for
# a tiny default run, measured side by side) and run ~20% slower, which the tests never
# notice: compiling is most of the suite's time. Set before JAX starts; the CLI tests'
# subprocesses inherit it. (vgrad itself keeps XLA's default: for a user's long run the
# 20% matters more than the compile.)
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_use_fusion_emitters=false").strip()
# XLA's CPU code generation in one piece, not split into parallel parts: the split costs
# more than it gains on the suite's small programs and busy cores (backend compiles ~15%
# faster: 3.5 -> 2.9 s for three tiny default runs, alternated three times; the programs'
# numbers are bit-identical, 140 arrays of five configs compared). Inherited like the above.
if "xla_cpu_parallel_codegen_split_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_parallel_codegen_split_count=1").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from vgrad import compiled, group, loop, losses, models, optim, records, runner  # noqa: E402
from vgrad.step import init_state, make_train_step  # noqa: E402
from vgrad.train import CONF_DIR  # noqa: E402

# Compile time dominates tiny test runs; XLA's optimisations only cost time here (the
# environment variable carries this to the subprocesses the CLI tests start).
jax.config.update("jax_disable_most_optimizations", True)
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
# vgrad's programs run under matmul_precision=highest; the tests' own references and the
# steps they call directly must too: on GPUs JAX's default float32 matmul is TF32 (on an
# H200 it moved deltas and Jacobian singular values by up to 2e-3 relative).
jax.config.update("jax_default_matmul_precision", "highest")
# No persistent compilation cache in the suite: in CI, JAX's cache write and read each
# crashed a worker once (a segfault serialising or deserialising an executable, in
# different tests, not reproducible alone), so every process compiles its own programs
# (the subprocesses the CLI tests start read VGRAD_COMPILE_CACHE: empty is off).
os.environ["VGRAD_COMPILE_CACHE"] = ""
# Generated datasets are cached in the suite's own folder, not the user's.
os.environ["VGRAD_DATA_CACHE"] = str(Path(tempfile.gettempdir())
                                     / f"vgrad-test-data-cache-{os.getuid()}")


# Hydra configures logging with dictConfig, which closes every existing handler. absl's
# handler (absl comes with optax) holds the stream pytest's global capture had when it
# was imported and closes it unless it is sys.stderr at that moment, which under capsys
# it is not. Point it at the real stderr, which absl never closes.
absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__

#: Diverges at step 2 (loss 3e2, then 8e19, then inf): a deep linear net, lr too large.
DIVERGENT_CLI = ["act=linear", "depth=10", "width=16", "init.std=0.5", "optim=sgd",
                 "optim.lr=0.5", "data.n_samples=256", "epochs=3", "progress=false"]

#: Overrides that make any preset tiny: a few epochs of a small circles problem.
TINY = ["epochs=2", "data.n_samples=128", "progress=false"]

#: Few probes, for tests whose subject is not what is measured: the default probes
#: double a tiny program's compile time, most of these tests' cost.
LIGHT = ["record.step_probes=[global_norms]", "record.epoch_probes=[evaluation]"]


def compose_cfg(*overrides: str):
    """The real config composed from conf/ with ``overrides`` (as on the command line):
    a copy of this process's first composition of the same overrides (Hydra takes ~0.2 s
    to compose one, and a worker composes the same lists again and again)."""
    return copy.deepcopy(_composed(overrides))


@functools.cache
def _composed(overrides: tuple[str, ...]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("config", overrides=list(overrides))


def run_to_end(cfg, engine: str = "scan") -> records.Records:
    """Train a composed config in-process (a group of one job); return the final records."""
    return run_group([cfg], engine)[0]


def run_group(cfgs, engine: str = "scan") -> list[records.Records]:
    """Train composed configs of one structure as one group; each job's final records."""
    jobs = [runner.prepare(cfg, Path("unused")) for cfg in cfgs]
    groups = group.group_jobs(jobs)
    assert len(groups) == 1, "the configs do not share one structure"
    *_, last = loop.run(groups[0], engine)
    assert all(r.done for r in last)
    return last


def step_once(*overrides: str, batch: int = 8, seed: int = 0, own_deltas: bool = False,
              taps: bool = False):
    """One real training step of a small MLP (with each example's own deltas, and every
    Dense layer's input and output gradient and the local step size's bookkeeping too,
    when asked); returns its parts and the batch."""
    cfg = compose_cfg("depth=2", "width=3", *overrides)
    net = models.build(cfg, losses.out_dim(cfg.loss.value, 2))
    tx = optim.make(cfg.clip, cfg.optim, n_train=100, total_steps=10)
    layout = models.layout(cfg)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, 2)).astype(np.float32)
    y = rng.integers(0, 2, size=batch).astype(np.int32)
    state = init_state(net, tx, jax.random.key(seed), jnp.asarray(x), len(layout.names),
                       with_alpha=taps)
    step = jax.jit(make_train_step(net, tx, cfg.loss.value, layout,
                                   with_own_deltas=own_deltas, with_taps=taps,
                                   with_alpha=taps))
    new_state, out = step(state, jnp.asarray(x), jnp.asarray(y), jax.random.key(1))
    return layout, state, new_state, out, x, y


class CompileCounter:
    """Counts XLA backend compilations per jitted function name while active."""

    def __init__(self) -> None:
        self.events: collections.Counter[str] = collections.Counter()
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name: str, duration: float, fun_name: str = "", **kwargs) -> None:
        if self.active and name == "/jax/core/compile/backend_compile_duration":
            self.events[fun_name] += 1

    def compiles(self, *names: str) -> int:
        """Compilations of jit(name) for each of ``names``."""
        return sum(self.events[f"jit({n})"] for n in names)


_COUNTER = CompileCounter()


@pytest.fixture
def compile_counter():
    """Counts real compilations: the persistent cache is off and this process's compiled
    programs are forgotten for the test."""
    compiled._CACHE.clear()
    jax.config.update("jax_enable_compilation_cache", False)
    _COUNTER.events.clear()
    _COUNTER.active = True
    yield _COUNTER
    _COUNTER.active = False
    jax.config.update("jax_enable_compilation_cache", True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Unload every compiled program after each test module: a worker process runs
    hundreds of tests, and each program loaded maps ~700 memory regions (see
    ``compiled.MAX_PROGRAMS``); jax.jit's own caches hold the tests' directly jitted steps.
    (Keeping vgrad's programs for later modules saves a few recompiles but costs more:
    with up to 16 programs of earlier modules loaded, later compiles took ~20% longer,
    and ten modules in one process 259 s instead of 229 s.)"""
    yield
    compiled._CACHE.clear()
    jax.clear_caches()


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """Environment for ``python -m vgrad.train`` subprocesses: no persistent compilation
    cache (see the top of this file), unbuffered output."""
    return dict(os.environ, VGRAD_COMPILE_CACHE="", PYTHONUNBUFFERED="1")


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run ``python -m vgrad.train ARGS`` in-process: returns (exit code, stdout, stderr)."""
    from vgrad import train

    def invoke(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["vgrad.train", *args])
        monkeypatch.setattr(runner, "OUTCOMES", runner.Outcomes())
        monkeypatch.setattr(train.callback, "FAILED_SWEEPS", [])
        code = 0
        try:
            train.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def cli_main(*args: str) -> int:
    """``python -m vgrad.train ARGS`` in-process, for fixtures wider than a test (the
    ``cli`` fixture is per test); returns the exit status."""
    from vgrad import train

    argv, outcomes = sys.argv, runner.OUTCOMES
    sys.argv = ["vgrad.train", *args]
    runner.OUTCOMES = runner.Outcomes()
    try:
        train.main()
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
        runner.OUTCOMES = outcomes


def run_dirs(root: Path) -> list[Path]:
    """Every run folder (holding summary.json) under root."""
    return sorted(p.parent for p in Path(root).rglob("summary.json"))


def one_error_line(err: str, *needles: str) -> str:
    """The single line of stderr, a vgrad error naming every needle (no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("vgrad: error:") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def texts_of(fig) -> str:
    """Every piece of text of a figure: titles, labels, notes, legend entries."""
    parts = [fig._suptitle.get_text() if fig._suptitle else ""]
    for ax in fig.axes:
        parts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        parts += [t.get_text() for t in ax.texts]
        legend = ax.get_legend()
        if legend:
            parts += [t.get_text() for t in legend.get_texts()]
    for legend in fig.legends:
        parts += [t.get_text() for t in legend.get_texts()]
    return " ".join(parts)


@contextlib.contextmanager
def sweep_locked_by(sweep_dir: Path, holder: str):
    """Hold ``sweep_dir``'s lock as another sweep process would."""
    import fcntl

    with open(Path(sweep_dir) / ".vgrad.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write(holder)
        f.flush()
        yield


def script(path: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python scripts/NAME.py ARGS`` in-process, for tests whose subject is what the
    script draws or says rather than the process: the same ``vgrad.cli`` function the
    script calls, with the script's name as its prog; stdout and stderr (and the warnings
    Python would print there) come back as a finished process's would."""
    import io
    import warnings

    from vgrad import cli as vgrad_cli

    name = Path(path).stem
    main = {"report": vgrad_cli.report_main, "plot_run": vgrad_cli.plot_run_main,
            "plot_sweep": vgrad_cli.plot_sweep_main}[name]
    out, err = io.StringIO(), io.StringIO()
    with (contextlib.redirect_stdout(out), contextlib.redirect_stderr(err),
          warnings.catch_warnings(record=True) as caught):
        warnings.simplefilter("default")
        try:
            code = main(list(args), prog=Path(path).name)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
                    for w in caught)
    return subprocess.CompletedProcess([path, *args], code, out.getvalue(),
                                       shown + err.getvalue())
