"""Entry point: ``python -m vgrad.train [overrides]`` (add ``-m`` for a sweep).

One run (or one job of a sweep) is: compose and validate the config, load the data,
train every seed in one compiled program, and write the run folder after each chunk.
The run folder follows the output contract of ``vgrad.store``.

Errors are reported on one line. A config error (unknown choice, wrong type, value out
of range, missing dataset) exits with status 2; a job that crashes is recorded as
``status: failed`` with its error, the rest of a sweep still runs, and the process
exits with status 1 at the end. A run whose loss or gradients overflow is not an
error: it ends normally with ``status: diverged`` (or ``partial``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
import jax
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from vgrad import config, data, loop, store
from vgrad.analysis import callback
from vgrad.errors import ConfigError, describe
from vgrad.tensorboard import TensorBoardExport

log = logging.getLogger("vgrad")

#: conf/ sits beside the package in a checkout (pip install -e .).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

config.register()

#: Jobs of this process that failed (single runs and the basic launcher): the run
#: folder, the one-line error, and whether it was bad input (exit 2) or a crash (exit 1).
_FAILED: list[tuple[Path, str, bool]] = []


def device_info() -> dict[str, Any]:
    devices = jax.devices()
    return {"platform": devices[0].platform, "kind": devices[0].device_kind,
            "count": len(devices)}


def _write_failure(run_dir: Path, cfg: DictConfig, error: str) -> None:
    store.write_json(run_dir / store.SUMMARY, {
        "status": "failed",
        "error": error,
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "versions": dict(store.versions()),
    })


def use_compile_cache(path: str | None) -> None:
    """Point JAX's persistent compilation cache at ``path`` (None: leave it off).

    Every program is cached, however fast it compiled: vgrad's compile in seconds, and
    JAX's default (only programs slower than 1 s) would skip most of them.
    """
    if not path:
        return
    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def finished_before(run_dir: Path, cfg: DictConfig) -> str | None:
    """The status of an ended run of the same config already in ``run_dir``, else None."""
    if not (store.is_complete(run_dir) and (run_dir / store.METRICS).is_file()):
        return None
    summary = store.read_summary(run_dir)
    current = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    same = all(summary["config"].get(k) == v for k, v in current.items()
               if k not in config.VOLATILE)
    return summary["status"] if same else None


def train(cfg: DictConfig, run_dir: Path) -> str:
    """Train the run described by ``cfg`` into ``run_dir``; return its final status.

    Raises :class:`ConfigError` (after recording ``status: failed``) on bad input.
    """
    try:
        config.validate(cfg)
        ds = data.load(cfg.data)
        config.validate_data(cfg, len(ds.x_train), ds.n_classes)
    except ConfigError as exc:
        _write_failure(run_dir, cfg, str(exc))
        raise

    use_compile_cache(cfg.compile_cache)
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    device = device_info()
    log.info("data %s: %d train / %d test examples, %d classes; %d seed(s) from %d on %s",
             cfg.data.name, len(ds.x_train), len(ds.x_test), ds.n_classes, cfg.seeds,
             cfg.seed, device["kind"])
    board = (TensorBoardExport(run_dir, list(range(cfg.seed, cfg.seed + cfg.seeds)))
             if cfg.tensorboard else None)
    bar = tqdm(total=cfg.epochs, unit="epoch", disable=not cfg.progress or None,
               desc=run_dir.name, leave=False)
    status, saved = "running", None
    for rec in loop.run(cfg, ds):
        status = store.status_of(rec.diverged_at) if rec.done else "running"
        now = time.monotonic()
        if rec.done or saved is None or now - saved >= cfg.record.save_every_s:
            store.write_npz(run_dir / store.METRICS, store.metrics_arrays(rec))
            if rec.snapshot_parts:
                store.write_npz(run_dir / store.GRADS, store.grads_arrays(rec))
            store.write_json(run_dir / store.SUMMARY,
                             store.make_summary(rec, resolved, status, device))
            saved = now
        if board is not None:
            board.update(rec)
        bar.update(rec.epochs_done - bar.n)
    bar.close()
    if board is not None:
        board.close()
    return status


def _report(run_dir: Path, status: str) -> None:
    summary = store.read_summary(run_dir)
    for s in summary["per_seed"]:
        f = s["final"]
        log.info("seed %d: final train loss %s acc %s%s", s["seed"], _fmt(f["train_loss"]),
                 _fmt(f["train_acc"]),
                 f", diverged at step {s['diverged_at_step']}" if s["diverged_at_step"]
                 is not None else "")
    t = summary["timing"]
    log.info("%s in %.2f s (+%.2f s compile), %s steps/s; outputs: %s", status, t["run_s"],
             t["compile_s"], _fmt(t["steps_per_s"], ".0f"), run_dir)


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "nan" if x is None else format(x, spec)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> str:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.resume and (status := finished_before(run_dir, cfg)) is not None:
        log.info("%s already holds an ended run of this config (%s): skipped (resume=false "
                 "trains it again)", run_dir, status)
        return status
    try:
        status = train(cfg, run_dir)
    except ConfigError as exc:
        log.error("bad config: %s", exc)
        _FAILED.append((run_dir, str(exc), True))
        return "failed"
    except Exception as exc:  # a crash is recorded; the rest of a sweep goes on
        error = f"{type(exc).__name__}: {exc}"
        log.error("job failed: %s\n%s", error, traceback.format_exc())
        _write_failure(run_dir, cfg, error)
        _FAILED.append((run_dir, error, False))
        return "failed"
    _report(run_dir, status)
    return status


def main() -> None:
    """Run Hydra, folding config errors into one line and failures into the exit code."""
    own_errors = "HYDRA_FULL_ERROR" not in os.environ  # else the user wants full traces
    if own_errors:  # let exceptions reach us instead of Hydra's multi-line report
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except (HydraException, OmegaConfBaseException, ConfigError) as exc:
        if not own_errors:
            raise
        print(f"vgrad: error: {describe(exc)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if own_errors:
            del os.environ["HYDRA_FULL_ERROR"]
    for run_dir, error, _ in _FAILED:
        print(f"vgrad: error: {error} (run folder {run_dir})", file=sys.stderr)
    reported = {run_dir.parent for run_dir, *_ in _FAILED}
    for sweep_dir in set(callback.FAILED_SWEEPS) - reported:  # jobs of other processes
        print(f"vgrad: error: jobs of the sweep failed or did not end; see "
              f"{sweep_dir / 'runs.csv'}", file=sys.stderr)
    if _FAILED or callback.FAILED_SWEEPS:
        bad_input_only = _FAILED and all(bad for *_, bad in _FAILED) and not (
            set(callback.FAILED_SWEEPS) - reported)
        sys.exit(2 if bad_input_only else 1)


if __name__ == "__main__":
    main()
