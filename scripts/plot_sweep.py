#!/usr/bin/env python
"""``vgrad-plot-sweep`` from a checkout: ``python scripts/plot_sweep.py --help``.

The installed package's console command ``vgrad-plot-sweep`` runs the same function,
``vgrad.cli.plot_sweep_main``; this file keeps ``python scripts/...`` working in a checkout.
"""

import sys

from vgrad.cli import plot_sweep_main as main

if __name__ == "__main__":
    sys.exit(main())
