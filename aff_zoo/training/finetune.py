"""Fine-tuning on your own images: an ImageFolder in, a checkpoint folder in the zoo's Hub layout out.

    aff-zoo finetune --model aff_resnet20.cifar10_e12 --pretrained --data my_photos/ --img-size 64 \\
        --freeze-backbone --epochs 5 --lr 0.05 --output runs/my_model

It is the training loop of ``aff_zoo.train`` (same run folder: ``checkpoint.pt`` for ``--resume``,
``log.csv``, ``curves.png``, ``metrics.json``, progress bars) around a model prepared for new data:

* the head is replaced for the new class count (``reset_classifier``), with a warning naming the
  pretrained head weights that are skipped;
* ``--in-chans`` adapts the stem to other channel counts (timm sums/repeats the pretrained kernel);
* ``--freeze-backbone`` trains the head only (backbone weights and BatchNorm statistics frozen), or
  ``--backbone-lr-scale f`` trains the backbone at f times the learning rate (a param group with timm's
  ``lr_scale``, so it holds for SGD and AdamW alike);
* ``--img-size`` resizes the images (and the saved config) to a new resolution.

The best weights end up in ``<output>/hub`` as ``model.safetensors`` + ``config.json`` (timm's format,
class names included), loadable with ``timm.create_model('local-dir:<output>/hub', pretrained=True)``.
"""
import argparse
import json
import os
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..models.pretrained import load_safetensors

__all__ = ['prepare_model', 'load_finetune_data', 'finetune', 'check_balance', 'register_cli']

HUB_SUBDIR = 'hub'


# ---------------------------------------------------------------------------------------------------------
# Weights


def _classifier_names(model: nn.Module) -> List[str]:
    head = model.get_classifier()
    prefix = next(n for n, m in model.named_modules() if m is head)
    return [f'{prefix}.{k}' for k in head.state_dict()]


def prepare_model(
        name: str,
        num_classes: int,
        pretrained: bool = True,
        in_chans: int = 3,
        img_size: Optional[int] = None,
        freeze_backbone: bool = False,
        drop_rate: float = 0.0,
) -> nn.Module:
    """The model to fine-tune: pretrained (or fresh) weights, a new ``num_classes`` head, adapted stem.
    A smaller backbone learning rate is ``TrainConfig.backbone_lr_scale`` (an optimizer param group)."""
    import timm
    import aff_zoo  # noqa: F401  registers the models
    model = timm.create_model(name, pretrained=pretrained, in_chans=in_chans, drop_rate=drop_rate)
    if model.num_classes != num_classes:
        if pretrained:
            shapes = {k: list(v.shape) for k, v in model.get_classifier().state_dict().items()}
            skipped = ', '.join(f'{k} {shapes[k.rsplit(".", 1)[1]]}' for k in _classifier_names(model))
            warnings.warn(
                f'{name}: the pretrained head has {model.num_classes} classes, the data {num_classes}; '
                f'skipping the head weights {skipped} and training a new {num_classes}-class head.',
                stacklevel=2)
        model.reset_classifier(num_classes)
    cfg = dict(model.pretrained_cfg)
    if in_chans != len(cfg.get('mean', ())):
        # one value per channel: the pretrained RGB statistics averaged (timm adapts the stem the same way)
        cfg['mean'] = (float(np.mean(cfg['mean'])),) * in_chans
        cfg['std'] = (float(np.mean(cfg['std'])),) * in_chans
    cfg['input_size'] = (in_chans, *((img_size, img_size) if img_size else cfg['input_size'][1:]))
    cfg['num_classes'] = num_classes
    model.pretrained_cfg = model.default_cfg = cfg

    if freeze_backbone:
        from timm.layers import freeze_batch_norm_2d
        head = model.get_classifier()
        head_params = {id(p) for p in head.parameters()}
        for p in model.parameters():
            if id(p) not in head_params:
                p.requires_grad_(False)
        for n, child in list(model.named_children()):
            if child is not head:
                setattr(model, n, freeze_batch_norm_2d(child))
    return model


# ---------------------------------------------------------------------------------------------------------
# Data


def check_balance(counts: Dict[str, int], max_ratio: float, source: str) -> None:
    """Refuse empty classes and class sizes further apart than ``max_ratio`` (a clear message each)."""
    empty = sorted(c for c, n in counts.items() if n == 0)
    if empty:
        raise ValueError(
            f'{source}: class folder(s) {", ".join(empty)} hold no images. Add images to them, or delete the '
            'folders if those classes are not wanted.')
    small, large = min(counts, key=counts.get), max(counts, key=counts.get)
    if counts[large] > max_ratio * counts[small]:
        raise ValueError(
            f'{source} is unbalanced: {small!r} has {counts[small]} images, {large!r} has {counts[large]} '
            f'(ratio {counts[large] / counts[small]:.1f} > --max-imbalance {max_ratio:g}). A classifier trained '
            f'on it mostly predicts the big classes. Add images to the small classes, subsample the big ones, '
            f'or pass --max-imbalance {int(np.ceil(counts[large] / counts[small]))} to train on it anyway.')


