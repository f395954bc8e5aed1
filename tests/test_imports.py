"""The package's import rule, enforced: no import cycle among aff_zoo modules, and no upward import.

Layers, lowest first: utils < layers < models < data < training < deploy < publish < cli. A module imports
only from its own layer or below; ``aff_zoo/__init__.py`` imports only layers/models (``import aff_zoo``
therefore counts as a models-layer import); nothing imports ``aff_zoo.cli``; ``hubconf.py`` imports only
models/layers/utils. Every ``import`` statement counts, top-level or inside a function, relative or absolute.

Written as an ``ast`` test rather than an import-linter contract (``lint-imports``): it needs no extra
dependency in the test extra, runs inside the suite CI already runs, names the whole cycle when it fails,
and states the rules that a layers contract does not express (``__init__`` and ``hubconf.py``).
"""
import ast
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = 'aff_zoo'
LAYERS = ['utils', 'layers', 'models', 'data', 'training', 'deploy', 'publish', 'cli']
INIT_MAY_IMPORT = {'layers', 'models'}
HUBCONF = 'hubconf'
HUBCONF_MAY_IMPORT = {'utils', 'layers', 'models'}

Graph = Dict[str, Set[str]]


def module_names(root: Path, package: str = PACKAGE) -> Dict[str, Path]:
    """``{dotted module name: file}`` for every module of ``package`` under ``root``."""
    out = {}
    for f in sorted((root / package).rglob('*.py')):
        parts = list(f.relative_to(root).with_suffix('').parts)
        if parts[-1] == '__init__':
            parts = parts[:-1]
        out['.'.join(parts)] = f
    return out


def imports_of(source: str, name: str, is_package: bool, known: Set[str],
               missing: Optional[List[str]] = None) -> Set[str]:
    """The aff_zoo modules that ``source`` (module ``name``) imports, anywhere in the file.

    ``from X import y`` counts as importing ``X.y`` when that is a module, else ``X`` (the package's
    ``__init__``); ``import X.y`` counts as importing ``X.y``. Imports of aff_zoo modules that do not
    exist are appended to ``missing``."""
    found = set()
    package = name if is_package else name.rpartition('.')[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = '.'.join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ''
            targets = []
            for a in node.names:
                sub = f'{prefix}.{a.name}'
                targets.append(sub if sub in known else prefix)
        else:
            continue
        for t in targets:
            if t == PACKAGE or t.startswith(PACKAGE + '.'):
                if isinstance(node, ast.Import) and t not in known and missing is not None:
                    missing.append(f'{name}: import {t}')
                if isinstance(node, ast.ImportFrom) and prefix not in known and missing is not None:
                    missing.append(f'{name}: from {prefix} import ...')
                while t not in known and '.' in t:  # import of a name inside a module
                    t = t.rpartition('.')[0]
                if t in known and t != name:
                    found.add(t)
    return found


def module_graph(root: Path = ROOT, missing: Optional[List[str]] = None) -> Graph:
    """``{module: modules it imports}`` for aff_zoo and hubconf.py."""
    files = module_names(root)
    known = set(files)
    graph = {name: imports_of(f.read_text(), name, f.name == '__init__.py', known, missing)
             for name, f in files.items()}
    hubconf = root / 'hubconf.py'
    if hubconf.is_file():
        graph[HUBCONF] = imports_of(hubconf.read_text(), HUBCONF, False, known, missing)
    return graph


def find_cycles(graph: Graph) -> List[List[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, set(c)) for c in components]


def _cycle_in(graph: Graph, comp: Set[str]) -> List[str]:
    """A concrete cycle through the component's first module (breadth-first, so the shortest one)."""
    start = min(comp)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ()) & comp):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError('not a cycle')  # pragma: no cover


def layer_of(module: str) -> Optional[str]:
    """The layer of an aff_zoo module (``None`` for ``aff_zoo/__init__`` and hubconf)."""
    parts = module.split('.')
    return parts[1] if len(parts) > 1 and parts[0] == PACKAGE else None


def violations(graph: Graph) -> List[Tuple[str, str, str]]:
    """``(importer, imported, why)`` for every import that breaks the layer rule."""
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    init_rank = max(rank[x] for x in INIT_MAY_IMPORT)  # `import aff_zoo` is as high as what it imports
    bad = []
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            dst_layer = layer_of(dst)
            if dst_layer == 'cli':
                bad.append((src, dst, 'nothing may import the CLI'))
            elif src == HUBCONF:
                if dst_layer not in HUBCONF_MAY_IMPORT and dst != PACKAGE:
                    bad.append((src, dst, f'hubconf.py may import only {sorted(HUBCONF_MAY_IMPORT)}'))
            elif src == PACKAGE:
                if dst_layer not in INIT_MAY_IMPORT:
                    bad.append((src, dst, f'aff_zoo/__init__.py may import only {sorted(INIT_MAY_IMPORT)}'))
            else:
                src_rank = rank[layer_of(src)]
                dst_rank = init_rank if dst == PACKAGE else rank[dst_layer]
                if dst_rank > src_rank:
                    bad.append((src, dst, f'upward import: {layer_of(src)} (rank {src_rank}) imports '
                                          f'{dst_layer or "aff_zoo/__init__"} (rank {dst_rank})'))
    return bad


