#!/usr/bin/env python
"""``vgrad-plot-run`` from a checkout: ``python scripts/plot_run.py --help``.

The installed package's console command ``vgrad-plot-run`` runs the same function,
``vgrad.cli.plot_run_main``; this file keeps ``python scripts/...`` working in a checkout.
"""

import sys

from vgrad.cli import plot_run_main as main

if __name__ == "__main__":
    sys.exit(main())
