"""What a run recorded and what kind of net and task it trained (no matplotlib): the
facts the figures branch on, and the rows of the gradient through time they read.

- ``recorded``: whether a run recorded a statistic (a test-set statistic of a run
  without a test set is not recorded, though its arrays exist);
- ``recurrent``, ``one_recurrent_layer``: the kind of net (a recurrent net of one
  recurrent layer has no profile across layers, only through time);
- ``regression``: the kind of task (real-valued targets: the loss is the score);
- ``time_rows``: ||dL/dh_t|| of a recurrent layer at the first step or late in training.
"""

from __future__ import annotations

import warnings

import numpy as np

from vgrad.analysis.tables import Run

#: The evaluation's statistics: always recorded, but the test set's are NaN throughout a
#: run without a test set (``data.test_size=0``), which counts as not recorded.
EVAL_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc")


def recorded(run: Run, key: str) -> bool:
    """Whether ``run`` recorded the statistic ``key``: an array of its ``metrics.npz``
    (``delta_norm``, ``test_acc``), or an ``initial_``/``final_`` column of the runs
    table. A test-set statistic of a run without a test set is not recorded; columns
    that are not the evaluation's (timing, config) always are."""
    base = key.removeprefix("final_").removeprefix("initial_")
    if base != key and base not in EVAL_KEYS:
        return True
    if base.startswith("test_") and base in EVAL_KEYS:
        # accuracy is finite whenever a test set exists, even on a diverged net
        seeds = run.summary.get("per_seed") or []
        has_test = any(s.get(when, {}).get("test_acc") is not None
                       for s in seeds for when in ("initial", "final"))
        if not has_test and base == key and "test_acc" in run.metrics:
            has_test = bool(np.isfinite(np.asarray(run.metrics["test_acc"],
                                                   np.float64)).any())
        if not has_test:
            return False
    return base != key or key in run.metrics


def recurrent(run: Run) -> bool:
    """Whether a run's net is recurrent: it recorded arrays along time or recurrent
    layers (``summary.json``'s ``arrays``)."""
    return any("time" in dims or "recurrent" in dims
               for dims in (run.summary.get("arrays") or {}).values())


def one_recurrent_layer(run: Run) -> bool:
    """A recurrent net of one recurrent layer: its "layers" are that layer and the
    readout, two points that make no profile across layers."""
    return recurrent(run) and len(run.summary.get("layers") or []) <= 2


def regression(run: Run) -> bool:
    """Whether a run's task is a regression (real-valued targets, ``loss=regression``:
    the adding problem), whose "accuracy" is only a share within a tolerance."""
    from vgrad import data

    config = run.config
    return (config.get("loss") == "regression"
            or (config.get("data") or {}).get("name") in data.REGRESSION)


def time_rows(m: dict, at: str, layer: int = -1) -> np.ndarray:
    """||dL/dh_t|| of one recurrent layer, [S, T]: at the first step, or averaged over
    the last tenth of the recorded steps."""
    v = np.asarray(m["time_delta_norm"][:, :, layer], np.float64)  # [S, steps, T]
    if at == "init":
        return v[:, 0]
    tail = max(1, v.shape[1] // 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a diverged seed: all NaN
        return np.nanmean(v[:, -tail:], axis=1)
