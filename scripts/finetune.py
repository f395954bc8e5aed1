#!/usr/bin/env python
"""Thin wrapper: `python scripts/finetune.py ARGS` == `aff-zoo finetune ARGS`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aff_zoo.cli import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main(['finetune', *sys.argv[1:]]))
