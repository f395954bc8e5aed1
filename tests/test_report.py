"""README tables come from metrics.json files: pooled seeds, refusal to mix recipes, marker replacement."""
import json

import pytest

from aff_zoo.cli import main
from aff_zoo.publish.report import ablation_table, load_runs
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
