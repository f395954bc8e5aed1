#!/usr/bin/env python
"""Thin wrapper: `python scripts/benchmark.py ARGS` == `aff-zoo benchmark ARGS` (see `aff-zoo benchmark --help`)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aff_zoo.cli import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main(['benchmark', *sys.argv[1:]]))
