"""Entry point: ``python -m vgrad.train [overrides]`` (add ``-m`` for a sweep).

One run is: compose and validate the config, load the data, train every seed in one
compiled program (``vgrad.runner``), and write the run folder as chunks finish. A sweep
goes through vgrad's Hydra launcher (``hydra_plugins/vgrad_launcher``, the default),
which trains each group of jobs of one structure as one program and then hands every
job to this task function, which reports it.

Errors are reported on one line. A config error (unknown choice, wrong type, value out
of range, missing dataset) exits with status 2, and a single run that fails this way
leaves no run folder; in a sweep the job is recorded as ``status: failed`` with its
error, the other jobs run, and the sweep exits with status 1. A job that crashes is
recorded the same way. A run whose loss or gradients overflow is not an error: it ends
normally with ``status: diverged`` (or ``partial``). SIGINT and SIGTERM stop at the next
chunk boundary, keep what was trained (``status: interrupted``) and exit with 130 or
143; the same command continues the run.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import textwrap
import traceback
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import filter_overrides
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from vgrad import config, guard, runner, store
from vgrad.analysis import callback
from vgrad.errors import ConfigError, describe
from vgrad.group import Group

log = logging.getLogger("vgrad")

#: The configs ship inside the package (``vgrad/conf`` is the repository's ``conf/``).
CONF_DIR = str(Path(__file__).resolve().parent / "conf")

config.register()



def train(cfg: DictConfig, run_dir: Path) -> str:
    """Train the run described by ``cfg`` into ``run_dir``; return its final status.

    Raises :class:`ConfigError` on bad input (before writing anything) and
    :class:`runner.Interrupted` on SIGINT or SIGTERM (after writing what was trained).
    """
    run_dir = Path(run_dir)
    job = runner.prepare(cfg, run_dir)
    if cfg.resume:
        job.resume = runner.resume_point(run_dir, cfg)
        if job.resume is not None:
            log.info("continuing %s from epoch %d", run_dir, job.resume.epochs_done)
    log.info("%s", describe_run(cfg, job.data))
    # The first chunk's progress comes after the program compiled (10-20 s): say so.
    bar = tqdm(total=cfg.epochs, unit="epoch", disable=not cfg.progress or None,
               desc=f"{run_dir.name} compiling", leave=False, initial=job.epochs_done)

    def progress(group: Group, epochs_done: int) -> None:
        if bar.n == job.epochs_done:  # the first chunk has run: no longer compiling
            bar.set_description(run_dir.name, refresh=False)
        bar.update(epochs_done - bar.n)

    try:
        return runner.train_jobs([job], progress=progress)[run_dir]
    finally:
        bar.close()


def describe_run(cfg: DictConfig, ds: Any) -> str:
    """One line naming the net, its data and its seeds, e.g. "sigmoid 2-5-5-5-5-1 on
    circles (1000 train / 0 test examples, 2 classes), 1 seed"."""
    seeds = (f"{cfg.seeds} seeds ({cfg.seed}-{cfg.seed + cfg.seeds - 1})" if cfg.seeds > 1
             else "1 seed" if cfg.seed == 0 else f"1 seed ({cfg.seed})")
    targets = "real targets" if cfg.loss.value == "regression" else f"{ds.n_classes} classes"
    return (f"{describe_net(cfg, ds)} on {cfg.data.name} ({len(ds.x_train)} train / "
            f"{len(ds.x_test)} test examples, {targets}), {seeds}")


def describe_net(cfg: DictConfig, ds: Any, act: bool = True) -> str:
    """The net in a few words: its activation (unless ``act`` is false), family and
    widths, input side first ("sigmoid 2-5-5-5-5-1"; a recurrent net: "tanh rnn
    2-64x1-1 over 100 steps")."""
    from vgrad import data, losses, models

    model = models.MODELS[cfg.model.name]
    act = act and model.takes_act(cfg)  # (gated cells: no act)
    family = cfg.model.target.rsplit(".", 1)[-1] if cfg.model.name == "custom" else \
        cfg.model.name
    name = " ".join(([cfg.act.name] if act else []) + ([family] if model.named else []))
    out = losses.out_dim(cfg.loss.value, ds.n_classes)
    if model.sequence:  # (the registry's widths count the gates: name the layers)
        length, features = data.sequence_shape(cfg.data)
        return (f"{name} {features}-{cfg.width}x{cfg.depth}-{out} over {length} "
                "steps").strip()
    features = int(np.prod(ds.x_train.shape[1:]))
    if model.n_params is not None:  # (a linen module: its layers, not its widths)
        layers = len(model.layout(cfg, features).names)
        return f"{name}: {layers} layers, {features} inputs, {out} outputs".strip()
    widths = [features, *model.widths(cfg, features), out]
    if len(widths) > 8:  # a deep net: runs of one width counted
        parts: list[str] = []
        i = 0
        while i < len(widths):
            j = i
            while j < len(widths) and widths[j] == widths[i]:
                j += 1
            parts.append(f"{widths[i]}x{j - i}" if j - i > 2 else
                         "-".join([str(widths[i])] * (j - i)))
            i = j
    else:
        parts = [str(w) for w in widths]
    return f"{name} {'-'.join(parts)}".strip()


