"""README sections generated from the code (models table, ...): one function per section, and one
way to splice them in between ``<!-- name:start -->`` / ``<!-- name:end -->`` markers."""
import re
from pathlib import Path
from typing import Callable, Dict


def replace_section(text: str, name: str, content: str) -> str:
    """``text`` with the part between the ``name`` markers replaced by ``content``."""
    pattern = re.compile(rf'(<!-- {re.escape(name)}:start -->\n)(.*?)(<!-- {re.escape(name)}:end -->)', re.S)
    if not pattern.search(text):
        raise ValueError(f'README has no <!-- {name}:start --> ... <!-- {name}:end --> markers')
    return pattern.sub(lambda m: m.group(1) + content.rstrip('\n') + '\n' + m.group(3), text, count=1)


def read_section(text: str, name: str) -> str:
    m = re.search(rf'<!-- {re.escape(name)}:start -->\n(.*?)<!-- {re.escape(name)}:end -->', text, re.S)
    if m is None:
        raise ValueError(f'README has no {name} section markers')
    return m.group(1)


def _models_table() -> str:
    from ..models.stats import models_table
    return models_table(fmt='markdown')


def _weights_table() -> str:
    from ..models import weights
    from .cards import weights_table
    return weights_table(weights.WEIGHTS + weights.UPCYCLED)


# name -> generator; other modules add their generated sections here.
SECTIONS: Dict[str, Callable[[], str]] = {
    'models-table': _models_table,
    'weights': _weights_table,
}


def update_readme(path: str = 'README.md') -> None:
    """Regenerate every section of ``SECTIONS`` in the README, in place."""
    p = Path(path)
    text = p.read_text()
    for name, render in SECTIONS.items():
        text = replace_section(text, name, render())
    p.write_text(text)
