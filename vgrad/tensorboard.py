"""TensorBoard export of a run (``tensorboard=true``; needs ``pip install 'vgrad[tensorboard]'``).

Writes, under ``<run folder>/tensorboard/seed_<s>/`` (one TensorBoard run per seed, so
``tensorboard --logdir outputs/`` lists every seed of every run of a sweep):

- scalars at every recorded step (those the chosen probes record): ``loss``,
  ``grad_global_norm`` and, per Dense layer,
  ``grad_norm/<layer>``, ``delta_norm/<layer>``, ``grad_std/<layer>``,
  ``update_ratio/<layer>``;
- scalars at every epoch end (x axis: the global step): ``train/loss``, ``train/acc``,
  ``test/loss``, ``test/acc``;
- histograms at every epoch boundary: ``grad_hist/<layer>`` and ``weight_hist/<layer>``,
  the fixed-bin histograms of **log10|value|** that vgrad computed (so TensorBoard shows
  the same bins for every run, unlike histograms rebinned per step). Their min, max and
  moments are computed from the bin centres.

Seed 002 shows its gradient histograms this way. Non-finite values (a diverged seed)
are skipped. Events are appended at every chunk boundary as the run goes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from vgrad.errors import ConfigError

GLOBAL_STEP_SCALARS = ("loss", "grad_global_norm")
STEP_SCALARS = ("grad_norm", "delta_norm", "grad_std", "update_ratio")  # per layer
EPOCH_SCALARS = {"train_loss": "train/loss", "train_acc": "train/acc",
                 "test_loss": "test/loss", "test_acc": "test/acc"}


def _writer_class() -> Any:
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard", "true",
                          "the tensorboard extra: pip install 'vgrad[tensorboard]'") from None
    return SummaryWriter


class TensorBoardExport:
    """Appends a run's new records to one TensorBoard event file per seed."""

    def __init__(self, run_dir: Path, seeds: list[int]) -> None:
        writer = _writer_class()
        self.writers = [writer(str(Path(run_dir) / "tensorboard" / f"seed_{s}"))
                        for s in seeds]
        self.chunks_written = 0  # chunks of the records already exported
        self.epochs_written = 0  # epoch boundaries already exported

    def update(self, rec: Any) -> None:
        """Export the chunks of ``rec`` not exported yet."""
        from vgrad.probes import HIST_EDGES

        edges = np.asarray(HIST_EDGES, np.float64)
        new = range(self.chunks_written, len(rec.step_parts))
        for s, w in enumerate(self.writers):
            for c in new:
                steps, stats = rec.step_parts[c], rec.step_stat_parts[c]
                for t, step in enumerate(steps.tolist()):  # (what the probes recorded)
                    for key in (k for k in GLOBAL_STEP_SCALARS if k in stats):
                        _scalar(w, key, stats[key][s, t], step)
                    for key in (k for k in STEP_SCALARS if k in stats):
                        for layer, name in enumerate(rec.layer_names):
                            _scalar(w, f"{key}/{name}", stats[key][s, t, layer], step)
            epoch = self.epochs_written
            for c in new:
                stats = rec.epoch_parts[c]
                for i in range(next(iter(stats.values())).shape[1]):
                    step = (epoch + i) * rec.plan.steps_per_epoch
                    for key, tag in EPOCH_SCALARS.items():
                        _scalar(w, tag, stats[key][s, i], step)
                    for key in (k for k in ("grad_hist", "weight_hist") if k in stats):
                        for layer, name in enumerate(rec.layer_names):
                            _histogram(w, f"{key}/{name}", stats[key][s, i, layer], edges, step)
                epoch += next(iter(stats.values())).shape[1]
            w.flush()
        self.chunks_written, self.epochs_written = len(rec.step_parts), rec.epochs_done + 1

    def close(self) -> None:
        for w in self.writers:
            w.close()


def _scalar(writer: Any, tag: str, value: float, step: int) -> None:
    if math.isfinite(float(value)):
        writer.add_scalar(tag, float(value), step)


def _histogram(writer: Any, tag: str, counts: np.ndarray, edges: np.ndarray, step: int) -> None:
    counts = np.asarray(counts, np.float64)
    if not np.isfinite(counts).all() or counts.sum() == 0:
        return
    centres = (edges[:-1] + edges[1:]) / 2
    filled = np.flatnonzero(counts)
    writer.add_histogram_raw(
        tag, min=float(edges[filled[0]]), max=float(edges[filled[-1] + 1]),
        num=float(counts.sum()), sum=float((counts * centres).sum()),
        sum_squares=float((counts * centres ** 2).sum()),
        bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(), global_step=step)
