#!/usr/bin/env python
"""Thin wrapper: `python scripts/ablation_table.py ARGS` == `aff-zoo runs-table ARGS` (docs tables from run logs)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aff_zoo.cli import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main(['runs-table', *sys.argv[1:]]))
