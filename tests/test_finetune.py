"""Fine-tuning: a small ImageFolder of real CIFAR-10 JPEGs, a pretrained (local-dir) model with a 10-class head,
a new 3-class head, accuracy above chance, and a checkpoint folder that loads back with the same predictions."""
import json
import os

import numpy as np
import pytest
import timm
import torch

from _cifar_jpegs import cifar_images

# Fine-tuning runs the training loop of issue 3 (aff_zoo/train.py, aff_zoo/data.py): until that is merged
# there is nothing to fine-tune with, and the `finetune` subcommand is not registered.
pytest.importorskip('aff_zoo.training.train', reason='aff_zoo.training.train (issue 3, the training loop) is not merged yet')

from aff_zoo.cli import main  # noqa: E402
from aff_zoo.models.pretrained import load_safetensors  # noqa: E402
from aff_zoo.training.finetune import check_balance, load_finetune_data, prepare_model, write_folder  # noqa: E402

CLASSES = ('airplane', 'automobile', 'frog')
PER_CLASS = 16


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv('AFF_ZOO_CACHE', str(tmp_path / 'cache'))


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """<root>/<class>/<NNNN>.jpg: 16 CIFAR-10 training images of each of 3 classes."""
    root = tmp_path_factory.mktemp('imagefolder')
    for cls, imgs in cifar_images({c: PER_CLASS for c in CLASSES}).items():
        os.makedirs(root / cls)
        for i, im in enumerate(imgs):
            im.save(root / cls / f'{i:04d}.jpg', quality=95)
    return str(root)


@pytest.fixture(scope='module')
def pretrained_folder(tmp_path_factory):
    """A '10-class pretrained' aff_resnet8 checkpoint folder (stand-in for the zoo's weights)."""
    torch.manual_seed(0)
    model = timm.create_model('aff_resnet8')
    return str(write_folder(model, tmp_path_factory.mktemp('pretrained'), [f'c{i}' for i in range(10)]))


def _predict(model, arrays):
    cfg = model.pretrained_cfg
    x = torch.from_numpy(arrays.images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(cfg['mean']).view(1, -1, 1, 1)) / torch.tensor(cfg['std']).view(1, -1, 1, 1)
    with torch.no_grad():
        return model.eval()(x)


def test_finetune_cli_learns_and_folder_loads_back(folder, pretrained_folder, tmp_path):
    out = tmp_path / 'run'
    args = ['finetune', '--model', f'local-dir:{pretrained_folder}', '--pretrained', '--data', folder,
            '--output', str(out), '--epochs', '12', '--batch-size', '12', '--lr', '0.05', '--val-fraction', '0.25',
            '--no-progress', '--no-channels-last', '--seed', '0']
    with pytest.warns(UserWarning, match=r'skipping the head weights fc\.weight \[10, 64\], fc\.bias \[10\]'):
        assert main(args) == 0
    for f in ('checkpoint.pt', 'log.csv', 'metrics.json', 'model.safetensors', 'hub/model.safetensors',
              'hub/config.json'):
        assert (out / f).is_file(), f
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['train_images'] == 3 * 12 and metrics['val_images'] == 3 * 4
    assert metrics['command'].startswith('aff-zoo finetune ')
    config = json.loads((out / 'hub' / 'config.json').read_text())
    assert config['architecture'] == 'aff_resnet8' and config['num_classes'] == 3
    assert config['label_names'] == list(CLASSES)

    # The folder loads back through timm and predicts as the fine-tuned weights do.
    loaded = timm.create_model(f'local-dir:{out / "hub"}', pretrained=True)
    direct = timm.create_model('aff_resnet8', num_classes=3)
    load_safetensors(direct, out / 'model.safetensors')
    train_ds, _ = load_finetune_data(folder, val_fraction=0.25, progress=False)
    logits = _predict(loaded, train_ds)
    torch.testing.assert_close(logits, _predict(direct, train_ds))
    acc = (logits.argmax(1).numpy() == train_ds.labels).mean()
    assert acc >= 0.6, acc  # chance is 1/3


