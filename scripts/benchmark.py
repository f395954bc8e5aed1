#!/usr/bin/env python3
"""Speed benchmark; same as ``aff-zoo benchmark`` (see ``aff-zoo benchmark --help``)."""
import sys

from aff_zoo.cli import main

if __name__ == '__main__':
    sys.exit(main(['benchmark', *sys.argv[1:]]))
