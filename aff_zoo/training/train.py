"""The training loop: any registered model, resumable to the step of the last finished epoch.

``train(model, train_ds, val_ds, cfg, out_dir)`` is the reusable entry (fine-tuning calls it too);
``aff-zoo train`` is its command line. One run directory holds everything a run produces:

* ``checkpoint.pt``   full state after the last finished epoch (model, optimizer, scheduler, scaler, EMA,
                      RNG, epoch), written atomically; ``--resume`` continues from it exactly.
* ``log.csv`` / ``log.json``  one row per epoch (loss, accuracy, lr, seconds, images/s).
* ``curves.png``      loss and accuracy curves.
* ``model.safetensors``  the best weights (by validation top-1), weights only.
* ``metrics.json``    best val top-1/top-5, epochs, the exact command, git commit, dataset sha256.

Distributed: run under ``torchrun``; each rank trains on its shard (``DistributedSampler``), rank 0 alone
writes files.
"""
import argparse
import copy
import csv
import json
import math
import os
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..utils import atomic_write, atomic_write_text, git_commit
from ..data import BatchLoader, ImageArrays, gpu_augment, normalize
from .evaluate import _dist_info, evaluate_loader

__all__ = ['TrainConfig', 'train', 'CosineWarmup', 'register_cli']


@dataclass
class TrainConfig:
    """Everything that decides a run's result (saved into every checkpoint and metrics.json)."""
    epochs: int = 10
    batch_size: int = 128             # per process
    opt: str = 'sgd'                  # 'sgd' or 'adamw'
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    no_wd_bn_bias: bool = True        # no weight decay on norm weights and biases (1-d tensors)
    warmup_epochs: float = 1.0
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0          # 0 = off
    ema_decay: float = 0.0            # 0 = off; best weights are then the EMA's
    channels_last: bool = True
    amp: bool = True                  # used on CUDA only
    seed: int = 0
    crop_pad: int = 4
    hflip: bool = True
    eval_batch_size: int = 500
    log_interval: int = 50
    progress: bool = True
    command: str = ''                 # the exact command line, for metrics.json


class CosineWarmup:
    """Per-step LR: linear warmup from 0, then cosine to ``min_lr``. State = step count only."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float = 0.):
        self.optimizer = optimizer
        self.total_steps = max(total_steps, 1)
        self.warmup_steps = warmup_steps
        self.min_lr = min_lr
        self.base_lrs = [g.get('initial_lr', g['lr']) for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, self.base_lrs):
            g['initial_lr'] = lr
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int, base: float) -> float:
        if step < self.warmup_steps:
            return base * (step + 1) / self.warmup_steps
        t = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        return self.min_lr + 0.5 * (base - self.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))

    def _apply(self):
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g['lr'] = self.lr_at(self.step_count, base)

    def step(self):
        self.step_count += 1
        self._apply()

    def state_dict(self) -> Dict[str, Any]:
        return dict(step_count=self.step_count, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                    base_lrs=list(self.base_lrs), min_lr=self.min_lr)

    def load_state_dict(self, state: Dict[str, Any]):
        self.step_count = state['step_count']
        self._apply()


class ModelEma(nn.Module):
    """Exponential moving average of weights (and copy of buffers); evaluated in place of the model."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module):
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(m.detach(), 1. - self.decay)
            else:
                e.copy_(m)


def param_groups(model: nn.Module, weight_decay: float, no_wd_bn_bias: bool) -> List[Dict[str, Any]]:
    if not no_wd_bn_bias:
        return [dict(params=[p for p in model.parameters() if p.requires_grad], weight_decay=weight_decay)]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.)]


def create_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.no_wd_bn_bias)
    if cfg.opt == 'sgd':
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.opt == 'adamw':
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"Unknown optimizer {cfg.opt!r}; choose 'sgd' or 'adamw'.")


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    state = dict(torch=torch.get_rng_state(), python=random.getstate())
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]):
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def atomic_torch_save(obj: Any, path: str):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_weights(model: nn.Module, path: str, metadata: Optional[Dict[str, str]] = None):
    """Weights only, safetensors, atomically (contiguous copies, so channels_last is fine)."""
    from safetensors.torch import save_file
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def _mean_std(model: nn.Module):
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if 'mean' not in cfg or 'std' not in cfg:
        raise ValueError('The model has no pretrained_cfg mean/std; create it with timm.create_model.')
    return cfg['mean'], cfg['std']


