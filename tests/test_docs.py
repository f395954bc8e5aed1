"""The README a newcomer reads in five minutes, the docs pages it links, LICENSE and CITATION.cff."""
import re
from pathlib import Path

import pytest
import yaml

import aff_zoo
from aff_zoo.models.weights import PAPER_CITATION
from aff_zoo.utils import read_section

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()
PAGES = sorted((ROOT / 'docs').glob('*.md'))


def test_readme_is_short_and_has_its_sections():
    size = len(README.encode())
    assert size <= 12 * 1024, f'README.md is {size} bytes; move detail into docs/*.md (at most 12 KB)'
    headings = re.findall(r'^## (.+)$', README, re.M)
    for h in ['What AFF is', 'Install', 'Quickstart', 'Pretrained weights', 'Models', 'Documentation', 'License',
              'Citation']:
        assert h in headings, f'README lacks the section "## {h}"'
    quick = README[README.index('## Quickstart'):README.index('## Pretrained weights')]
    for piece in ['timm.create_model', 'torch.hub.load', 'AFF(', 'aff-zoo classify', 'aff-zoo finetune']:
        assert piece in quick


def test_setup_block_is_the_two_commands():
    """.ci/run runs these lines; they stay exactly two."""
    lines = [x for x in read_section(README, 'setup').splitlines() if x and not x.startswith('```')]
    assert lines == ['python -m pip install . && aff-zoo list', 'python -m pip install ".[test]" && python -m pytest -q']


def _links(path: Path):
    text = path.read_text()
    for target in re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', text):
        if not re.match(r'[a-z]+:', target):
            yield target


@pytest.mark.parametrize('path', [ROOT / 'README.md', *PAGES], ids=lambda p: p.name)
def test_relative_links_resolve(path):
    missing = [t for t in _links(path) if not (path.parent / t).exists()]
    assert not missing, f'{path.name} links to files that do not exist: {missing}'


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t).resolve() for t in _links(ROOT / 'README.md')}
    assert {p.resolve() for p in PAGES} <= linked, 'add the page to the README\'s Documentation list'


def test_no_stale_weights_tag_in_the_docs():
    """Examples must use weight names that exist in the registry (they load)."""
    from aff_zoo.models.weights import available_tags
    names = set(available_tags())
    for path in [ROOT / 'README.md', *PAGES]:
        for name in re.findall(r'\b((?:aff|iaff|add)_resnet\d+\.[a-z0-9_]+)', path.read_text()):
            assert name in names, f'{path.name} mentions {name}, which is not a published weight file'


def test_license_and_citation():
    license_text = (ROOT / 'LICENSE').read_text()
    assert 'Apache License' in license_text and 'Version 2.0, January 2004' in license_text
    assert 'END OF TERMS AND CONDITIONS' in license_text  # the full text, not a pointer to it
    cff = yaml.safe_load((ROOT / 'CITATION.cff').read_text())
    assert cff['cff-version'] == '1.2.0' and cff['version'] == aff_zoo.__version__
    assert cff['license'] == 'Apache-2.0'
    paper = cff['preferred-citation']
    assert paper['title'] == 'Attentional Feature Fusion' and paper['year'] == 2021
    assert [a['family-names'] for a in paper['authors']] == ['Dai', 'Gieseke', 'Oehmcke', 'Wu', 'Barnard']
    assert PAPER_CITATION in README, 'the README cites the paper as the registry and the model cards do'


def test_every_recipe_has_a_row_in_training_loop_doc():
    from aff_zoo.training.train import RECIPES
    rows = set(re.findall(r'^\| `([a-z0-9-]+)` \|', (ROOT / 'docs' / 'training-loop.md').read_text(), re.M))
    assert set(RECIPES) <= rows, f'docs/training-loop.md lacks a row for {sorted(set(RECIPES) - rows)}'