# ---- the checker itself, on synthetic packages (so that it can fail) ----

def _write(root: Path, files: Dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_checker_resolves_relative_absolute_and_function_level_imports(tmp_path):
    _write(tmp_path, {
        'aff_zoo/__init__.py': 'from .models import net\n',
        'aff_zoo/utils.py': '',
        'aff_zoo/models/__init__.py': 'from . import net\n',
        'aff_zoo/models/net.py': 'from ..utils import x\nfrom ..layers.fusion import AFF\n',
        'aff_zoo/layers/__init__.py': '',
        'aff_zoo/layers/fusion.py': 'def f():\n    import aff_zoo\n',
        'aff_zoo/training/train.py': 'def g():\n    from .. import models\n    import aff_zoo.models.net as n\n',
        'aff_zoo/cli.py': 'import aff_zoo.training.train\n',
        'hubconf.py': 'import aff_zoo\nfrom aff_zoo.cli import main\n',
        'aff_zoo/deploy/bench.py': 'def h():\n    from .docs import replace_section\n',
    })
    missing = []
    g = module_graph(tmp_path, missing)
    assert missing == ['aff_zoo.deploy.bench: from aff_zoo.deploy.docs import ...']
    assert g['aff_zoo.models.net'] == {'aff_zoo.utils', 'aff_zoo.layers.fusion'}
    assert g['aff_zoo.layers.fusion'] == {'aff_zoo'}
    assert g['aff_zoo.training.train'] == {'aff_zoo.models', 'aff_zoo.models.net'}
    assert g['aff_zoo'] == {'aff_zoo.models.net'}  # `from .models import net`: the module net
    assert g[HUBCONF] == {'aff_zoo', 'aff_zoo.cli'}
    assert find_cycles(g) == [['aff_zoo', 'aff_zoo.models.net', 'aff_zoo.layers.fusion', 'aff_zoo']]
    bad = {(s, d) for s, d, _ in violations(g)}
    assert bad == {('aff_zoo.layers.fusion', 'aff_zoo'), (HUBCONF, 'aff_zoo.cli')}


def test_checker_finds_upward_imports_and_init_rule():
    g = {'aff_zoo': {'aff_zoo.training.train'}, 'aff_zoo.utils': set(),
         'aff_zoo.models.pretrained': {'aff_zoo.training.train', 'aff_zoo.utils'},
         'aff_zoo.training.train': {'aff_zoo.models.pretrained', 'aff_zoo'},
         'aff_zoo.deploy.benchmark': {'aff_zoo.publish.docs'}, 'aff_zoo.publish.docs': {'aff_zoo.cli'},
         'aff_zoo.cli': set()}
    why = {(s, d): w for s, d, w in violations(g)}
    assert set(why) == {('aff_zoo', 'aff_zoo.training.train'), ('aff_zoo.models.pretrained', 'aff_zoo.training.train'),
                        ('aff_zoo.deploy.benchmark', 'aff_zoo.publish.docs'), ('aff_zoo.publish.docs', 'aff_zoo.cli')}
    assert 'CLI' in why[('aff_zoo.publish.docs', 'aff_zoo.cli')]
    assert find_cycles(g) == [['aff_zoo', 'aff_zoo.training.train', 'aff_zoo']]  # {aff_zoo, pretrained, train}
    g['aff_zoo'] = set()
    assert find_cycles(g) == [['aff_zoo.models.pretrained', 'aff_zoo.training.train', 'aff_zoo.models.pretrained']]
    assert find_cycles({'a': {'b'}, 'b': {'c'}, 'c': set()}) == []
    assert find_cycles({'a': {'a'}}) == [['a', 'a']]


# ---- the rule, on this repository ----

@pytest.fixture(scope='module')
def graph():
    return module_graph(ROOT)


def test_every_layer_has_modules(graph):
    assert {layer_of(m) for m in graph} - {None} == set(LAYERS), 'a layer moved: update LAYERS here and HELPERS'


def test_no_import_of_a_missing_module():
    missing = []
    module_graph(ROOT, missing)
    assert not missing, 'imports of aff_zoo modules that do not exist:\n' + '\n'.join(missing)


def test_no_import_cycle(graph):
    cycles = find_cycles(graph)
    assert not cycles, 'import cycles (break each with a lower home for the shared piece):\n' + '\n'.join(
        ' -> '.join(c) for c in cycles)


def test_no_upward_import(graph):
    bad = violations(graph)
    assert not bad, 'imports against the layer rule (tests/test_imports.py docstring):\n' + '\n'.join(
        f'{s} imports {d}: {w}' for s, d, w in bad)