def _plot_curves(rows: List[Dict[str, Any]], path: str):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    ep = [r['epoch'] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r['train_loss'] for r in rows], label='train')
    a.plot(ep, [r['val_loss'] for r in rows], label='val')
    a.set_xlabel('epoch'), a.set_ylabel('loss'), a.legend()
    b.plot(ep, [r['train_acc'] for r in rows], label='train top-1')
    b.plot(ep, [r['val_top1'] for r in rows], label='val top-1')
    b.set_xlabel('epoch'), b.set_ylabel('accuracy (%)'), b.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format='png'))
    plt.close(fig)


def _write_logs(rows: List[Dict[str, Any]], out_dir: str):
    atomic_write_text(os.path.join(out_dir, 'log.json'), json.dumps(rows, indent=1))

    def write_csv(tmp):
        with open(tmp, 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    atomic_write(os.path.join(out_dir, 'log.csv'), write_csv)
    _plot_curves(rows, os.path.join(out_dir, 'curves.png'))


def _mixup(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float, smoothing: float,
           generator: torch.Generator):
    """Mixed images and soft targets (label smoothing folded in); draws come from ``generator``."""
    target = F.one_hot(y, num_classes).float() * (1. - smoothing) + smoothing / num_classes
    if alpha <= 0:
        return x, target
    import numpy as np
    lam = float(np.random.default_rng(int(torch.randint(2 ** 31, (1,), generator=generator))).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    return x * lam + x[perm] * (1 - lam), target * lam + target[perm] * (1 - lam)


def train(
        model: nn.Module,
        train_ds: ImageArrays,
        val_ds: ImageArrays,
        cfg: TrainConfig,
        out_dir: str,
        resume: bool = False,
        device: Optional[torch.device] = None,
        extra_metrics: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Train ``model`` on ``train_ds``, select on ``val_ds``; returns the metrics written to metrics.json.

    Under torchrun (process group initialised by the caller or by ``init_distributed``) the model is wrapped
    in DistributedDataParallel and only rank 0 writes ``out_dir``.
    """
    world, rank = _dist_info()
    commit = git_commit()  # the code this run started with
    if device is None:
        device = torch.device(f'cuda:{int(os.environ.get("LOCAL_RANK", 0))}' if torch.cuda.is_available() else 'cpu')
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    num_classes = len(train_ds.classes)
    if getattr(model, 'num_classes', num_classes) != num_classes:
        raise ValueError(f'The model has {model.num_classes} outputs but the data has {num_classes} classes; '
                         f'create it with num_classes={num_classes}.')
    mean, std = _mean_std(model)
    seed_everything(cfg.seed)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = ModelEma(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    optimizer = create_optimizer(model, cfg)
    train_loader = BatchLoader(train_ds, cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True,
                               num_replicas=world, rank=rank)
    val_loader = BatchLoader(val_ds, cfg.eval_batch_size, shuffle=False, num_replicas=world, rank=rank)
    if len(train_loader) == 0:
        raise ValueError(f'{len(train_ds)} training images give no full batch of {cfg.batch_size} per process; '
                         'lower the batch size.')
    steps_per_epoch = len(train_loader)
    scheduler = CosineWarmup(optimizer, cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch),
                             cfg.min_lr)
    use_amp = cfg.amp and device.type == 'cuda'
    scaler = torch.amp.GradScaler('cuda', enabled=use_amp)
    ddp_model = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)

    ckpt_path = os.path.join(out_dir, 'checkpoint.pt')
    start_epoch, rows, best = 0, [], dict(val_top1=-1.0)
    if resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location='cpu', weights_only=True)
        if state['config']['epochs'] != cfg.epochs or state['config']['seed'] != cfg.seed:
            raise ValueError(f'{ckpt_path} was written by a run with epochs={state["config"]["epochs"]}, '
                             f'seed={state["config"]["seed"]}; resume with the same settings or a new --output.')
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        scaler.load_state_dict(state['scaler'])
        if ema is not None:
            ema.load_state_dict(state['ema'])
        set_rng_state(state['rng'])
        start_epoch, rows, best = state['epoch'], state['log'], state['best']
    elif resume and rank == 0:
        print(f'No checkpoint at {ckpt_path}; starting from scratch.', file=sys.stderr)

    from tqdm import tqdm
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.set_epoch(epoch)
        # All randomness of an epoch comes from (seed, epoch, rank): resumed epochs replay exactly.
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + rank)
        ddp_model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        bar = tqdm(train_loader, desc=f'epoch {epoch + 1}/{cfg.epochs}', disable=not (cfg.progress and rank == 0),
                   leave=False, mininterval=2.0)
        for step, (images, labels) in enumerate(bar):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            images = gpu_augment(images, gen, pad=cfg.crop_pad, flip=cfg.hflip)
            x = normalize(images, mean, std, cfg.channels_last)
            x, target = _mixup(x, labels, num_classes, cfg.mixup_alpha, cfg.label_smoothing, gen)
            with torch.autocast(device.type, enabled=use_amp):
                logits = ddp_model(x)
            loss = torch.sum(-target * F.log_softmax(logits.float(), dim=1), dim=1).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f'Loss is {loss.item()} at epoch {epoch + 1} step {step}; '
                                         'lower the learning rate.')
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            loss_sum += loss.detach().double() * labels.shape[0]
            correct += (logits.argmax(1) == labels).sum()
            seen += labels.shape[0]
            if rank == 0 and step % cfg.log_interval == 0:
                bar.set_postfix(loss=f'{loss.item():.3f}', lr=f'{optimizer.param_groups[0]["lr"]:.4f}')
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - t0
        totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), dtype=torch.float64, device=device)])
        if world > 1:
            dist.all_reduce(totals)
        eval_model = ema.module if ema is not None else model
        ev = evaluate_loader(eval_model, val_loader, device, mean, std, cfg.channels_last, num_classes, use_amp)
        count = max(int(ev['count']), 1)
        row = dict(
            epoch=epoch + 1,
            train_loss=round(float(totals[0] / totals[2]), 5),
            train_acc=round(100. * float(totals[1] / totals[2]), 3),
            val_loss=round(float(ev['loss_sum']) / count, 5),
            val_top1=round(100. * int(ev['top1']) / count, 3),
            val_top5=round(100. * int(ev['top5']) / count, 3),
            lr=optimizer.param_groups[0]['lr'],
            train_seconds=round(train_seconds, 2),
            epoch_seconds=round(time.perf_counter() - t0, 2),
            train_images_per_s=round(float(totals[2]) / train_seconds, 1),
        )
        rows.append(row)
        is_best = row['val_top1'] > best['val_top1']
        if is_best:
            best = dict(val_top1=row['val_top1'], val_top5=row['val_top5'], val_loss=row['val_loss'],
                        epoch=epoch + 1)
        if rank == 0:
            if is_best:
                save_weights(eval_model, os.path.join(out_dir, 'model.safetensors'))
            state = dict(
                model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict(), ema=ema.state_dict() if ema is not None else None, rng=rng_state(),
                epoch=epoch + 1, log=rows, best=best, config=asdict(cfg))
            atomic_torch_save(state, ckpt_path)
            _write_logs(rows, out_dir)
            print(f'epoch {epoch + 1}/{cfg.epochs} ' + ' '.join(f'{k}={v}' for k, v in row.items() if k != 'epoch'),
                  flush=True)
        if world > 1:
            dist.barrier()

    metrics = dict(
        model=getattr(model, 'default_cfg', {}).get('architecture') or type(model).__name__,
        val_top1=best['val_top1'], val_top5=best.get('val_top5'), best_epoch=best.get('epoch'),
        epochs=cfg.epochs, val_split=f'last {len(val_ds) // max(num_classes, 1)} images per class (sorted by name)',
        train_images=len(train_ds), val_images=len(val_ds), classes=list(train_ds.classes),
        params=sum(p.numel() for p in model.parameters()),
        train_images_per_s=round(sum(r['train_images_per_s'] for r in rows) / max(len(rows), 1), 1),
        total_train_seconds=round(sum(r['epoch_seconds'] for r in rows), 1),
        dataset_sha256=train_ds.sha256, dataset=os.path.basename(train_ds.source),
        command=cfg.command, git_commit=commit, world_size=world,
        device=str(device), torch=str(torch.__version__), config=asdict(cfg), **(extra_metrics or {}),
    )
    if rank == 0:
        atomic_write_text(os.path.join(out_dir, 'metrics.json'), json.dumps(metrics, indent=1))
    return metrics


def init_distributed() -> bool:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, nccl on CUDA)."""
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    backend = 'nccl' if torch.cuda.is_available() else 'gloo'
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
    dist.init_process_group(backend)
    return True


# ----------------------------------------------------------------------------------------- command line

def add_config_args(p: argparse.ArgumentParser):
    """One flag per TrainConfig field (``--no-X`` for booleans)."""
    helps = dict(
        epochs='number of epochs', batch_size='batch size per process', opt="'sgd' or 'adamw'",
        lr='peak learning rate (after warmup)', weight_decay='weight decay',
        no_wd_bn_bias='no weight decay on 1-d params (norms, biases)', warmup_epochs='linear warmup epochs',
        label_smoothing='label smoothing', mixup_alpha='mixup Beta(alpha, alpha); 0 = off',
        ema_decay='EMA decay of weights; 0 = off', channels_last='channels_last memory format',
        amp='mixed precision on CUDA', seed='seed (data order, augmentation, init)')
    for f in fields(TrainConfig):
        if f.name == 'command':
            continue
        flag = '--' + f.name.replace('_', '-')
        if f.type in (bool, 'bool'):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helps.get(f.name))
        else:
            typ = {'int': int, 'float': float, 'str': str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            p.add_argument(flag, type=typ, default=f.default, help=helps.get(f.name))


def config_from_args(args) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != 'command'},
                       command=recipe_command(args))


def recipe_command(args) -> str:
    """The run as one explicit command line: every option with its value (defaults included)."""
    parts = ['aff-zoo', 'train']
    for k, v in sorted(vars(args).items()):
        if k in ('func', 'command', 'resume', 'progress', 'log_interval') or v is None:
            continue
        flag = '--' + k.replace('_', '-')
        if isinstance(v, bool):
            parts.append(flag if v else '--no-' + k.replace('_', '-'))
        else:
            parts += [flag, str(v)]
    return ' '.join(shlex.quote(p) for p in parts)


def _cmd_train(args) -> int:
    import timm
    import aff_zoo  # noqa: F401  (registers the models)
    from ..data import DataError, load_images, split_train_val
    distributed = init_distributed()
    try:
        _, rank = _dist_info()
        try:
            data = load_images(args.data, split='train', num_classes=args.num_classes, progress=rank == 0)
            train_ds, val_ds = split_train_val(data, args.val_per_class)
        except DataError as e:
            print(f'error: {e}', file=sys.stderr)
            return 2
        if args.train_subset:
            train_ds = train_ds.subset(torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(0))
                                       [:args.train_subset].sort().values.numpy())
        cfg = config_from_args(args)
        seed_everything(cfg.seed)
        if getattr(args, 'init_from', None):  # a trained plain peer's weights, fusions starting as addition
            from ..models.upcycle import UpcycleError, upcycle
            try:
                model = upcycle(args.model, args.init_from, num_classes=len(data.classes),
                                drop_path_rate=args.drop_path)
            except UpcycleError as e:
                print(f'error: --init-from: {e}', file=sys.stderr)
                return 2
        else:
            model = timm.create_model(args.model, num_classes=len(data.classes), drop_path_rate=args.drop_path)
        metrics = train(model, train_ds, val_ds, cfg, args.output, resume=args.resume)
        if rank == 0:
            print(json.dumps({k: metrics[k] for k in ('model', 'val_top1', 'val_top5', 'best_epoch', 'epochs')}))
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