def headline(run_dir: Path) -> str | None:
    """The run's first number: the first layer's delta norm relative to the last's at
    step 0 (median over seeds), or None when delta_norm was not recorded."""
    try:
        with np.load(run_dir / store.METRICS, allow_pickle=False) as m:
            if "delta_norm" not in m.files or "step" not in m.files:
                return None
            delta, step = m["delta_norm"], m["step"]
            names = [str(n) for n in m["layer_names"]] if "layer_names" in m.files else []
    except (OSError, ValueError):
        return None
    if delta.ndim != 3 or delta.shape[1] == 0 or delta.shape[2] < 2 or step[0] != 0:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = delta[:, 0, 0] / delta[:, 0, -1]
    ratio = ratio[np.isfinite(ratio)]
    if ratio.size == 0:
        return None
    layers = f" ({names[0]} / {names[-1]})" if len(names) == delta.shape[2] else ""
    seeds = f", median of {ratio.size} seeds" if ratio.size > 1 else ""
    r = float(np.median(ratio))
    trend = ("" if 0.5 <= r <= 2 else
             ": no gradient reaches the input" if r == 0 else
             f": the gradient {'shrinks' if r < 1 else 'grows'} {max(r, 1 / r):.3g}x on its "
             "way to the input")
    return (f"at step 0 the first layer's ||delta|| is {r:.3g} x the last "
            f"layer's{layers}{seeds}{trend}")


def report(run_dir: Path, status: str) -> None:
    """The log lines of an ended run: per-seed results, timing, and what to run next; a
    job of a sweep names its overrides in each of its lines."""
    from vgrad.cli import PLOT_RUN

    summary = store.read_summary(run_dir)
    hydra_cfg = HydraConfig.get()
    single = hydra_cfg.mode == RunMode.RUN
    overrides = " ".join(filter_overrides(hydra_cfg.overrides.task))
    job = ("" if single else f"job {hydra_cfg.job.num} ({overrides}): " if overrides
           else f"job {hydra_cfg.job.num}: ")
    exploded = []
    per_seed = summary["per_seed"]
    if len(per_seed) > MAX_SEED_LINES:
        log.info("%s%s", job, seeds_line(per_seed))
    for s in per_seed:
        f = s["final"]
        test = (f", test loss {_fmt(f['test_loss'])} acc {_fmt(f['test_acc'])}"
                if f.get("test_loss") is not None else "")
        if len(per_seed) <= MAX_SEED_LINES:
            log.info("%sseed %d: final train loss %s acc %s%s%s", job, s["seed"],
                     _fmt(f["train_loss"]), _fmt(f["train_acc"]), test,
                     f", diverged at step {s['diverged_at_step']}" if s["diverged_at_step"]
                     is not None else "")
        if s["diverged_at_step"] is None and (f["train_loss"] or 0) > EXPLODED_LOSS:
            exploded.append(s["seed"])
    if exploded:
        log.warning("%sseed(s) %s ended with a training loss above %.0e: the loss or the "
                    "gradients exploded without overflowing (see grad_global_norm)", job,
                    ", ".join(map(str, exploded)), EXPLODED_LOSS)
    if (line := headline(run_dir)) is not None:
        log.info("%s%s", job, line)
    t = summary["timing"]
    if t.get("export_s"):
        log.info("%sTensorBoard events written in %.2f s", job, t["export_s"])
    group = t.get("group") or {}
    shared = f", shared by {group['jobs']} jobs" if group.get("jobs", 1) > 1 else ""
    log.info("%s%s in %.2f s (+%.2f s compile%s), %s steps/s; outputs: %s", job, status,
             t["run_s"], t["compile_s"], shared, _fmt(t["steps_per_s"], ".0f"), run_dir)
    if single:
        log.info("figures: %s %s", PLOT_RUN, shlex.quote(str(run_dir)))


