"""Generated sections of README.md and docs/*.md: one generator per section, and the page that holds it.

``python scripts/update_readme.py`` and ``aff-zoo cards`` rewrite them (with the model cards);
``tests/test_cli.py`` fails when one is stale. Measured tables (speed, ablation, checkpoints) are written by
the commands that measure them (``aff-zoo benchmark --doc docs/speed.md``, ``aff-zoo runs-table --doc
docs/training.md``), into the same kind of ``<!-- name:start -->`` / ``<!-- name:end -->`` markers."""
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

from ..utils import read_section, replace_section, write_changed  # noqa: F401  (read_section: re-exported)


def _models_table() -> str:
    from ..models.stats import models_table
    return models_table(fmt='markdown')


def _models_short() -> str:
    """The README's short table: the 50-layer ImageNet models and every model with published weights."""
    from ..models import list_models
    from ..models.stats import models_table
    from ..models.weights import available_tags
    names = [m for m in list_models() if m.endswith(('resnet50', 'resnext50')) or available_tags(m)]
    return models_table(fmt='markdown', names=names)


def _weights_table() -> str:
    from ..models import weights
    from .cards import weights_table
    return weights_table(weights.WEIGHTS + weights.UPCYCLED)


class Section(NamedTuple):
    page: str  # path relative to the checkout
    render: Callable[[], str]


SECTIONS: Dict[str, Section] = {
    'models-short': Section('README.md', _models_short),
    'weights': Section('README.md', _weights_table),
    'models-table': Section('docs/models.md', _models_table),
}


def generated_files(root, records=None) -> Dict[Path, str]:
    """``{path: text}`` of every generated file: the model cards and hub/*/README.md (``cards``), and each
    page of ``SECTIONS`` with its sections regenerated."""
    from ..models import weights
    from .cards import expected_files
    root = Path(root)
    out = expected_files(root, weights.WEIGHTS if records is None else records)
    for name, section in SECTIONS.items():
        path = root / section.page
        text = out[path] if path in out else path.read_text()
        out[path] = replace_section(text, name, section.render())
    return out


def write_generated(root='.', check: bool = False) -> List[Path]:
    """Rewrite the generated files that are stale and return them (``check``: only return them)."""
    return write_changed(generated_files(root), check)


def update_readme(root: Optional[str] = None) -> List[Path]:
    """Regenerate the models' figures (``_stats_table.py``), the cards and every generated section."""
    from ..models.stats import write_stats_table
    write_stats_table()
    return write_generated(root or Path(__file__).resolve().parents[2])