def test_frozen_backbone_grey_resized(folder, tmp_path):
    """in_chans=1, a new resolution and a frozen backbone: only the head moves; the folder records it all."""
    train_ds, val_ds = load_finetune_data(folder, val_fraction=0.25, img_size=40, in_chans=1, progress=False)
    assert train_ds.images.shape[1:] == (40, 40, 1)
    torch.manual_seed(0)
    model = prepare_model('iaff_resnet8', 3, pretrained=False, in_chans=1, img_size=40, freeze_backbone=True)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ['fc.weight', 'fc.bias']
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from aff_zoo.training.finetune import finetune
    from aff_zoo.training.train import TrainConfig
    cfg = TrainConfig(epochs=1, batch_size=12, lr=0.05, progress=False, channels_last=False, warmup_epochs=0)
    metrics = finetune(model, train_ds, val_ds, cfg, str(tmp_path / 'run'))
    after = model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ['fc.bias', 'fc.weight']  # BatchNorm statistics frozen too
    loaded = timm.create_model(f'local-dir:{metrics["hub_folder"]}', pretrained=True)
    assert loaded.pretrained_cfg['input_size'] == (1, 40, 40) and len(loaded.pretrained_cfg['mean']) == 1
    torch.testing.assert_close(_predict(loaded, train_ds), _predict(model, train_ds))


@pytest.mark.parametrize('opt', ['sgd', 'adamw'])
def test_backbone_lr_scale_is_a_param_group_lr(opt):
    """--backbone-lr-scale 0.1: the backbone steps exactly as with lr x 0.1, the head as with lr (SGD and AdamW)."""
    from aff_zoo.training.train import TrainConfig, create_optimizer, create_scheduler
    torch.manual_seed(0)
    model = prepare_model('aff_resnet8', 3, pretrained=False)
    x = torch.randn(4, 3, 32, 32)

    def one_step(lr, scale):
        m = prepare_model('aff_resnet8', 3, pretrained=False)
        m.load_state_dict(model.state_dict())
        cfg = TrainConfig(opt=opt, lr=lr, backbone_lr_scale=scale, weight_decay=1e-2, warmup_epochs=0, epochs=100)
        optim = create_optimizer(m, cfg)
        create_scheduler(optim, cfg, 1).step_update(1)
        m(x).square().sum().backward()
        optim.step()
        return m

    scaled, full, small = one_step(0.05, 0.1), one_step(0.05, 1.0), one_step(0.005, 1.0)
    torch.testing.assert_close(scaled.fc.weight, full.fc.weight, rtol=0, atol=1e-7)
    torch.testing.assert_close(scaled.stem.conv.weight, small.stem.conv.weight, rtol=0, atol=1e-7)
    assert not torch.allclose(scaled.stem.conv.weight, full.stem.conv.weight)


def test_clear_data_errors(folder, tmp_path):
    empty = tmp_path / 'empty'
    (empty / 'cats').mkdir(parents=True)
    (empty / 'dogs').mkdir()
    with pytest.raises(ValueError, match='No images'):
        load_finetune_data(str(empty), progress=False)
    with pytest.raises(ValueError, match=r"class folder\(s\) dogs hold no images"):
        check_balance({'cats': 5, 'dogs': 0}, 10, 'data/')
    with pytest.raises(ValueError, match=r"unbalanced: 'b' has 2 images, 'a' has 30 .*--max-imbalance 15"):
        check_balance({'a': 30, 'b': 2}, 10, 'data/')
    # a real folder with an extra empty class directory
    os.makedirs(os.path.join(folder, 'ship'), exist_ok=True)
    try:
        with pytest.raises(ValueError, match='ship hold no images'):
            load_finetune_data(folder, progress=False)
    finally:
        os.rmdir(os.path.join(folder, 'ship'))


def test_class_count_mismatch_is_explained(pretrained_folder):
    model = timm.create_model('aff_resnet8', num_classes=3)
    with pytest.raises(ValueError, match=r'10-class head \(fc\.weight \[10, 64\]\) but the model was built with 3'):
        load_safetensors(model, os.path.join(pretrained_folder, 'model.safetensors'))
    with pytest.raises(ValueError, match='only .safetensors'):
        load_safetensors(model, 'weights.pth')
