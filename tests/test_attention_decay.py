"""scripts/attention_decay.py: the decay-only replay against hand-written recurrences, its verdict on a published
file, and its table in docs/cifar10-weights.md ("What the attention learned")."""
import importlib.util
import os

import pytest

from aff_zoo.training.train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    path = os.path.join(ROOT, 'scripts', 'attention_decay.py')
    spec = importlib.util.spec_from_file_location('attention_decay', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _constant_lr(**kw):
    return TrainConfig(opt='sgd', lr=0.1, min_lr=0.1, warmup_epochs=0.0, epochs=3, weight_decay=0.01,
                       no_wd_bn_bias=False, **kw)


def test_decay_only_equals_the_hand_written_recurrence():
    mod = _module()
    # plain SGD: w <- w (1 - lr wd) per update
    assert mod.decay_only(_constant_lr(momentum=0.0, nesterov=False), 5, 3) == pytest.approx(0.999 ** 15, rel=1e-12)
    # Nesterov momentum with a zero loss gradient: g = wd w, v <- m v + g, w <- w - lr (g + m v)
    w, v = 1.0, 0.0
    for _ in range(15):
        g = 0.01 * w
        v = 0.9 * v + g
        w -= 0.1 * (g + 0.9 * v)
    assert mod.decay_only(_constant_lr(momentum=0.9, nesterov=True), 5, 3) == pytest.approx(w, rel=1e-12)


def test_the_published_iaffs_middle_inner_attention_never_trained():
    mod = _module()
    floor, rows = mod.attention_rows('iaff_resnet11.cifar10_mix_e150')
    assert 1e-6 < floor < 3e-6  # 139 epochs of the recipe's decay
    cells = dict(rows)
    inner, outer = cells['stages.1.block.fusion.att1'], cells['stages.1.block.fusion.att2']
    assert inner['local'] == (480, 100.0) and inner['global'] == (96, 100.0)
    assert outer['local'][1] < 5  # the outer attention's local branch trained
    floor, rows = mod.attention_rows('aff_resnet20.cifar10_e12')  # that recipe keeps decay off the norms
    assert floor == 1.0 and len(rows) == 9  # a scale without a gradient stays at its start; nine AFF blocks


def test_the_docs_table_is_the_scripts_output():
    from aff_zoo.utils import read_section
    with open(os.path.join(ROOT, 'docs', 'cifar10-weights.md')) as f:
        table = read_section(f.read(), 'attention-decay-table')
    assert table == _module().render(_module().DOC_NAMES).rstrip('\n') + '\n', (
        'stale: run python scripts/attention_decay.py --doc docs/cifar10-weights.md')
