"""The console command and the README's generated parts."""
import subprocess
import sys
from pathlib import Path

import pytest

from aff_zoo.cli import COMMANDS, build_parser, main
from aff_zoo.models.stats import models_table
from aff_zoo.publish.docs import SECTIONS, read_section, replace_section

ROOT = Path(__file__).resolve().parents[1]


def test_list_prints_every_model(capsys):
    assert main(['list', 'iaff_resnet*']) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ['model', 'family', 'fusion']
    names = [line.split()[0] for line in out.splitlines()[1:]]
    assert names == ['iaff_resnet50', 'iaff_resnet101', 'iaff_resnet8', 'iaff_resnet20', 'iaff_resnet32',
                     'iaff_resnet56', 'iaff_resnet32_w4', 'iaff_resnet9', 'iaff_resnet11']


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


def test_classify_warns_about_random_weights(tmp_path, capsys):
    from PIL import Image
    img = tmp_path / 'img.png'
    Image.new('RGB', (32, 32), (255, 0, 0)).save(img)
    assert main(['classify', str(img), '--model', 'aff_resnet20', '--topk', '1']) == 0
    err = capsys.readouterr().err
    assert 'WARNING: aff_resnet20 is a randomly initialised network' in err and 'not predictions' in err
    assert '--pretrained (trained weights: aff_resnet20.cifar10_e12)' in err
    assert main(['classify', str(img), '--model', 'aff_resnet8', '--topk', '1']) == 0
    assert 'aff_resnet8 has no trained weights yet' in capsys.readouterr().err


def test_classify_bad_inputs_are_clear(tmp_path, capsys):
    assert main(['classify', str(tmp_path / 'missing.jpg'), '--model', 'aff_resnet8']) == 2
    assert 'no such image file' in capsys.readouterr().err
    bad = tmp_path / 'bad.jpg'
    bad.write_bytes(b'not an image')
    assert main(['classify', str(bad), '--model', 'aff_resnet8']) == 2
    assert 'cannot read' in capsys.readouterr().err
    assert main(['classify', str(bad), '--model', 'no_such_model']) == 2
    assert 'Unknown model' in capsys.readouterr().err


def test_command_table_matches_the_modules():
    """COMMANDS (name -> module, help) is the one source: each module registers exactly its names, and the
    full parser (every module loaded) has exactly these commands, with the table's help."""
    parser = build_parser('*')
    sub = next(a for a in parser._actions if a.dest == 'command')
    assert set(sub.choices) == set(COMMANDS)
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert helps == {name: c.help for name, c in COMMANDS.items()}
    for name, c in COMMANDS.items():  # each command's own parser comes from its module
        assert sub.choices[name].get_default('func').__module__ == c.module, name


def test_console_script_help_is_complete_and_lazy():
    """In a fresh interpreter: `aff-zoo --help` shows the whole description and every command and imports
    none of the command modules; `aff-zoo list` runs (python -m aff_zoo.cli is the console script's code)."""
    code = ('import sys, runpy\n'
            'sys.argv = ["aff-zoo", "--help"]\n'
            'try:\n    runpy.run_module("aff_zoo.cli", run_name="__main__")\nexcept SystemExit:\n    pass\n'
            'print("loaded:", sorted(m for m in sys.modules if m.startswith(("aff_zoo.training", "aff_zoo.deploy", '
            '"aff_zoo.publish", "aff_zoo.data"))))\n'
            'from aff_zoo.cli import main\n'
            'main(["list", "aff_resnet8"])\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert 'loaded: []' in out, out
    assert 'and write Hub checkpoint folders and model cards.' in out and 'other subcommands are' not in out
    for name in COMMANDS:
        assert f'    {name}' in out
    assert out.splitlines()[-1].split()[:3] == ['aff_resnet8', 'CIFAR', 'aff']


def test_replace_section_roundtrip_and_missing_markers():
    text = 'a\n<!-- t:start -->\nold\n<!-- t:end -->\nb\n'
    new = replace_section(text, 't', 'new')
    assert read_section(new, 't') == 'new\n' and new.startswith('a\n') and new.endswith('b\n')
    with pytest.raises(ValueError, match='markers'):
        replace_section(text, 'other', 'x')


@pytest.mark.parametrize('name', sorted(SECTIONS))
def test_generated_sections_are_current(name):
    page = SECTIONS[name].page
    text = (ROOT / page).read_text()
    assert read_section(text, name).strip() == SECTIONS[name].render().strip(), \
        f'{page}: section {name} is stale: run python scripts/update_readme.py'


def test_ci_runs_the_readme_commands():
    readme = (ROOT / 'README.md').read_text()
    setup = read_section(readme, 'setup')
    assert 'pip install .' in setup and 'pytest' in setup
    assert 'setup:start' in (ROOT / '.ci/run').read_text()


def test_stats_table_is_current():
    """`aff-zoo list` serves parameters and GMACs from _stats_table.py: recompute every entry."""
    from aff_zoo.models import list_models
    from aff_zoo.models._stats_table import STATS
    from aff_zoo.models.stats import model_stats
    assert list(STATS) == list_models(), 'models added or removed: run python scripts/update_readme.py'
    for name, (params, macs) in STATS.items():
        assert model_stats(name) == (params, pytest.approx(macs, rel=1e-9)), \
            f'{name}: stale figures in _stats_table.py; run python scripts/update_readme.py'


def test_list_computes_models_outside_the_table(monkeypatch):
    from aff_zoo.models import _stats_table, stats
    monkeypatch.setattr(_stats_table, 'STATS', {})
    assert stats.cached_stats('aff_resnet8') == stats.model_stats('aff_resnet8')
    monkeypatch.setattr(_stats_table, 'STATS', {'aff_resnet8': (1, 2.0)})
    assert '| 0.00 | 2.000 |' in stats.models_table('aff_resnet8', 'markdown')
