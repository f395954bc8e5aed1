"""Regenerate the README's generated sections (model table, ...): python scripts/update_readme.py"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import aff_zoo  # noqa: E402,F401
from aff_zoo.publish.docs import update_readme  # noqa: E402

if __name__ == '__main__':
    update_readme(str(Path(__file__).resolve().parents[1] / 'README.md'))
