"""The console command and the README's generated parts."""
import subprocess
import sys
from pathlib import Path

import pytest

from aff_zoo.cli import main
from aff_zoo.models.stats import models_table
from aff_zoo.publish.docs import SECTIONS, read_section, replace_section

ROOT = Path(__file__).resolve().parents[1]


def test_list_prints_every_model(capsys):
    assert main(['list', 'iaff_resnet*']) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ['model', 'family', 'fusion']
    names = [line.split()[0] for line in out.splitlines()[1:]]
    assert names == ['iaff_resnet50', 'iaff_resnet101', 'iaff_resnet8', 'iaff_resnet20', 'iaff_resnet32',
                     'iaff_resnet56']


def test_list_unknown_pattern_is_a_clear_error(capsys):
    assert main(['list', 'nothing_like_this*']) == 2
    assert 'No aff_zoo model matches' in capsys.readouterr().err


def test_classify_runs_on_image_files(tmp_path, capsys):
    from PIL import Image
    paths = []
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        p = tmp_path / f'img{i}.png'
        Image.new('RGB', (40, 30), color).save(p)
        paths.append(str(p))
    assert main(['classify', *paths, '--model', 'aff_resnet8', '--topk', '3']) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == paths[0] and len(out) == 2 * 4
    probs = [float(line.split('%')[0]) for line in out[1:4]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.01


def test_classify_bad_inputs_are_clear(tmp_path, capsys):
    assert main(['classify', str(tmp_path / 'missing.jpg'), '--model', 'aff_resnet8']) == 2
    assert 'no such image file' in capsys.readouterr().err
    bad = tmp_path / 'bad.jpg'
    bad.write_bytes(b'not an image')
    assert main(['classify', str(bad), '--model', 'aff_resnet8']) == 2
    assert 'cannot read' in capsys.readouterr().err
    assert main(['classify', str(bad), '--model', 'no_such_model']) == 2
    assert 'Unknown model' in capsys.readouterr().err


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, '-m', 'aff_zoo.cli', 'list', 'aff_resnet8'],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert 'aff_resnet8' in out


def test_replace_section_roundtrip_and_missing_markers():
    text = 'a\n<!-- t:start -->\nold\n<!-- t:end -->\nb\n'
    new = replace_section(text, 't', 'new')
    assert read_section(new, 't') == 'new\n' and new.startswith('a\n') and new.endswith('b\n')
    with pytest.raises(ValueError, match='markers'):
        replace_section(text, 'other', 'x')


@pytest.mark.parametrize('name', sorted(SECTIONS))
def test_readme_generated_sections_are_current(name):
    readme = (ROOT / 'README.md').read_text()
    assert read_section(readme, name).strip() == SECTIONS[name]().strip(), \
        f'README section {name} is stale: run python scripts/update_readme.py'


def test_ci_runs_the_readme_commands():
    readme = (ROOT / 'README.md').read_text()
    setup = read_section(readme, 'setup')
    assert 'pip install .' in setup and 'pytest' in setup
    assert 'setup:start' in (ROOT / '.ci/run').read_text()