#: A run of more seeds than this logs one line for them all (median and range), not one
#: per seed (a finite-width sweep trains 512 seeds a job).
MAX_SEED_LINES = 8


def seeds_line(per_seed: list[dict]) -> str:
    """One line for many seeds: the median and range over seeds of each final metric,
    and how many diverged (from ``summary.json``'s ``per_seed``)."""
    parts = []
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        v = np.array([s["final"].get(key) for s in per_seed], dtype=float)
        v = v[np.isfinite(v)]
        if v.size:
            parts.append(f"{key.replace('_', ' ')} {_fmt(float(np.median(v)))} "
                         f"[{_fmt(float(v.min()))}, {_fmt(float(v.max()))}]")
    diverged = [s["diverged_at_step"] for s in per_seed if s["diverged_at_step"] is not None]
    tail = (f"; {len(diverged)} diverged (first at step {min(diverged)})" if diverged
            else "")
    return (f"{len(per_seed)} seeds: final " + ", ".join(parts)
            + " (median [min, max] over seeds)" + tail)


#: A final training loss above this is reported as an explosion (for a cross-entropy or
#: squared loss of a classifier, anything beyond a few hundred is no longer learning).
EXPLODED_LOSS = 1e3


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "nan" if x is None else format(x, spec)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> str:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    single = hydra_cfg.mode == RunMode.RUN
    outcomes = runner.OUTCOMES
    if "joblib" in str(hydra_cfg.launcher.get("_target_", "")):
        runner.watch_parent()  # a joblib worker: exit with the sweep that started it
    try:
        if run_dir in outcomes.trained:  # trained by vgrad's launcher, with its group
            status = outcomes.trained[run_dir]
        elif cfg.resume and (status := runner.ended_before(run_dir, cfg)) is not None:
            log.info("%s already holds an ended run of this config (%s): skipped (resume=false "
                     "trains it again)", run_dir, status)
            outcomes.ended.append(status)
            return status
        else:
            if not cfg.resume:
                runner.ended_before(run_dir, cfg)  # never overwrite another config's run
            status = train(cfg, run_dir)
    except runner.Interrupted as exc:  # (Hydra would report it over several lines)
        outcomes.interrupted.append(exc)
        return "interrupted"
    except ConfigError as exc:
        outcomes.failed.append((run_dir, str(exc), True))
        if single or isinstance(exc, runner.DifferentRun):
            guard.undo(run_dir)  # what Hydra wrote for this run, nothing else
        else:
            runner.write_failure(run_dir, cfg, str(exc))
        return "failed"
    except Exception as exc:  # a crash is recorded; the rest of a sweep goes on
        error = f"{type(exc).__name__}: {exc}"
        log.error("job failed: %s\n%s", error, traceback.format_exc())
        runner.write_failure(run_dir, cfg, error)
        outcomes.failed.append((run_dir, error, False))
        return "failed"
    if status == "failed":
        outcomes.failed.append((run_dir, outcomes.errors.get(run_dir, "failed"), False))
        return status
    outcomes.ended.append(status)
    report(run_dir, status)
    return status


#: The sweep axes listed by ``--help``, with what each chooses.
HELP_GROUPS = {"model": "network", "act": "activation", "init": "kernel initializer",
               "bias_init": "bias initializer", "clip": "gradient clipping",
               "optim": "optimizer", "data": "dataset"}


