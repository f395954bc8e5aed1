"""Evaluate a classifier on a dataset split: top-1/top-5, per-class accuracy, confusion matrix, throughput.

Weights come from a training checkpoint (``checkpoint.pt``, loaded with ``weights_only=True``), a
``model.safetensors`` file, or the model's published weights (``--pretrained``).
"""
import json
import os
import sys
import time
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..data import BatchLoader, DataError, ImageArrays, load_images, normalize, split_train_val
from ..utils import atomic_write_text

__all__ = ['evaluate', 'load_model', 'register_cli']


def _dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@torch.no_grad()
def evaluate_loader(model: nn.Module, loader: BatchLoader, device: torch.device, mean, std,
                    channels_last: bool, num_classes: int, amp: bool = False,
                    tta_flip: bool = False) -> Dict[str, torch.Tensor]:
    """Sums over this rank's shard: loss, top-1/top-5 hits, count, per-class confusion (all-reduced in DDP).
    ``tta_flip`` adds ``top1_flip``/``top5_flip``: hits of the mean softmax over the image and its mirror image
    (a separate figure; the headline numbers stay single-view)."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top1 = torch.zeros((), dtype=torch.long, device=device)
    top5 = torch.zeros((), dtype=torch.long, device=device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    top1_flip = torch.zeros((), dtype=torch.long, device=device)
    top5_flip = torch.zeros((), dtype=torch.long, device=device)
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        x = normalize(images, mean, std, channels_last)
        with torch.autocast(device.type, enabled=amp and device.type == 'cuda'):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction='sum').double()
        k = min(5, logits.shape[1])
        pred = logits.topk(k, dim=1).indices
        top1 += (pred[:, 0] == labels).sum()
        top5 += (pred == labels[:, None]).any(dim=1).sum()
        confusion += torch.bincount(labels * num_classes + pred[:, 0], minlength=num_classes ** 2).view(
            num_classes, num_classes)
        if tta_flip:
            with torch.autocast(device.type, enabled=amp and device.type == 'cuda'):
                flipped = model(x.flip(3))
            probs = logits.softmax(1) + flipped.float().softmax(1)
            pred = probs.topk(k, dim=1).indices
            top1_flip += (pred[:, 0] == labels).sum()
            top5_flip += (pred == labels[:, None]).any(dim=1).sum()
    out = dict(loss_sum=loss_sum, top1=top1, top5=top5, confusion=confusion)
    if tta_flip:
        out.update(top1_flip=top1_flip, top5_flip=top5_flip)
    world, _ = _dist_info()
    if world > 1:
        for v in out.values():
            dist.all_reduce(v)
    out['count'] = out['confusion'].sum()
    return out


def evaluate(model: nn.Module, ds: ImageArrays, batch_size: int = 500, device: Optional[torch.device] = None,
             channels_last: bool = True, amp: bool = False, tta_flip: bool = False) -> Dict[str, Any]:
    """Accuracy figures and images/s of ``model`` on ``ds`` (normalised with the model's pretrained_cfg);
    ``tta_flip`` adds horizontal-flip test-time augmentation as separate ``top1_flip``/``top5_flip``."""
    device = device or torch.device('cpu')
    cfg = model.pretrained_cfg
    num_classes = len(ds.classes)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = BatchLoader(ds, batch_size, shuffle=False)
    t0 = time.perf_counter()
    ev = evaluate_loader(model, loader, device, cfg['mean'], cfg['std'], channels_last, num_classes, amp, tta_flip)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    conf = ev['confusion'].cpu()
    count = int(conf.sum())
    per_class = (conf.diag().double() / conf.sum(1).clamp(min=1).double() * 100).tolist()
    flip = {f'{k}_flip': round(100. * int(ev[f'{k}_flip']) / count, 3) for k in ('top1', 'top5') if tta_flip}
    return dict(
        top1=round(100. * int(ev['top1']) / count, 3), top5=round(100. * int(ev['top5']) / count, 3), **flip,
        loss=round(float(ev['loss_sum']) / count, 5), images=count,
        per_class={c: round(a, 2) for c, a in zip(ds.classes, per_class)},
        confusion=conf.tolist(), classes=list(ds.classes),
        seconds=round(seconds, 3), images_per_s=round(count / seconds, 1), batch_size=batch_size,
        device=str(device), dataset_sha256=ds.sha256,
    )


def read_checkpoint(path: str) -> Dict[str, Any]:
    """A training ``checkpoint.pt`` (``weights_only=True``), or a ``ValueError`` with the path and what to do."""
    import pickle
    import zipfile
    if not os.path.isfile(path):
        raise ValueError(f'no such checkpoint file: {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split('. ')[0]  # torch's cause, not its essay
        raise ValueError(
            f'{path} cannot be read as a training checkpoint ({first}): it is truncated or damaged (an interrupted '
            f'copy?) or not a checkpoint.pt. Copy it again, or evaluate the run folder\'s model.safetensors '
            f'(the best weights) with --checkpoint.') from None


def load_model(name: str, checkpoint: Optional[str] = None, pretrained: bool = False, num_classes: int = 10):
    """A timm model with weights from a checkpoint/safetensors file or its published weights."""
    from ..models.pretrained import check_state_dict, create_model, load_checked_state
    if checkpoint and checkpoint.endswith('.safetensors'):
        return create_model(name, weights=os.path.abspath(checkpoint), num_classes=num_classes)
    model = create_model(name, pretrained=pretrained, num_classes=num_classes)
    if checkpoint:
        state = read_checkpoint(checkpoint)
        if isinstance(state, dict) and 'model' in state:  # a training checkpoint: the EMA weights if it has them
            ema = state.get('ema')
            state = {k[len('module.'):]: v for k, v in ema.items()} if ema else state['model']
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f'{checkpoint} holds no model state dict; pass a checkpoint.pt written by aff-zoo train.')
        check_state_dict(state, checkpoint)
        load_checked_state(model, state, checkpoint)
    return model


def _cmd_evaluate(args) -> int:
    if not args.checkpoint and not args.pretrained:
        print('error: pass --checkpoint FILE (checkpoint.pt or model.safetensors) or --pretrained', file=sys.stderr)
        return 2
    try:
        data = load_images(args.data, split=args.split, num_classes=args.num_classes)
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    ds = data
    if args.split == 'train' and args.val_per_class:
        train_ds, val_ds = split_train_val(data, args.val_per_class)
        ds = val_ds if args.subset == 'val' else train_ds
    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    model = load_model(args.model, args.checkpoint, args.pretrained, num_classes=len(data.classes))
    res = evaluate(model, ds, args.batch_size, device, amp=args.amp, tta_flip=args.tta_flip)
    res.update(model=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
               split=f'{args.split}' + (f' ({args.subset}: last {args.val_per_class}/class)'
                                        if args.split == 'train' and args.val_per_class else ''))
    summary = {k: res[k] for k in ('model', 'split', 'top1', 'top5', 'top1_flip', 'top5_flip', 'images',
                                   'images_per_s', 'device') if k in res}
    print(json.dumps(summary))
    if not args.quiet:
        print('per-class top-1: ' + ', '.join(f'{c} {a:.1f}' for c, a in res['per_class'].items()))
    if args.output:
        atomic_write_text(args.output, json.dumps(res, indent=1))
    return 0


def register_cli(subparsers):
    p = subparsers.add_parser('evaluate', help='accuracy, per-class accuracy, confusion matrix and throughput',
                              description=__doc__.splitlines()[0])
    p.add_argument('--model', required=True, help='registered model name, e.g. aff_resnet20')
    p.add_argument('--data', required=True, help='ImageFolder dir or archive (as for train)')
    p.add_argument('--checkpoint', help='checkpoint.pt (full training state) or model.safetensors')
    p.add_argument('--pretrained', action='store_true', help="use the model's published weights")
    p.add_argument('--split', default='train', help="split folder in the data (default 'train')")
    p.add_argument('--subset', default='val', choices=('val', 'train'),
                   help='with --split train: the held-out val part (default) or the rest')
    p.add_argument('--val-per-class', type=int, default=500, help='as in train; 0 = use the whole split')
    p.add_argument('--num-classes', type=int, default=None, help='expected class count')
    p.add_argument('--batch-size', type=int, default=500)
    p.add_argument('--device', default=None)
    p.add_argument('--threads', type=int, default=0, help='CPU threads (0 = torch default)')
    p.add_argument('--amp', action='store_true', help='mixed precision (CUDA)')
    p.add_argument('--tta-flip', action='store_true',
                   help='also report top1_flip/top5_flip: softmax averaged over the image and its mirror image')
    p.add_argument('--output', help='write the full result (with confusion matrix) as JSON here')
    p.add_argument('--quiet', action='store_true')
    p.set_defaults(func=_cmd_evaluate)
    return p
