"""Validate a Hub folder against the registry and upload it: ``python scripts/publish.py hub/<name> [--dry-run]``
is ``aff-zoo publish`` (see docs/publishing.md)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from aff_zoo.cli import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main(['publish', *sys.argv[1:]]))
