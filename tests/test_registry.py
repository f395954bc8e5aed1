"""Everything derived from the weights registry agrees with it: timm's pretrained cfgs, the torch.hub
entrypoints, the model cards (model_cards/ and hub/<name>/README.md), the hub/ folders and the README
table. ``aff-zoo cards`` regenerates the generated files when a record changes."""
import re
from dataclasses import replace
from pathlib import Path

import pytest
import timm

import aff_zoo
from aff_zoo.models import weights
from aff_zoo.publish import cards
from aff_zoo.publish.folders import validate_folder
from aff_zoo.models._builder import registered_weights
from aff_zoo.models.weights import WEIGHTS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _default_org(monkeypatch):
    monkeypatch.delenv('AFF_ZOO_HUB_ORG', raising=False)


def test_records_are_complete_and_unique():
    assert len({w.name for w in WEIGHTS}) == len(WEIGHTS)
    for w in WEIGHTS:
        assert w.arch in aff_zoo.list_models(), w.name
        assert re.fullmatch(r'[0-9a-f]{64}', w.sha256) and w.size > 0, w.name
        assert w.filename.endswith('.safetensors'), w.name
        assert w.top1 is not None and w.metrics.get('epochs') and w.metrics.get('split'), w.name
        assert w.recipe and w.license and w.citation and w.dataset, w.name
        assert w.hf_hub_id == f'aff-zoo/{w.name}'


def _check_timm_cfgs(records):
    aff_pretrained = {m for m in timm.list_models(pretrained=True) if m.split('.')[0] in aff_zoo.list_models()}
    assert aff_pretrained == {w.name for w in records} | {u.name for u in weights.UPCYCLED}
    for w in records:
        cfg = timm.models.get_pretrained_cfg(w.name)
        assert cfg.hf_hub_id == w.hf_hub_id and cfg.num_classes == w.num_classes
        assert (tuple(cfg.input_size), tuple(cfg.mean), tuple(cfg.std)) == (w.input_size, w.mean, w.std)
        assert (cfg.interpolation, cfg.crop_pct, cfg.license) == (w.interpolation, w.crop_pct, w.license)


def test_timm_cfgs_match_registry(hub_checkpoint):
    _check_timm_cfgs(WEIGHTS)
    _, record = hub_checkpoint
    with registered_weights(record):  # a registered record reaches timm (and leaves with the context)
        _check_timm_cfgs(weights.WEIGHTS)
        first = next(w for w in weights.WEIGHTS if w.arch == 'aff_resnet8')
        assert timm.models.get_pretrained_cfg('aff_resnet8').tag == first.tag  # first record = default tag
    _check_timm_cfgs(WEIGHTS)


def test_hub_folders_and_cards_match_registry():
    names = {w.name for w in WEIGHTS}
    hub_dirs = {p.name for p in (ROOT / 'hub').iterdir() if p.is_dir()} if (ROOT / 'hub').is_dir() else set()
    card_files = {p.stem for p in (ROOT / 'model_cards').glob('*.md')} if (ROOT / 'model_cards').is_dir() else set()
    assert hub_dirs == names, 'every registered weight has exactly one hub/<name>/ folder'
    assert card_files == names | {u.name for u in weights.UPCYCLED}, \
        'every registered (or upcycled) weight has exactly one model_cards/<name>.md'
    for w in WEIGHTS:
        validate_folder(ROOT / 'hub' / w.name, w)  # hash, size, config.json, card


def test_generated_files_are_current():
    """Cards and the README weights table as ``aff-zoo cards`` would write them; run it when this fails
    (tests/test_cli.py checks the README's models table)."""
    assert cards.write_cards(ROOT, check=True) == []


def test_stale_card_and_table_are_detected(hub_checkpoint, tmp_path):
    """The check above can fail: a registry change makes the generated files stale."""
    folder, record = hub_checkpoint
    (tmp_path / 'hub').mkdir()
    (tmp_path / 'README.md').write_text('# x\n\n<!-- weights:start -->\nold\n<!-- weights:end -->\n\nrest\n')
    with registered_weights(record, replace=True):
        assert len(cards.write_cards(tmp_path)) == 3  # card, hub README, README table written
        assert cards.write_cards(tmp_path, check=True) == []
        readme = (tmp_path / 'README.md').read_text()
        row = f'| [`{record.name}`](https://huggingface.co/{record.hf_hub_id}) | 12.50 | 50.00 |'  # name links the repo
        assert row in readme and readme.endswith('rest\n')
        assert (tmp_path / 'model_cards' / f'{record.name}.md').read_text() == \
            (folder / 'README.md').read_text()
    changed = replace(record, metrics=dict(record.metrics, top1=13.0))
    with registered_weights(changed, replace=True):
        stale = cards.write_cards(tmp_path, check=True)
    assert sorted(p.name for p in stale) == ['README.md', 'README.md', f'{record.name}.md']