def register_cli(subparsers):
    p = subparsers.add_parser('train', help='train a registered model on an image-folder dataset or archive',
                              description=__doc__.splitlines()[0])
    p.add_argument('--model', required=True, help='registered model name, e.g. aff_resnet20')
    p.add_argument('--data', required=True,
                   help='ImageFolder dir, ImageFolder .tar(.gz), or cifar-10-python.tar.gz')
    p.add_argument('--output', required=True, help='run directory (checkpoint, logs, best weights)')
    p.add_argument('--resume', action='store_true', help='continue from <output>/checkpoint.pt')
    p.add_argument('--num-classes', type=int, default=None, help='expected class count (checked against the data)')
    p.add_argument('--val-per-class', type=int, default=500, help='last N images (by name) of each class = val')
    p.add_argument('--train-subset', type=int, default=0, help='train on a fixed random subset of N images (0=all)')
    p.add_argument('--drop-path', type=float, default=0.0, help='stochastic depth rate')
    p.add_argument('--init-from', default=None,
                   help='start from a trained plain peer, upcycled (aff_zoo.upcycle): a timm name such as '
                        'resnet50d.a1_in1k, a zoo tag such as add_resnet20.cifar10_e12, or local-dir:<folder>')
    add_config_args(p)
    p.set_defaults(func=lambda a: _cmd_train(a))
    return p
