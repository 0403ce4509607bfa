#!/usr/bin/env python
"""``vgrad-report`` from a checkout: ``python scripts/report.py --help``.

The installed package's console command ``vgrad-report`` runs the same function,
``vgrad.cli.report_main``; this file keeps ``python scripts/...`` working in a checkout.
"""

import sys

from vgrad.cli import report_main as main

if __name__ == "__main__":
    sys.exit(main())
