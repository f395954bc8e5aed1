"""README tables come from metrics.json files: pooled seeds, refusal to mix recipes, marker replacement."""
import json
from pathlib import Path

import pytest

from aff_zoo.cli import main
from aff_zoo.publish.report import ablation_table, load_runs, paired_table
from aff_zoo.utils import replace_section


def _run(root, model, seed, top1, lr=0.1):
    d = root / f'{model}-s{seed}'
    d.mkdir()
    cfg = dict(seed=seed, epochs=3, batch_size=128, opt='sgd', lr=lr, warmup_epochs=0.5, weight_decay=5e-4)
    (d / 'metrics.json').write_text(json.dumps(dict(
        model=model, val_top1=top1, val_top5=99.0, params=1000, train_images_per_s=100.0, train_images=20000,
        val_images=5000, val_split='last 500', dataset_sha256='ab' * 32, git_commit='c' * 40, config=cfg,
        best_epoch=3, epochs=3, total_train_seconds=60.0)))
    return d


def test_ablation_table_pools_seeds(tmp_path):
    _run(tmp_path, 'add_resnet8', 0, 70.0)
    _run(tmp_path, 'add_resnet8', 1, 72.0)
    _run(tmp_path, 'aff_resnet8', 0, 75.5)
    (tmp_path / 'unfinished').mkdir()
    table = ablation_table(load_runs([str(tmp_path / '*')]))
    rows = [l for l in table.splitlines() if l.startswith('| `')]
    assert rows[0].startswith('| `aff_resnet8` | aff | 75.50 |')  # best first
    assert '| 71.00 ± 1.41 | 0: 70.00, 1: 72.00 |' in rows[1]
    readme = tmp_path / 'README.md'
    readme.write_text('x\n<!-- ablation-table:start -->\nold\n<!-- ablation-table:end -->\ny\n')
    assert main(['runs-table', str(tmp_path / '*'), '--readme', str(readme)]) == 0
    assert 'old' not in readme.read_text() and '71.00 ± 1.41' in readme.read_text()
    readme.write_text('<!-- ablation-table:start -->\nkept\n<!-- ablation-table:end -->\n'
                      '<!-- second-table:start -->\nold\n<!-- second-table:end -->\n')
    assert main(['runs-table', str(tmp_path / '*'), '--doc', str(readme), '--section', 'second-table']) == 0
    assert 'kept' in readme.read_text() and 'old' not in readme.read_text()


def test_mixed_recipes_and_missing_markers_are_refused(tmp_path):
    _run(tmp_path, 'add_resnet8', 0, 70.0)
    _run(tmp_path, 'aff_resnet8', 0, 75.0, lr=0.2)
    with pytest.raises(ValueError, match='one recipe'):
        ablation_table(load_runs([str(tmp_path / '*')]))
    with pytest.raises(ValueError, match='markers'):
        replace_section('no markers', 'ablation-table', 'table')


def test_benchmark_column(tmp_path):
    runs = tmp_path / 'runs'
    runs.mkdir()
    _run(runs, 'add_resnet8', 0, 70.0)
    _run(runs, 'aff_resnet8', 0, 71.0)
    bench = dict(meta=dict(command='python scripts/benchmark_train_step.py add_resnet8', batch_size=128,
                           device='cpu', threads=2), models=dict(add_resnet8=dict(images_per_s=1234.4, images_per_cpu_s=99.0)))
    table = ablation_table(load_runs([str(runs / '*')]), bench)
    assert '| 1234 |' in table and '| – |' in table and 'benchmark_train_step.py add_resnet8' in table


def test_paired_difference_to_addition_uses_the_same_seeds(tmp_path):
    for seed, add, aff in [(0, 70.0, 71.0), (1, 72.0, 72.5), (2, 74.0, 75.5)]:
        _run(tmp_path, 'add_resnet8', seed, add)
        _run(tmp_path, 'aff_resnet8', seed, aff)
    _run(tmp_path, 'aff_resnet8', 3, 90.0)  # no add run with seed 3: not in the paired difference
    _run(tmp_path, 'se_resnet8', 1, 71.0)
    rows = {l.split('|')[1].strip(' `'): l for l in ablation_table(load_runs([str(tmp_path / '*')])).splitlines()
            if l.startswith('| `')}
    # differences 1.0, 0.5, 1.5: mean 1.00, sample std 0.50, t = 1.0 / (0.5 / sqrt 3) = 3.46
    assert '| +1.00 ± 0.50 (3 seeds, t = 3.5) |' in rows['aff_resnet8']
    assert '| -1.00 (1 seed) |' in rows['se_resnet8']
    assert '| add | 72.00 ± 2.00 | 0: 70.00, 1: 72.00, 2: 74.00 | – |' in rows['add_resnet8']


