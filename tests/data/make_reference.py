"""Writes reference.npz: numbers of two presets and a scanned deep net, trained briefly.

Run from ``tests/`` (``python data/make_reference.py``) on a commit whose numbers are the
reference; ``test_reference.py`` checks that later code computes the same numbers. The
stored file came from main at 4123525, before the model registry.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import compose_cfg, run_to_end  # noqa: E402

#: name -> overrides. A preset (visualize), a preset with batch norm added, and a net deep
#: enough to run its hidden layers as one scan.
CASES = {
    "visualize": ["+experiment=visualize", "epochs=2", "data.n_samples=256", "seeds=2",
                  "progress=false"],
    "relu_fix_bn": ["+experiment=relu_fix", "act=relu", "init=he_uniform", "bn=pre",
                    "epochs=2", "progress=false"],
    "deep_scan": ["act=tanh", "init=glorot_normal", "depth=12", "width=8", "epochs=2",
                  "data.n_samples=256", "progress=false"],
}
#: Recorded arrays compared.
KEYS = ("loss", "grad_norm", "delta_norm", "bias_grad_norm", "update_norm", "train_acc",
        "weight_std", "act_std", "act_sat_frac", "probe_bias_grad_norm", "grad_hist")


def records(overrides: list[str]) -> dict[str, np.ndarray]:
    rec = run_to_end(compose_cfg(*overrides))
    stats = {**rec.step_stats, **rec.epoch_stats}
    return {k: np.asarray(stats[k]) for k in KEYS}


if __name__ == "__main__":
    out = {f"{case}/{k}": v for case, o in CASES.items() for k, v in records(o).items()}
    np.savez_compressed(Path(__file__).with_name("reference.npz"), **out)
    print(f"wrote {len(out)} arrays")
