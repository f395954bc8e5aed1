"""Regenerate the generated parts of README.md and docs/*.md (models tables, weights table), the model cards and
aff_zoo/models/_stats_table.py: python scripts/update_readme.py"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from aff_zoo.publish.docs import update_readme  # noqa: E402

if __name__ == '__main__':
    for path in update_readme(str(Path(__file__).resolve().parents[1])):
        print(f'wrote {path}')