def test_runs_from_before_a_new_config_field_share_the_recipe(tmp_path):
    """A run written before TrainConfig gained a field (cutout) has that field's default: same recipe."""
    old = _run(tmp_path, 'add_resnet8', 0, 70.0)
    new = _run(tmp_path, 'aff_resnet8', 0, 71.0)
    m = json.loads((new / 'metrics.json').read_text())
    m['config']['cutout'] = 0
    (new / 'metrics.json').write_text(json.dumps(m))
    assert 'cutout' not in json.loads((old / 'metrics.json').read_text())['config']
    assert '+1.00 (1 seed)' in ablation_table(load_runs([str(tmp_path / '*')]))
    m['config']['cutout'] = 8
    (new / 'metrics.json').write_text(json.dumps(m))
    with pytest.raises(ValueError, match='one recipe'):
        ablation_table(load_runs([str(tmp_path / '*')]))


def test_paired_table_compares_the_same_model_and_seed(tmp_path):
    new, old = tmp_path / 'new', tmp_path / 'old'
    new.mkdir(), old.mkdir()
    for seed, a, b in [(0, 71.0, 70.0), (1, 72.0, 72.5)]:
        _run(new, 'aff_resnet8', seed, a)
        _run(old, 'aff_resnet8', seed, b)
    _run(old, 'aff_resnet8', 2, 99.0)  # no partner: left out
    _run(old, 'add_resnet8', 0, 10.0)  # another model: left out
    table = paired_table(load_runs([str(new / '*')]), load_runs([str(old / '*')]))
    row = next(l for l in table.splitlines() if l.startswith('| `'))
    # differences +1.0 and -0.5: mean +0.25, sample std 1.06, t = 0.25 / (1.06 / sqrt 2) = 0.33
    assert row == ('| `aff_resnet8` | 0: 71.00 / 70.00, 1: 72.00 / 72.50 | 71.50 | 71.25 | '
                   '+0.25 ± 1.06 (2 seeds, t = 0.3) |')
    readme = tmp_path / 'page.md'
    readme.write_text('<!-- pairs:start -->\nold\n<!-- pairs:end -->\n')
    assert main(['runs-table', str(new / '*'), '--against', str(old / '*'), '--doc', str(readme),
                 '--section', 'pairs']) == 0
    assert row in readme.read_text()
    _run(new, 'se_resnet8', 0, 50.0)
    with pytest.raises(ValueError, match='se_resnet8: no run of the same model and seed'):
        paired_table(load_runs([str(new / '*')]), load_runs([str(old / '*')]))
    _run(old, 'se_resnet8', 0, 50.0, lr=0.2)
    with pytest.raises(ValueError, match='one recipe'):
        paired_table(load_runs([str(new / '*')]), load_runs([str(old / '*')]))


def test_docs_tables_are_generated_from_the_committed_runs():
    """The generated tables of docs/training.md and docs/cifar10-weights.md equal what `aff-zoo runs-table`
    makes of runs/."""
    from aff_zoo.publish.report import checkpoint_table
    from aff_zoo.utils import read_section
    root = Path(__file__).resolve().parents[1]
    page = (root / 'docs' / 'training.md').read_text()
    runs = root / 'runs' / 'cifar10-r9-e48'
    ablation = ablation_table(load_runs([str(runs / '*')]))
    published = root / 'runs' / 'cifar10-r9-e96-cutout12' / '*_resnet9-s0'
    checkpoints = checkpoint_table(load_runs([str(published)]))
    assert read_section(page, 'ablation-table').strip() == ablation.strip()
    assert read_section(page, 'checkpoints-table').strip() == checkpoints.strip()
    assert len(load_runs([str(runs / '*')])) == 12  # add, AFF, iAFF x 3 seeds; SE, SK, local x 1
    thin = root / 'runs' / 'cifar10-e12' / '*_resnet20-s*'
    assert read_section(page, 'ablation-e12-table').strip() == ablation_table(load_runs([str(thin)])).strip()
    zero_vs_add = [str(root / 'runs' / 'cifar10-e12' / 'add_resnet20-s*'),
                   str(root / 'runs' / 'cifar10-e12-zero-init' / '*aff_resnet20-s*')]
    assert read_section(page, 'ablation-e12-zero-table').strip() == ablation_table(load_runs(zero_vs_add)).strip()
    weights_page = (root / 'docs' / 'cifar10-weights.md').read_text()
    zero = root / 'runs' / 'cifar10-e12-zero-init' / '*'
    assert (read_section(weights_page, 'zero-init-table').strip()
            == paired_table(load_runs([str(zero)]), load_runs([str(root / 'runs' / 'cifar10-e12' / '*')])).strip())
    r11 = root / 'runs' / 'cifar10-r11-e8-cpu' / '*'
    assert read_section(weights_page, 'resnet11-e8-table').strip() == ablation_table(load_runs([str(r11)])).strip()
