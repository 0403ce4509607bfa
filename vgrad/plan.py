"""The plan of a run: how its steps, epochs, chunks and recorded steps line up.

Everything here is static (plain Python and numpy, known before anything is traced):
the traced program (``vgrad.program``) loops over it, the records (``vgrad.records``)
are laid out by it, and the loop (``vgrad.loop``) cuts a run into its chunks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

#: Work per chunk chosen by record.chunk_epochs=0, in multiply-adds (about a second on
#: a laptop core): large enough to hide the per-chunk host sync, small enough for a
#: live progress bar and frequent checkpoints.
CHUNK_BUDGET = 2e10
#: Fixed per-step overhead of a small network in the same units.
STEP_OVERHEAD = 2e5


@dataclasses.dataclass(frozen=True)
class Plan:
    """How steps, epochs, chunks and recorded steps line up (all static)."""

    steps_per_epoch: int
    epochs: int
    chunk_epochs: int
    record_every: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.epochs / self.chunk_epochs)

    def chunk_epochs_of(self, chunk: int) -> range:
        """The epochs (0-based) that chunk ``chunk`` trains."""
        first = chunk * self.chunk_epochs
        return range(first, min(first + self.chunk_epochs, self.epochs))

    def recorded_steps(self, epochs: range | None = None) -> np.ndarray:
        """Global indices of the recorded steps: 0, K, 2K, ... (within ``epochs``)."""
        epochs = epochs if epochs is not None else range(self.epochs)
        start, stop = epochs.start * self.steps_per_epoch, epochs.stop * self.steps_per_epoch
        first = -(-start // self.record_every) * self.record_every
        return np.arange(first, stop, self.record_every, dtype=np.int64)


def make_plan(cfg: Any, n_train: int, n_params: int, members: int) -> Plan:
    """The plan of a validated config trained as ``members`` members (jobs x seeds).

    ``record.chunk_epochs=0`` picks the largest divisor of ``epochs`` whose work fits
    ``CHUNK_BUDGET``, so that every chunk has the same length and compiles once.
    """
    steps_per_epoch = n_train // cfg.batch_size  # the last partial batch is dropped
    chunk = cfg.record.chunk_epochs
    if chunk == 0:
        epoch_cost = steps_per_epoch * members * (6 * cfg.batch_size * n_params + STEP_OVERHEAD)
        fits = max(1, int(CHUNK_BUDGET // max(epoch_cost, 1)))
        chunk = max(d for d in range(1, cfg.epochs + 1) if cfg.epochs % d == 0 and d <= fits)
    return Plan(steps_per_epoch, cfg.epochs, min(chunk, cfg.epochs), cfg.record.every)
