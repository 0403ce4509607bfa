"""From run and sweep folders to tables, figures and a report.

    from vgrad.analysis import load_sweep, figures
    sweep = load_sweep("outputs/sweeps/2026-11-22/12-00-00")
    sweep.runs            # one row per run x seed, config flattened to columns
    sweep.steps()         # one row per run x seed x step x layer
    figures.profile(sweep, hue="act")

Submodules load on first use, so that the sweep callback (imported by every training
process) does not pay for pandas and matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"Run": "tables", "Sweep": "tables", "load_run": "tables", "load_sweep": "tables",
            "write_report": "report", "figures": None}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vgrad.analysis' has no attribute {name!r}")
    module = _EXPORTS[name]
    if module is None:
        return importlib.import_module(f"vgrad.analysis.{name}")
    return getattr(importlib.import_module(f"vgrad.analysis.{module}"), name)