def help_text() -> str:
    """vgrad's ``--help``: what it does, the axes and their choices (read from the
    configs, so the list is never stale), the presets, examples, where outputs go."""
    conf = Path(CONF_DIR)
    lines = [
        "vgrad: measure vanishing and exploding gradients layer by layer.",
        "",
        "Trains a network (MLP, residual MLP, RNN/LSTM/GRU, CNN, or your own Flax linen",
        "module) with a jit-compiled optax step and records, per layer and per step, the",
        "gradient statistics (norms, deltas, update ratios, saturation, histograms) and",
        "the forward signal (length and correlation per layer).",
        "",
        "usage: python -m vgrad.train [KEY=VALUE ...]        one run (all its seeds at once)",
        "       python -m vgrad.train -m KEY=A,B,C ...        a sweep over every combination",
        "       (vgrad-train is the same command)",
        "",
        "Sweep axes (KEY=CHOICE; each choice's parameters as KEY.PARAM=VALUE):",
    ]
    for group, what in HELP_GROUPS.items():
        choices = ", ".join(sorted(p.stem for p in (conf / group).glob("*.yaml")))
        lines += textwrap.wrap(f"{what}: {choices}", 88, initial_indent=f"  {group:<10} ",
                               subsequent_indent=" " * 13)
    lines += [
        "  depth, width (or widths=[...]), bn=none|pre|post, loss=bce|ce|mse|bce_onehot,",
        "  model.skip, model.norm, model.alpha, model.block_dense (model=resmlp),",
        "  model.target=PACKAGE.MODULE.CLASS +model.args.NAME=VALUE (model=custom: your own",
        "  linen module, instrumented automatically; see the README, \"Your own model\"),",
        "  epochs, batch_size, seed, seeds, dtype=float32|float64, record.* (what is measured)",
        "",
        "Presets, one per source experiment (+experiment=NAME):",
    ]
    for preset in sorted((conf / "experiment").glob("*.yaml")):
        title = next((line.split("Title:", 1)[1].strip()
                      for line in preset.read_text().splitlines() if "Title:" in line), "")
        lines.append(f"  {preset.stem:<13} {title}")
    lines += [
        "",
        "Examples:",
        "  python -m vgrad.train -m +experiment=visualize act=sigmoid,tanh,relu seeds=20",
        "  python -m vgrad.train act=relu init=he_normal depth=50 dtype=float64",
        "",
        "Outputs: outputs/runs/DATE/TIME/ (single runs), outputs/sweeps/DATE/TIME/N/ (sweeps),",
        "each with summary.json, metrics.npz and params.npz; then (each with --help)",
        "  vgrad-report SWEEP      one HTML page: SWEEP/report/index.html",
        "  vgrad-plot-run RUN      a run's figures: RUN/figures/",
        "  vgrad-plot-sweep SWEEP --x AXIS [--y AXIS]    figures over the sweep's axes",
        "Every default: python -m vgrad.train --cfg job.  Hydra's own help: --hydra-help.",
    ]
    return "\n".join(lines)


def main() -> None:
    """Run Hydra, folding config errors into one line and failures into the exit code."""
    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        print(help_text())
        return
    own_errors = "HYDRA_FULL_ERROR" not in os.environ  # else the user wants full traces
    if own_errors:  # let exceptions reach us instead of Hydra's multi-line report
        os.environ["HYDRA_FULL_ERROR"] = "1"
    outcomes = runner.OUTCOMES
    try:
        config.refuse_name_overrides(sys.argv[1:])
        _hydra_main()
        if outcomes.interrupted:
            raise outcomes.interrupted[0]
    except runner.Interrupted as exc:
        print(f"vgrad: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:  # before or after training: nothing to keep
        print("vgrad: SIGINT: stopped", file=sys.stderr)
        sys.exit(130)
    except guard.Refused as exc:  # before Hydra wrote anything
        print(f"vgrad: error: {describe(exc.error)}", file=sys.stderr)
        sys.exit(2)
    except (HydraException, OmegaConfBaseException, ConfigError, store.LinkRefused) as exc:
        if not own_errors:
            raise
        print(f"vgrad: error: {describe(exc)}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # Hydra could not make or write a run folder
        if not own_errors:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"vgrad: error: {where}{exc.strerror or exc} (hydra.run.dir / hydra.sweep.dir "
              "must be a folder vgrad can create and write)", file=sys.stderr)
        sys.exit(2)
    finally:
        if own_errors:
            del os.environ["HYDRA_FULL_ERROR"]
    for run_dir, error, _ in outcomes.failed:
        where = f" (run folder {run_dir})" if run_dir.is_dir() else ""
        print(f"vgrad: error: {error}{where}", file=sys.stderr)
    reported = {run_dir.parent.resolve() for run_dir, *_ in outcomes.failed}
    unreported = {p.resolve() for p in callback.FAILED_SWEEPS} - reported  # other processes'
    for sweep_dir in unreported:
        print(f"vgrad: error: jobs of the sweep failed or did not end; see "
              f"{sweep_dir / 'runs.csv'}", file=sys.stderr)
    if outcomes.failed or callback.FAILED_SWEEPS:
        nothing_ran = not outcomes.ended and not unreported
        bad_input_only = all(bad for *_, bad in outcomes.failed) and nothing_ran
        sys.exit(2 if bad_input_only else 1)


if __name__ == "__main__":
    main()
