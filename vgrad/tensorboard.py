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

"How ReLU avoids vanishing gradients" (the ``relu_fix`` preset) shows its gradient
histograms this way. Non-finite values (a diverged seed) are skipped. Events are
appended at every chunk boundary as the run goes; the time spent writing them is
``timing.export_s`` in ``summary.json``.
"""

from __future__ import annotations

import math
import time
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
        from tensorboardX.event_file_writer import EventsWriter
    except ImportError:
        raise ConfigError("tensorboard", "true",
                          "the tensorboard extra: pip install 'vgrad[tensorboard]'") from None
    return EventsWriter


class TensorBoardExport:
    """Appends a run's new records to one TensorBoard event file per seed.

    Events are written in bulk: one event per recorded step holding all of that step's
    scalars, and one per epoch boundary holding its scalars and histograms (built from
    the fixed bins vgrad already computed), rather than one event per value, straight
    to the event file (tensorboardX's ``EventsWriter``, without the queue and thread of
    its ``SummaryWriter``, whose bounded queue made every event wait).
    """

    def __init__(self, run_dir: Path, seeds: list[int]) -> None:
        writer = _writer_class()
        self.writers = []
        for s in seeds:
            folder = Path(run_dir) / "tensorboard" / f"seed_{s}"
            folder.mkdir(parents=True, exist_ok=True)
            self.writers.append(writer(str(folder / "events")))
        self.chunks_written = 0  # chunks of the records already exported
        self.epochs_written = 0  # epoch boundaries already exported

    def update(self, rec: Any) -> None:
        """Export the chunks of ``rec`` not exported yet."""
        from tensorboardX.proto.summary_pb2 import Summary

        from vgrad.probes import HIST_EDGES

        edges = np.asarray(HIST_EDGES, np.float64)
        names = list(rec.layer_names)
        new = range(self.chunks_written, len(rec.step_parts))
        for s, events in enumerate(self.writers):
            for c in new:
                steps, stats = rec.step_parts[c], rec.step_stat_parts[c]
                tags, columns = _step_columns(stats, s, names)
                for t, step in enumerate(steps.tolist()):
                    values = [Summary.Value(tag=tag, simple_value=v)
                              for tag, v in zip(tags, columns[:, t].tolist(), strict=True)
                              if math.isfinite(v)]
                    if values:
                        _write(events, Summary(value=values), step)
            epoch = self.epochs_written
            for c in new:
                stats = rec.epoch_parts[c]
                n = next(iter(stats.values())).shape[1]
                for i in range(n):
                    step = (epoch + i) * rec.plan.steps_per_epoch
                    values = [Summary.Value(tag=tag, simple_value=float(stats[key][s, i]))
                              for key, tag in EPOCH_SCALARS.items()
                              if key in stats and math.isfinite(float(stats[key][s, i]))]
                    for key in (k for k in ("grad_hist", "weight_hist") if k in stats):
                        for layer, name in enumerate(names):
                            value = _histogram(f"{key}/{name}", stats[key][s, i, layer], edges)
                            if value is not None:
                                values.append(value)
                    if values:
                        _write(events, Summary(value=values), step)
                epoch += n
            events.flush()
        self.chunks_written, self.epochs_written = len(rec.step_parts), rec.epochs_done + 1

    def close(self) -> None:
        for w in self.writers:
            w.close()


def _write(events: Any, summary: Any, step: int) -> None:
    from tensorboardX.proto.event_pb2 import Event

    events.write_event(Event(wall_time=time.time(), step=step, summary=summary))


def _step_columns(stats: dict[str, np.ndarray], seed: int, names: list[str]
                  ) -> tuple[list[str], np.ndarray]:
    """The scalar tags of a chunk's steps and their values, [tags, steps] (what the
    chosen probes recorded)."""
    tags, rows = [], []
    for key in (k for k in GLOBAL_STEP_SCALARS if k in stats):
        tags.append(key)
        rows.append(stats[key][seed])
    for key in (k for k in STEP_SCALARS if k in stats):
        for layer, name in enumerate(names):
            tags.append(f"{key}/{name}")
            rows.append(stats[key][seed, :, layer])
    return tags, (np.asarray(rows, np.float64) if rows else np.zeros((0, 0)))


def _histogram(tag: str, counts: np.ndarray, edges: np.ndarray) -> Any:
    """One histogram value of fixed-bin counts (None when empty or not finite); its
    moments are computed from the bin centres."""
    from tensorboardX.proto.summary_pb2 import HistogramProto, Summary

    counts = np.asarray(counts, np.float64)
    if not np.isfinite(counts).all() or counts.sum() == 0:
        return None
    centres = (edges[:-1] + edges[1:]) / 2
    filled = np.flatnonzero(counts)
    histo = HistogramProto(min=float(edges[filled[0]]), max=float(edges[filled[-1] + 1]),
                           num=float(counts.sum()), sum=float((counts * centres).sum()),
                           sum_squares=float((counts * centres ** 2).sum()),
                           bucket_limit=edges[1:].tolist(), bucket=counts.tolist())
    return Summary.Value(tag=tag, histo=histo)
