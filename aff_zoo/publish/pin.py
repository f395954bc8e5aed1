"""``aff-zoo pin-parents``: pin the upcycled records' parents (Hub commit, sha256 and size of their file) in the
registry, for a maintainer with network access. Until a parent is pinned, loading checks its file against the
digest the Hub reports and warns (``aff_zoo.models.upcycle.parent_file``)."""
import re
import sys
from pathlib import Path
from typing import Dict, Iterable, Tuple

from ..utils import atomic_write_text

__all__ = ['read_pins', 'pins_source', 'write_pins', 'register_cli']

WEIGHTS_PY = Path(__file__).resolve().parents[1] / 'models' / 'weights.py'
_BLOCK = re.compile(r'(# pins:start\n)(.*?)(# pins:end)', re.S)


def read_pins(repos: Iterable[Tuple[str, str]], revision: str = 'main') -> Dict[str, Tuple[str, str, int]]:
    """``{parent: (commit, sha256, size)}`` from the Hub for ``(parent, repo)`` pairs: the commit ``revision``
    points at now, and the LFS sha256 and size of ``model.safetensors`` there."""
    from huggingface_hub import HfApi
    api = HfApi()
    pins = {}
    for parent, repo in repos:
        commit = api.model_info(repo, revision=revision).sha
        info = api.get_paths_info(repo, ['model.safetensors'], revision=commit)
        if not info or getattr(info[0], 'lfs', None) is None:
            raise ValueError(f'{repo}@{commit}: model.safetensors is missing or not an LFS file (no sha256 reported); '
                             'pin it by hand after checking the file.')
        pins[parent] = (commit, info[0].lfs.sha256, int(info[0].lfs.size))
    return pins


def pins_source(pins: Dict[str, Tuple[str, str, int]]) -> str:
    lines = ['PARENT_PINS: Dict[str, Tuple[str, str, int]] = {']
    lines += [f'    {p!r}: ({c!r},\n        {s!r}, {n}),' for p, (c, s, n) in sorted(pins.items())]
    return '\n'.join(lines + ['}']) + '\n'


def write_pins(pins: Dict[str, Tuple[str, str, int]], path: Path = WEIGHTS_PY) -> None:
    """Replace the ``PARENT_PINS`` block of ``weights.py`` (between ``# pins:start`` / ``# pins:end``)."""
    text = Path(path).read_text()
    if not _BLOCK.search(text):
        raise ValueError(f'{path} has no "# pins:start" ... "# pins:end" block')
    atomic_write_text(str(path), _BLOCK.sub(lambda m: m.group(1) + pins_source(pins) + m.group(3), text, count=1))


def _cmd_pin_parents(args) -> int:
    from ..models import weights
    repos = sorted({(u.parent, u.parent_repo) for u in weights.UPCYCLED})
    try:
        pins = read_pins(repos, args.revision)
    except Exception as e:  # network, auth, missing file: one line, then stop
        print(f'error: {type(e).__name__}: {e}', file=sys.stderr)
        return 2
    for parent, (commit, sha, size) in pins.items():
        print(f'{parent}: {commit} sha256 {sha} ({size:,} bytes)')
    if args.dry_run:
        return 0
    write_pins(dict(weights.PARENT_PINS, **pins), Path(args.weights_py))
    print(f'Wrote {args.weights_py}; then run `aff-zoo cards` (the cards show the pinned revisions).')
    return 0


def register_cli(subparsers):
    p = subparsers.add_parser('pin-parents', help="pin the upcycled weights' timm parents (Hub commit + sha256)",
                              description=__doc__.splitlines()[0])
    p.add_argument('--revision', default='main', help='branch or tag of the parent repos to pin (default main)')
    p.add_argument('--weights-py', default=str(WEIGHTS_PY), help='registry file to rewrite')
    p.add_argument('--dry-run', action='store_true', help='print the pins, write nothing')
    p.set_defaults(func=_cmd_pin_parents)
    return p