def _class_folders(path: str, split: Optional[str]) -> Optional[List[str]]:
    """Class folder names of an ImageFolder directory (the ``split`` subfolder if there is one)."""
    root = os.path.join(path, split) if split and os.path.isdir(os.path.join(path, split)) else path
    if not os.path.isdir(root):
        return None
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith('.'))


def _resize(arrays, size: int):
    """Resize every image of ``arrays`` (N x H x W x 3 uint8) to size x size (bilinear, antialiased)."""
    import torch.nn.functional as F
    if arrays.images.shape[1:3] == (size, size):
        return arrays
    out = []
    for i in range(0, len(arrays.images), 256):
        x = torch.from_numpy(np.ascontiguousarray(arrays.images[i:i + 256])).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(size, size), mode='bilinear', antialias=True, align_corners=False)
        out.append(x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    arrays.images = np.concatenate(out) if out else arrays.images
    return arrays


def _to_channels(arrays, in_chans: int):
    """RGB images for a model with other input channels: 1 = grey (channel mean), N = RGB repeated."""
    if in_chans == 3:
        return arrays
    if in_chans == 1:
        arrays.images = arrays.images.mean(axis=3, keepdims=True).round().astype(np.uint8)
    else:
        reps = -(-in_chans // 3)
        arrays.images = np.concatenate([arrays.images] * reps, axis=3)[..., :in_chans]
    return arrays


def load_finetune_data(
        path: str,
        val_split: str = 'val',
        val_fraction: float = 0.2,
        img_size: Optional[int] = None,
        in_chans: int = 3,
        max_imbalance: float = 10.0,
        progress: bool = True,
):
    """(train, val) ImageArrays: ``<path>/train`` + ``<path>/<val_split>`` folders if present, else a fixed
    per-class split of ``<path>`` (the last ``val_fraction`` of each class's images, sorted by name)."""
    from ..data import split_train_val  # DataError is a ValueError with a clear message
    from ..data.streaming import StreamSplit, open_data
    train, _ = open_data(path, 'train', progress=progress)  # mixed sizes or large: streamed, resized by the transform
    streaming = isinstance(train, StreamSplit)
    if streaming and in_chans != 3:
        raise ValueError(f'{path}: --in-chans {in_chans} needs fixed-size images (the streaming path reads RGB); '
                         'resize the images to one size first.')
    counts = Counter({c: 0 for c in _class_folders(path, 'train') or ()})  # empty class folders count as 0
    counts.update(train.classes[i] for i in train.labels)
    check_balance(dict(counts), max_imbalance, path)
    if os.path.isdir(os.path.join(path, 'train')) and os.path.isdir(os.path.join(path, val_split)):
        val = open_data(path, val_split, 'stream' if streaming else 'memory', progress=progress)[0]
        if val.classes != train.classes:
            raise ValueError(f'{path}: {val_split}/ has classes {val.classes}, train/ has {train.classes}; '
                             'both need the same class folders.')
    else:
        per_class = int(round(val_fraction * min(counts.values())))
        if val_fraction > 0 and per_class < 1:
            raise ValueError(f'{path}: the smallest class has {min(counts.values())} images, too few for a '
                             f'{val_fraction:g} validation split. Add images, or pass --val-fraction 0 to '
                             'validate on the training images.')
        train, val = split_train_val(train, per_class) if per_class else (train, train)
    if streaming:
        train.img_size = val.img_size = img_size
        return train.as_split(True), val.as_split(False)
    if img_size:
        train, val = _resize(train, img_size), (_resize(val, img_size) if val is not train else train)
    if in_chans != 3:
        train, val = _to_channels(train, in_chans), (_to_channels(val, in_chans) if val is not train else train)
    return train, val


# ---------------------------------------------------------------------------------------------------------
# Checkpoint folder


def write_folder(model: nn.Module, folder, classes: Sequence[str], metrics: Optional[dict] = None) -> Path:
    """``model.safetensors`` + ``config.json`` (timm's format, with ``label_names``), each written atomically."""
    # timm's public save_for_hf writes weights and config together, non-atomically; its config-only writer is
    # private, so we use it here for an atomic config.json beside our one (atomic) safetensors writer.
    from timm.models._hub import save_config_for_hf
    from ..utils import atomic_write, save_safetensors
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(model, folder / 'model.safetensors')
    atomic_write(str(folder / 'config.json'), lambda tmp: save_config_for_hf(
        model, tmp, model_config=dict(
            label_names=list(classes), **({'finetune_metrics': metrics} if metrics else {}),
            pretrained_cfg=dict(num_classes=model.num_classes, input_size=model.pretrained_cfg['input_size'],
                                mean=model.pretrained_cfg['mean'], std=model.pretrained_cfg['std']))))
    return folder


def finetune(model: nn.Module, train_ds, val_ds, cfg, out_dir: str, resume: bool = False, **train_kwargs) -> dict:
    """``aff_zoo.train.train`` on the prepared model, then the best weights as a Hub-layout folder."""
    from .train import train
    if model.num_classes != len(train_ds.classes):
        raise ValueError(f'The model has a {model.num_classes}-class head but the data has '
                         f'{len(train_ds.classes)} classes; prepare it with num_classes={len(train_ds.classes)}.')
    metrics = train(model, train_ds, val_ds, cfg, out_dir, resume=resume, **train_kwargs)
    load_safetensors(model, os.path.join(out_dir, 'model.safetensors'))  # the best epoch's weights
    from timm.layers import unfreeze_batch_norm_2d
    for n, child in list(model.named_children()):  # a frozen backbone is saved as plain BatchNorm again
        setattr(model, n, unfreeze_batch_norm_2d(child))
    model.cpu().eval().to(memory_format=torch.contiguous_format)
    keep = ('val_top1', 'val_top5', 'best_epoch', 'epochs', 'train_images', 'val_images')
    folder = write_folder(model, os.path.join(out_dir, HUB_SUBDIR), train_ds.classes,
                          {k: metrics[k] for k in keep if k in metrics})
    metrics['hub_folder'] = str(folder)
    return metrics


# ---------------------------------------------------------------------------------------------------------
# Console command


def _cmd_finetune(args) -> int:
    from .train import RunError, TrainingDiverged, _overrides, apply_recipe, config_from_args, seed_everything
    try:
        apply_recipe(args)
        train_ds, val_ds = load_finetune_data(
            args.data, args.val_split, args.val_fraction, args.img_size, args.in_chans, args.max_imbalance,
            progress=args.progress)
        cfg = config_from_args(args)
        cfg.command = 'aff-zoo finetune' + cfg.command[len('aff-zoo train'):]
        seed_everything(cfg.seed)
        model = prepare_model(
            args.model, len(train_ds.classes), pretrained=args.pretrained, in_chans=args.in_chans,
            img_size=args.img_size, freeze_backbone=args.freeze_backbone, drop_rate=args.drop)
        run_info = {k: getattr(args, k) for k in ('pretrained', 'img_size', 'in_chans', 'freeze_backbone', 'drop',
                                                  'val_fraction')}
        run_info.update(model_name=args.model, val_folder=args.val_split)
        metrics = finetune(model, train_ds, val_ds, cfg, args.output, resume=args.resume,
                           resume_override=_overrides(args.resume_override), run_info=run_info)
    except (ValueError, RuntimeError, RunError, TrainingDiverged) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(json.dumps({k: metrics[k] for k in ('model', 'val_top1', 'best_epoch', 'epochs', 'hub_folder')}))
    return 0


def register_cli(subparsers):
    from .train import add_config_args, add_resume_args
    p = subparsers.add_parser(
        'finetune', help='fine-tune a model on your ImageFolder; writes a Hub-layout checkpoint folder',
        description=__doc__.splitlines()[0])
    p.add_argument('--model', required=True, help="model name, tag (aff_resnet20.cifar10_e12) or local-dir:<folder>")
    p.add_argument('--data', required=True,
                   help='ImageFolder: <data>/<class>/<img> (automatic split) or <data>/train + <data>/val')
    p.add_argument('--output', required=True, help='run folder; the checkpoint folder is <output>/hub')
    p.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=True,
                   help='start from the pretrained weights (--no-pretrained: from scratch)')
    add_resume_args(p)
    p.add_argument('--val-split', default='val', help='name of the validation folder next to train/')
    p.add_argument('--val-fraction', type=float, default=0.2,
                   help='without a val folder: last fraction of each class (by file name) for validation')
    p.add_argument('--img-size', type=int, default=None, help='resize images (and the model config) to this size')
    p.add_argument('--in-chans', type=int, default=3, help='input channels (1 = grey images)')
    p.add_argument('--freeze-backbone', action=argparse.BooleanOptionalAction, default=False,
                   help='train the new head only (backbone weights and BatchNorm statistics frozen)')
    p.add_argument('--max-imbalance', type=float, default=10.0, help='largest accepted ratio of class sizes')
    p.add_argument('--drop', type=float, default=0.0, help='dropout before the head')
    add_config_args(p)
    p.set_defaults(func=_cmd_finetune, epochs=10, lr=0.01, warmup_epochs=0.0, batch_size=32)
    return p
