"""Every published CIFAR-10 weight file reproduces, on the validation split, the accuracy its record states.

Loads the shipped ``hub/<name>/model.safetensors`` the way the issue asks a user to (timm with
``pretrained_cfg_overlay=dict(file=...)``) and evaluates it with ``aff_zoo.training.evaluate``. Needs the
CIFAR-10 JPEG archive (``../shared/data/``); skips, saying why, where it is absent.

The flip-TTA column is rechecked for one file per network only (the first of each in the registry): the flip view
doubles a file's cost (about 32 s for a ResNet-11 on 2 cores), and what it adds to the single-view check is
``evaluate``'s flip path, which is the same for every file; ``aff-zoo export`` measured each file's own figure.
"""
from pathlib import Path

import pytest
import timm

import aff_zoo  # noqa: F401  (registers the models)
from aff_zoo.cli import _label_names
from aff_zoo.data import load_images, split_train_val
from aff_zoo.training.evaluate import evaluate
from aff_zoo.models.weights import WEIGHTS

from _cifar_jpegs import ARCHIVE, archive_path

ROOT = Path(__file__).resolve().parents[1]
CIFAR = [w for w in WEIGHTS if w.dataset_id == 'cifar10']
FLIP_CHECKED = {next(w.name for w in CIFAR if w.arch.split('_', 1)[1] == net)
                for net in {w.arch.split('_', 1)[1] for w in CIFAR}}


@pytest.fixture(scope='module')
def val_split():
    path = archive_path()
    if path is None:
        pytest.skip(f'{ARCHIVE} not found (expected in ../shared/data/ or $AFF_ZOO_CIFAR10_JPEG)')
    _, val = split_train_val(load_images(str(path), progress=False), 500)
    return val.sha256, val


@pytest.mark.parametrize('w', CIFAR, ids=[w.name for w in CIFAR])
def test_published_weights_reproduce_their_val_accuracy(w, val_split):
    sha, val = val_split
    if sha != w.metrics['dataset_sha256']:
        pytest.skip(f'the archive found is not the one {w.name} was validated on (sha256 {sha[:12]}...)')
    assert w.metrics['split'].startswith('last 500 images per class') and w.metrics['val_images'] == len(val)
    model = timm.create_model(w.arch, pretrained=True, num_classes=w.num_classes,
                              pretrained_cfg_overlay=dict(file=str(ROOT / 'hub' / w.name / w.filename)))
    assert _label_names(model) == list(val.classes)  # `aff-zoo classify` prints the data's class names
    flip = 'top1_flip' in w.metrics and w.name in FLIP_CHECKED
    res = evaluate(model, val, batch_size=500, tta_flip=flip)
    assert res['images'] == w.metrics['val_images']
    assert (res['top1'], res['top5']) == pytest.approx((w.metrics['top1'], w.metrics['top5']), abs=0.011)
    if flip:  # the README's separate flip-TTA column
        assert res['top1_flip'] == pytest.approx(w.metrics['top1_flip'], abs=0.011)


def test_each_networks_flip_check_has_a_figure_to_check():
    missing = [name for name in FLIP_CHECKED if 'top1_flip' not in next(w for w in CIFAR if w.name == name).metrics]
    assert not missing, f'{missing}: no flip figure, so no file of that network has its flip column checked'
