"""The training loop: any registered model, resumable to the step of the last finished epoch.

``train(model, train_ds, val_ds, cfg, out_dir)`` is the reusable entry (fine-tuning calls it too);
``aff-zoo train`` is its command line. One run directory holds everything a run produces:

* ``checkpoint.pt``   full state after the last finished epoch (model, optimizer, scheduler, scaler, EMA,
                      RNG, epoch), written atomically; ``--resume`` continues from it exactly.
* ``log.csv`` / ``log.json``  one row per epoch (loss, accuracy, lr, seconds, images/s, machine).
* ``curves.png``      loss and accuracy curves.
* ``model.safetensors``  the best weights (by validation top-1), weights only.
* ``metrics.json``    best val top-1/top-5, epochs, the exact command, git commit, dataset sha256, the run
                      configuration and any ``--resume-override`` (original and new values).

The folder appears when the first epoch ends: a run that diverges or is stopped before leaves nothing. A NaN/inf
loss stops the run at once (CLI: one line, exit code 2) and the last good checkpoint stays as it was. ``--resume``
refuses a checkpoint of another recipe, data or model, naming each differing field, unless
``--resume-override FIELD,...`` allows them; the lr schedule is then the new settings' from the resumed epoch.
``--recipe NAME`` fills in a named preset (``RECIPES``; explicit flags win) and prints the full command.
CUDA: AMP (bfloat16 where supported, else float16 with a GradScaler), channels_last, ``--compile``,
``--accum-steps``; images/s and ETA in the progress bar and log.csv.

Distributed: run under ``torchrun``; each rank trains on its shard (``DistributedSampler``), rank 0 alone
writes files.
"""
import argparse
import contextlib
import csv
import json
import math
import os
import random
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..utils import atomic_write, atomic_write_text, git_commit, machine_line, save_safetensors
from ..data import BatchLoader, ImageArrays, gpu_augment, normalize
from .evaluate import _dist_info, evaluate_loader

__all__ = ['TrainConfig', 'train', 'create_optimizer', 'create_scheduler', 'RunError', 'TrainingDiverged',
           'register_cli']


@dataclass
class TrainConfig:
    """Everything that decides a run's result (saved into every checkpoint and metrics.json)."""
    epochs: int = 10
    batch_size: int = 128             # per process and per micro-batch
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
    mixup_off_epoch: int = 0          # mixup in the first N epochs only (timm's --mixup-off-epoch); 0 = in every epoch
    ema_decay: float = 0.0            # 0 = off; best weights are then the EMA's
    channels_last: bool = True
    amp: bool = True                  # mixed precision on CUDA (amp_dtype); on CPU only with amp_dtype='bfloat16'
    amp_dtype: str = 'auto'           # 'auto' = bfloat16 where the GPU supports it, else float16 with a GradScaler
    compile: bool = False             # torch.compile the training forward
    accum_steps: int = 1              # micro-batches per optimizer step (effective batch = batch x accum x world)
    backbone_lr_scale: float = 1.0    # lr factor of every parameter outside the classifier head (fine-tuning)
    seed: int = 0
    crop_pad: int = 4
    hflip: bool = True
    cutout: int = 0                   # side of a square erased per training image (DeVries & Taylor 2017); 0 = off
    eval_batch_size: int = 500
    log_interval: int = 50
    progress: bool = True
    command: str = ''                 # the exact command line, for metrics.json


class RunError(ValueError):
    """A run that cannot go on as asked (a resume that does not fit, a damaged checkpoint): one-line message."""


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or inf; the message names the epoch and step, the last good checkpoint is kept."""


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, updates_per_epoch: int):
    """timm's CosineLRScheduler per optimizer update: linear warm-up from 0 over ``warmup_epochs``, cosine to
    ``min_lr``. The loop calls ``step_update(u + 1)`` before update ``u``: the warm-up then equals the formula of
    the published runs exactly, and the cosine runs one update ahead of it (that formula held the peak lr for two
    updates; for the e12 recipe |delta lr| <= 3.8e-5, see tests/test_train.py)."""
    from timm.scheduler import CosineLRScheduler
    total = cfg.epochs * updates_per_epoch
    warmup = int(cfg.warmup_epochs * updates_per_epoch)
    return CosineLRScheduler(optimizer, t_initial=max(total - warmup, 1), lr_min=cfg.min_lr, warmup_t=warmup,
                             warmup_lr_init=0., warmup_prefix=True, t_in_epochs=False)


def create_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` on timm's weight-decay groups (1-d params and biases without decay when
    ``no_wd_bn_bias``). With ``backbone_lr_scale`` != 1 the parameters outside the classifier head get that
    ``lr_scale`` (timm's schedulers multiply it in), a true per-group learning rate for SGD and AdamW alike."""
    from timm.optim import create_optimizer_v2, param_groups_weight_decay
    if cfg.opt not in ('sgd', 'adamw'):
        raise ValueError(f"Unknown optimizer {cfg.opt!r}; choose 'sgd' or 'adamw'.")
    if not cfg.backbone_lr_scale > 0:
        raise ValueError(f'backbone_lr_scale must be > 0, got {cfg.backbone_lr_scale}')
    if cfg.no_wd_bn_bias and cfg.weight_decay:
        groups = param_groups_weight_decay(model, cfg.weight_decay)[::-1]  # decay first: older checkpoints load
    else:
        groups = [dict(params=[p for p in model.parameters() if p.requires_grad], weight_decay=cfg.weight_decay)]
    if cfg.backbone_lr_scale != 1.0:
        head = {id(p) for p in model.get_classifier().parameters()}
        split = []
        for g in groups:
            for in_head in (False, True):
                ps = [p for p in g['params'] if (id(p) in head) == in_head]
                if ps:
                    split.append(dict(g, params=ps, **({} if in_head else {'lr_scale': cfg.backbone_lr_scale})))
        groups = split
    groups = [g for g in groups if g['params']]
    if cfg.opt == 'sgd':
        name = 'sgd' if cfg.nesterov and cfg.momentum > 0 else 'momentum'  # timm: 'sgd' = Nesterov
        return create_optimizer_v2(groups, name, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    return create_optimizer_v2(groups, 'adamw', lr=cfg.lr, weight_decay=cfg.weight_decay)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for full precision. CUDA: bfloat16 where supported, else float16 (which
    needs the GradScaler). CPU: only an explicit ``amp_dtype='bfloat16'`` (with AMX 2.4-2.7x faster for
    ResNet-9, see docs/cifar10-weights.md; slower on CPUs without it)."""
    if cfg.amp_dtype not in ('auto', 'bfloat16', 'float16'):
        raise ValueError(f"amp_dtype must be 'auto', 'bfloat16' or 'float16', got {cfg.amp_dtype!r}")
    if not cfg.amp:
        return None
    if device.type == 'cuda':
        if cfg.amp_dtype == 'auto':
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return getattr(torch, cfg.amp_dtype)
    return torch.bfloat16 if cfg.amp_dtype == 'bfloat16' else None


def cutout_transform(side: int, model: nn.Module):
    """Cutout: one ``side`` x ``side`` square per image, wholly inside it at a uniform position, filled with 0
    (the mean after normalisation): the distribution of timm's RandomErasing(probability=1, one square,
    mode='const'), but for the whole batch at once, since timm's loops over the images in Python (9 ms per
    512-image batch on the CPU here, two kernel launches per image on a GPU). The draws come from the epoch's
    generator, so a resumed run replays them."""
    h, w = (getattr(model, 'pretrained_cfg', None) or {}).get('input_size', (3, 32, 32))[1:]
    if side >= min(h, w):
        raise ValueError(f'cutout {side} px does not fit the {h}x{w} training images; use a smaller --cutout.')
    rows, cols = torch.arange(h), torch.arange(w)

    def erase(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        top = torch.randint(0, h - side + 1, (x.shape[0], 1), generator=generator)
        left = torch.randint(0, w - side + 1, (x.shape[0], 1), generator=generator)
        inside = (((rows >= top) & (rows < top + side))[:, :, None] & ((cols >= left) & (cols < left + side))[:, None])
        return x.masked_fill_(inside[:, None].to(x.device, non_blocking=True), 0)  # x: this step's own tensor
    return erase


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
            names = list(dict.fromkeys(k for r in rows for k in r))  # rows of an older version may lack columns
            w = csv.DictWriter(f, fieldnames=names, restval='')
            w.writeheader()
            w.writerows(rows)
    atomic_write(os.path.join(out_dir, 'log.csv'), write_csv)
    _plot_curves(rows, os.path.join(out_dir, 'curves.png'))


def _mixup(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float, smoothing: float,
           generator: torch.Generator):
    """Mixed images and soft targets (label smoothing folded in); draws come from ``generator``.
    Ours, not timm's Mixup: timm draws lambda from the global numpy RNG, which a resumed run cannot replay."""
    target = F.one_hot(y, num_classes).float() * (1. - smoothing) + smoothing / num_classes
    if alpha <= 0:
        return x, target
    import numpy as np
    lam = float(np.random.default_rng(int(torch.randint(2 ** 31, (1,), generator=generator))).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    return x * lam + x[perm] * (1 - lam), target * lam + target[perm] * (1 - lam)


# Resuming: these fields may differ without notice (they change nothing in the result) ...
RESUME_FREE = ('command', 'progress', 'log_interval', 'eval_batch_size', 'compile')
# ... and these never (the checkpoint's weights or optimizer state would not fit).
RESUME_FIXED = ('model', 'num_classes', 'opt', 'no_wd_bn_bias', 'backbone_lr_scale')


def run_identity(model: nn.Module, train_ds, val_ds, cfg: TrainConfig, world: int,
                 run_info: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The full configuration of a run, flat: every TrainConfig field, the model, the data, the split, the world
    size, and what the caller adds (``run_info``: train subset, drop path, ...). Stored in every checkpoint;
    ``--resume`` compares it field by field."""
    num_classes = len(train_ds.classes)
    return {**asdict(cfg), **dict(
        model=getattr(model, 'default_cfg', {}).get('architecture') or type(model).__name__,
        num_classes=num_classes,
        dataset_sha256=getattr(train_ds, 'sha256', None),
        train_images=len(train_ds), val_images=len(val_ds),
        val_split=f'last {len(val_ds) // max(num_classes, 1)} images per class (sorted by name)',
        world_size=world), **(run_info or {})}


def resume_changes(old: Dict[str, Any], new: Dict[str, Any], override: Sequence[str], ckpt_path: str):
    """``{field: (old, new)}`` of the allowed changes; RunError (one line, naming each field) otherwise."""
    unknown = sorted(set(override) - set(new))
    if unknown:
        raise RunError(f'--resume-override: unknown field(s) {", ".join(unknown)}; the run fields are '
                       f'{", ".join(k for k in new if k not in RESUME_FREE)}.')
    diff = {k: (old[k], new[k]) for k in new if k in old and k not in RESUME_FREE and old[k] != new[k]}
    text = ', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in diff.items())
    fixed = [k for k in diff if k in RESUME_FIXED]
    if fixed:
        raise RunError(f'{ckpt_path} was written by a different run ({text}); {", ".join(fixed)} cannot change '
                       'on resume (the saved weights or optimizer state would not fit): use a new --output.')
    refused = [k for k in diff if k not in override]
    if refused:
        raise RunError(f'{ckpt_path} was written by a different run: {text}. Resume with the same settings, allow '
                       f'the change with --resume-override {",".join(refused)}, or use a new --output.')
    return diff


def _load_checkpoint(path: str) -> Dict[str, Any]:
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated zip, not a checkpoint at all, ...
        raise RunError(f'{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); '
                       'it is damaged or not a checkpoint.pt. Restore it, or delete it to start over.') from None


def train(
        model: nn.Module,
        train_ds: ImageArrays,
        val_ds: ImageArrays,
        cfg: TrainConfig,
        out_dir: str,
        resume: bool = False,
        device: Optional[torch.device] = None,
        extra_metrics: Optional[Dict[str, Any]] = None,
        resume_override: Sequence[str] = (),
        run_info: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Train ``model`` on ``train_ds``, select on ``val_ds``; returns the metrics written to metrics.json.

    Under torchrun (process group initialised by the caller or by ``init_distributed``) the model is wrapped
    in DistributedDataParallel and only rank 0 writes ``out_dir``. ``out_dir`` is created when the first epoch
    ends: a run stopped before that (diverged, interrupted) leaves no folder behind. ``resume`` continues from
    ``out_dir/checkpoint.pt`` if the run configuration is the same, or differs only in ``resume_override`` fields.
    """
    world, rank = _dist_info()
    commit = git_commit()  # the code this run started with
    if device is None:
        device = torch.device(f'cuda:{int(os.environ.get("LOCAL_RANK", 0))}' if torch.cuda.is_available() else 'cpu')
    num_classes = len(train_ds.classes)
    if getattr(model, 'num_classes', num_classes) != num_classes:
        raise ValueError(f'The model has {model.num_classes} outputs but the data has {num_classes} classes; '
                         f'create it with num_classes={num_classes}.')
    if cfg.accum_steps < 1:
        raise ValueError(f'accum_steps must be >= 1, got {cfg.accum_steps}')
    mean, std = _mean_std(model)
    identity = run_identity(model, train_ds, val_ds, cfg, world, run_info)
    seed_everything(cfg.seed)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    from timm.loss import SoftTargetCrossEntropy
    from timm.utils import ModelEmaV3
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    optimizer = create_optimizer(model, cfg)
    if hasattr(train_ds, 'make_loader'):  # a streaming split (data/streaming.py): workers decode and augment
        train_loader = train_ds.make_loader(cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True,
                                            num_replicas=world, rank=rank, model=model)
        val_loader = val_ds.make_loader(cfg.eval_batch_size, shuffle=False, num_replicas=world, rank=rank,
                                        model=model)
    else:
        train_loader = BatchLoader(train_ds, cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True,
                                   num_replicas=world, rank=rank)
        val_loader = BatchLoader(val_ds, cfg.eval_batch_size, shuffle=False, num_replicas=world, rank=rank)
    if len(train_loader) == 0:
        raise ValueError(f'{len(train_ds)} training images give no full batch of {cfg.batch_size} per process; '
                         'lower the batch size.')
    steps_per_epoch = len(train_loader)  # micro-batches
    accum = min(cfg.accum_steps, steps_per_epoch)
    updates_per_epoch = -(-steps_per_epoch // accum)
    scheduler = create_scheduler(optimizer, cfg, updates_per_epoch)
    amp_dtype = autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = SoftTargetCrossEntropy()
    erase = cutout_transform(cfg.cutout, model) if cfg.cutout > 0 else None
    ddp_model = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    fwd_model = torch.compile(ddp_model) if cfg.compile else ddp_model

    ckpt_path = os.path.join(out_dir, 'checkpoint.pt')
    start_epoch, rows, best, overrides = 0, [], dict(val_top1=-1.0), []
    if resume and os.path.exists(ckpt_path):
        state = _load_checkpoint(ckpt_path)
        old = state.get('run') or dict(state['config'])  # older checkpoints hold the TrainConfig only
        changes = resume_changes(old, identity, resume_override, ckpt_path)
        start_epoch, rows, best = state['epoch'], state['log'], state['best']
        overrides = list(state.get('resume_overrides', [])) + [
            dict(field=k, original=a, new=b, from_epoch=start_epoch + 1) for k, (a, b) in changes.items()]
        fresh = [{k: v for k, v in g.items() if k != 'params'} for g in optimizer.param_groups]
        try:
            model.load_state_dict(state['model'])
            optimizer.load_state_dict(state['optimizer'])
        except (RuntimeError, ValueError, KeyError) as e:  # e.g. a checkpoint of an older aff-zoo (other groups)
            raise RunError(f'{ckpt_path} does not fit this run ({str(e).splitlines()[0]}); it was written by another '
                           'model or aff-zoo version: resume with that version, or use a new --output.') from None
        for g, f in zip(optimizer.param_groups, fresh):  # the hyper-parameters are this run's (overrides)
            g.update(f)
        if state.get('scaler') and scaler.is_enabled():
            scaler.load_state_dict(state['scaler'])
        if ema is not None and state.get('ema'):
            ema.load_state_dict(state['ema'])
        elif ema is not None:  # EMA switched on by an override: it starts from the resumed weights
            ema.module.load_state_dict(model.state_dict())
        set_rng_state(state['rng'])
        if rank == 0 and changes:
            print(f'Resuming from epoch {start_epoch} with ' + ', '.join(
                f'{k} {a!r} -> {b!r}' for k, (a, b) in changes.items()), file=sys.stderr)
    elif resume and rank == 0:
        print(f'No checkpoint at {ckpt_path}; starting from scratch.', file=sys.stderr)

    from tqdm import tqdm
    global_batch = cfg.batch_size * world
    check_every = 1 if (device.type == 'cpu' and world == 1) else max(cfg.log_interval, 1)  # .item() syncs a GPU
    run_t0, run_images = time.perf_counter(), 0
    warned_val = False
    machine = machine_line(device)  # per epoch: a run resumed elsewhere (another CPU, a lent GPU) says where each ran
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.set_epoch(epoch)
        # All randomness of an epoch comes from (seed, epoch, rank): resumed epochs replay exactly.
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + rank)
        # The authors' CIFAR runs end without mixup (the last 20-40 epochs), as timm's train.py does it.
        mixup_alpha = 0. if 0 < cfg.mixup_off_epoch <= epoch else cfg.mixup_alpha
        ddp_model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite loss, on the device
        seen = 0
        bar = tqdm(total=steps_per_epoch * global_batch, desc=f'epoch {epoch + 1}/{cfg.epochs}', unit='img',
                   unit_scale=True, disable=not (cfg.progress and rank == 0), leave=False, mininterval=2.0)
        for step, (images, labels) in enumerate(train_loader):
            first, group = step % accum == 0, min(accum, steps_per_epoch - (step - step % accum))
            last = step % accum == accum - 1 or step == steps_per_epoch - 1
            if first:
                scheduler.step_update(epoch * updates_per_epoch + step // accum + 1)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if not getattr(train_loader, 'augmented', False):
                images = gpu_augment(images, gen, pad=cfg.crop_pad, flip=cfg.hflip)
            x = normalize(images, mean, std, cfg.channels_last)
            if erase is not None:
                x = erase(x, gen)
            x, target = _mixup(x, labels, num_classes, mixup_alpha, cfg.label_smoothing, gen)
            sync = ddp_model.no_sync() if world > 1 and not last else contextlib.nullcontext()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = fwd_model(x)
                loss = loss_fn(logits.float(), target)
                scaler.scale(loss / group if group > 1 else loss).backward()
            if last:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model)
            loss = loss.detach()
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), step, bad_step)
            loss_sum += loss.double() * labels.shape[0]
            correct += (logits.detach().argmax(1) == labels).sum()
            seen += labels.shape[0]
            run_images += labels.shape[0] * world
            bar.update(global_batch)
            if step % check_every == 0 or step == steps_per_epoch - 1:
                _check_finite(bad_step, world, epoch, steps_per_epoch, ckpt_path, rows, bar)
            if rank == 0 and cfg.progress and step % cfg.log_interval == 0:
                rate = run_images / max(time.perf_counter() - run_t0, 1e-9)
                left = ((cfg.epochs - epoch) * steps_per_epoch - step - 1) * global_batch
                bar.set_postfix(loss=f'{loss.item():.3f}', lr=f'{_lr(optimizer):.4g}',
                                run_eta=tqdm.format_interval(left / rate))
        bar.close()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - t0
        totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), dtype=torch.float64, device=device)])
        if world > 1:
            dist.all_reduce(totals)
        eval_model = ema.module if ema is not None else model
        ev = evaluate_loader(eval_model, val_loader, device, mean, std, cfg.channels_last, num_classes,
                             amp_dtype is not None and device.type == 'cuda')
        count = max(int(ev['count']), 1)
        epoch_seconds = time.perf_counter() - t0
        row = dict(
            epoch=epoch + 1,
            train_loss=round(float(totals[0] / totals[2]), 5),
            train_acc=round(100. * float(totals[1] / totals[2]), 3),
            val_loss=round(float(ev['loss_sum']) / count, 5),
            val_top1=round(100. * int(ev['top1']) / count, 3),
            val_top5=round(100. * int(ev['top5']) / count, 3),
            lr=_lr(optimizer),
            train_seconds=round(train_seconds, 2),
            epoch_seconds=round(epoch_seconds, 2),
            train_images_per_s=round(float(totals[2]) / train_seconds, 1),
            eta_seconds=round((time.perf_counter() - run_t0) / (epoch + 1 - start_epoch) * (cfg.epochs - epoch - 1)),
            machine=machine,
        )
        rows.append(row)
        if rank == 0 and not math.isfinite(row['val_loss']) and not warned_val:
            warned_val = True  # once per run: the cause does not change from epoch to epoch
            print(f'warning: the validation loss is {row["val_loss"]} at epoch {epoch + 1} although training '
                  f'goes on: {nonfinite_report(eval_model)}.', file=sys.stderr, flush=True)
        is_best = row['val_top1'] > best['val_top1']
        if is_best:
            best = dict(val_top1=row['val_top1'], val_top5=row['val_top5'], val_loss=row['val_loss'],
                        epoch=epoch + 1)
        if rank == 0:
            os.makedirs(out_dir, exist_ok=True)
            if is_best:
                save_safetensors(eval_model, os.path.join(out_dir, 'model.safetensors'))
            state = dict(
                model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                ema=ema.state_dict() if ema is not None else None, rng=rng_state(),
                epoch=epoch + 1, updates=(epoch + 1) * updates_per_epoch, log=rows, best=best,
                config=asdict(cfg), run=identity, resume_overrides=overrides)
            atomic_torch_save(state, ckpt_path)
            _write_logs(rows, out_dir)
            print(f'epoch {epoch + 1}/{cfg.epochs} ' + ' '.join(f'{k}={v}' for k, v in row.items() if k != 'epoch'),
                  flush=True)
        if world > 1:
            dist.barrier()

    metrics = dict(
        model=identity['model'],
        val_top1=best['val_top1'], val_top5=best.get('val_top5'), best_epoch=best.get('epoch'),
        epochs=cfg.epochs, val_split=identity['val_split'],
        train_images=len(train_ds), val_images=len(val_ds), classes=list(train_ds.classes),
        params=sum(p.numel() for p in model.parameters()),
        train_images_per_s=round(sum(r['train_images_per_s'] for r in rows) / max(len(rows), 1), 1),
        total_train_seconds=round(sum(r['epoch_seconds'] for r in rows), 1),
        dataset_sha256=train_ds.sha256, dataset=os.path.basename(train_ds.source),
        command=cfg.command, git_commit=commit, world_size=world,
        effective_batch_size=cfg.batch_size * accum * world,
        amp_dtype=str(amp_dtype).replace('torch.', '') if amp_dtype is not None else 'off',
        device=str(device), machine=machine, torch=str(torch.__version__), config=asdict(cfg),
        machines=epochs_by_machine(rows), run=identity,
        resume_overrides=overrides, **(extra_metrics or {}),
    )
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        if rows and start_epoch >= cfg.epochs:  # nothing left to train: logs as the checkpoint has them
            _write_logs(rows, out_dir)
        atomic_write_text(os.path.join(out_dir, 'metrics.json'), json.dumps(metrics, indent=1))
    return metrics


def epochs_by_machine(rows: List[Dict[str, Any]]) -> Dict[str, int]:
    """How many epochs of a run each machine trained, in order of first use; rows written before aff-zoo logged
    the machine count as ``'not recorded'``. ``machine`` alone names only where the run ended."""
    return dict(Counter(r.get('machine') or 'not recorded' for r in rows))


def _lr(optimizer: torch.optim.Optimizer) -> float:
    """The schedule's lr (groups with an ``lr_scale`` below 1 run at a fraction of it)."""
    return max(g['lr'] / g.get('lr_scale', 1.0) for g in optimizer.param_groups)


def nonfinite_report(model: nn.Module) -> str:
    """Why a validation loss came out NaN/inf while training went on (train mode uses batch statistics,
    eval mode the running ones): the state's non-finite tensors, else its largest BN running variance."""
    state = model.state_dict()
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f' and {len(bad) - 5} more' if len(bad) > 5 else ''
        return f'non-finite tensors in the model state: {", ".join(bad[:5])}{more}'
    var = {k: float(v.max()) for k, v in state.items() if k.endswith('running_var') and v.numel()}
    top = max(var, key=var.get) if var else None
    return ('every tensor of the state is finite, so the evaluation forward pass itself overflows'
            + (f' (largest BN running variance: {top} = {var[top]:.3g})' if top else '')
            + '; evaluate the checkpoint in float32 (aff-zoo evaluate without --amp) to tell')


def _check_finite(bad_step: torch.Tensor, world: int, epoch: int, steps: int, ckpt_path: str,
                  rows: List[Dict[str, Any]], bar):
    """Raise TrainingDiverged if any rank saw a non-finite loss (all ranks decide together)."""
    bad = bad_step.clone()
    if world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # the latest rank's first bad step; all ranks stop together
    if int(bad) < 0:
        return
    bar.close()
    kept = (f'{ckpt_path} keeps the last good state (epoch {rows[-1]["epoch"]})' if rows else
            'no epoch had finished, so no run folder was written')
    raise TrainingDiverged(f'the loss became NaN/inf at epoch {epoch + 1}, step {int(bad) + 1} of {steps}; '
                           f'stopped: {kept}. Lower --lr (or raise --warmup-epochs) and run again.')


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

class _FlagAndNegation(argparse.BooleanOptionalAction):
    """``--x`` sets True, ``--no-x`` False. argparse's own action sets False for any flag that starts with ``--no-``,
    which made ``--no-wd-bn-bias`` (the field ``no_wd_bn_bias``) switch weight decay on norms back on."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string == self.option_strings[0])


class _Default:
    """An option's default, marked so that a ``--recipe`` can tell it from a value given on the command line."""
    __slots__ = ('value',)

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return repr(self.value)


def _world_size() -> int:
    return int(os.environ.get('WORLD_SIZE', '1'))


def _paper_lr(a) -> float:
    return round(0.075 * a.batch_size * a.accum_steps * _world_size() / 128, 6)


_E12 = dict(amp=True, batch_size=128, channels_last=True, crop_pad=4, drop_path=0.0, ema_decay=0.0, epochs=12,
            eval_batch_size=500, hflip=True, label_smoothing=0.0, lr=0.1, min_lr=0.0, mixup_alpha=0.0, momentum=0.9,
            nesterov=True, no_wd_bn_bias=True, opt='sgd', seed=0, train_subset=0, val_per_class=500,
            warmup_epochs=0.3, weight_decay=0.0005)
# ResNet-9 in 24 epochs (Page, "How to train your ResNet" 2018, 94 % on CIFAR-10 test): batch 512, lr 0.4 after a
# 5-epoch warm-up (then cosine to 0 here, linear there), Nesterov 0.9, wd 5e-4 on every parameter, crop + flip +
# 8 px cutout, label smoothing 0.2 (his later runs), bfloat16 autocast (3x on AMX CPUs for these wide convs).
_R9 = dict(_E12, batch_size=512, lr=0.4, epochs=24, warmup_epochs=5.0, no_wd_bn_bias=False, label_smoothing=0.2,
           cutout=8, amp=True, amp_dtype='bfloat16')
_R9_E96_CUTOUT12 = dict(_R9, epochs=96, cutout=12)  # the published ResNet-9 recipe; ResNet-11's too
_R11_MIX = dict(_R9_E96_CUTOUT12, epochs=150, mixup_alpha=1.0, mixup_off_epoch=135, label_smoothing=0.1)
_R32W4 = dict(_E12, batch_size=512, lr=0.4, epochs=30, warmup_epochs=2.0, no_wd_bn_bias=False, label_smoothing=0.1,
              cutout=8, amp_dtype='bfloat16')
_IMAGENET = dict(opt='sgd', nesterov=True, momentum=0.9, batch_size=128, weight_decay=1e-4, no_wd_bn_bias=True,
                 min_lr=0.0, label_smoothing=0.1, ema_decay=0.0, img_size=224, val_per_class=50, amp=True,
                 channels_last=True)

RECIPES: Dict[str, Dict[str, Any]] = {
    # The recipe of the published cifar10_e12 weights (aff/iaff/add_resnet20), every value as recorded in weights.py.
    'cifar10-e12': _E12,
    # The >= 93 % CIFAR-10 weights and their ablation: {add,aff,iaff,se,sk,local}_resnet9.
    'cifar10-r9': _R9,
    # The same at twice the epochs: the 24-epoch aff_resnet9 ended at 90.54 % (< 93 %) with the validation
    # accuracy still rising as the lr reached 0 (docs/cifar10-weights.md).
    'cifar10-r9-e48': dict(_R9, epochs=48),
    # And at 96: the 48-epoch set (H100) ended at 91.2-91.8 %, still < 93 %, with 99 % train accuracy.
    'cifar10-r9-e96': dict(_R9, epochs=96),
    # And with a 12 px cutout: at 48 epochs the networks fit 99 % of the augmented training images, so the longer run
    # gets more regularisation. DeVries & Taylor's 16 px square (centre anywhere) erases about 14x14 on average;
    # ours lies wholly inside the image.
    'cifar10-r9-e96-cutout12': _R9_E96_CUTOUT12,
    # airbench96's shape (*_resnet11: ResNet-9 at 128/384/512 with three residual blocks) on the published ResNet-9
    # recipe unchanged, so that a gain over cifar10-r9-e96-cutout12's 91.7-92.0 % is the network's.
    'cifar10-r11-e96': _R9_E96_CUTOUT12,
    # The authors' way past that plateau (96.3 % for AFF-ResNet-32 w4, shared/notes/paper.md 3.3): mixup alpha 1,
    # off for the last 10 % of epochs, label smoothing 0.1 as theirs, over as many epochs as one 10-minute GPU call
    # holds for three ResNet-11s (theirs: 400-640); the 96-epoch runs fit 99 % of the augmented training images.
    'cifar10-r11-mix-e150': _R11_MIX,
    # The same without weight decay on norm scales and biases, as the authors' CIFAR command (--no-wd). With decay,
    # attention units with a weak early gradient shrink to nothing before they learn: over half of each global
    # branch, all of iaff_resnet11's middle inner attention (scripts/attention_decay.py).
    'cifar10-r11-mix-e150-nwd': dict(_R11_MIX, no_wd_bn_bias=True),
    # The authors' CIFAR-10 network (AFF-ResNet-32 at 4x width, 7.9 M parameters) in a short GPU schedule, since
    # the ResNet-9 stays at 91.5-92 % from 48 to 96 epochs: batch 512 at lr 0.4 (0.1 per 128), 2 warm-up epochs,
    # cosine, wd 5e-4 on every parameter, label smoothing 0.1, crop + flip + 8 px cutout, bfloat16 autocast.
    'cifar10-r32w4': _R32W4,
    # Its 30-epoch pilot (H100) ended at 91.06 % (AFF) with the curve still climbing: the next lease's length.
    'cifar10-r32w4-e64': dict(_R32W4, epochs=64),
    # The paper's ImageNet recipe (shared/notes/paper.md, section 4): Nesterov SGD, lr 0.075 per 128 images scaled
    # linearly with the global batch (batch x accum x world; the authors' MXNet runs kept 0.075 for 256-512 images),
    # 5 warm-up epochs from 0, cosine to 0, label smoothing 0.1, mixup alpha 0.2, off for the last 5 epochs as
    # theirs, wd 1e-4 without decay on BN and biases, 224 px, 160 epochs (ResNet-50) or 240 (ResNeXt-50).
    'imagenet-paper': dict(_IMAGENET, lr=_paper_lr, warmup_epochs=5.0, mixup_alpha=0.2,
                           epochs=lambda a: 240 if 'resnext' in a.model else 160,
                           mixup_off_epoch=lambda a: max(a.epochs - 5, 0)),  # after epochs: resolved in this order
    # A short fine-tune of upcycled ImageNet weights (start with --init-from <model>.<upcycled tag>). The network
    # starts at its parent's optimum and every fusion computes the addition it replaces, so the only new thing to
    # learn is the attention: 5 epochs at a tenth of the paper's peak lr (0.0075 per 128 images), a 0.5-epoch
    # warm-up so the fresh attention gradients cannot knock the trained weights off their optimum, no mixup (it
    # pays over long schedules only). About 3 % of the paper's 160 epochs.
    'imagenet-upcycle': dict(_IMAGENET, lr=lambda a: round(_paper_lr(a) / 10, 7), warmup_epochs=0.5,
                             mixup_alpha=0.0, epochs=5),
}


def apply_recipe(args) -> argparse.Namespace:
    """Resolve ``args`` in place: flags given on the command line > the ``--recipe``'s values > the defaults.
    Recipe values may be functions of the other resolved options (the paper's lr scales with the batch)."""
    explicit = {k for k, v in vars(args).items() if not isinstance(v, _Default) and v is not None}
    for k, v in vars(args).items():
        if isinstance(v, _Default):
            setattr(args, k, v.value)
    name = getattr(args, 'recipe', None)
    if name:
        if name not in RECIPES:
            raise ValueError(f'Unknown recipe {name!r}; choose one of {", ".join(RECIPES)}.')
        recipe = RECIPES[name]
        for later in (False, True):  # constants first, then the values computed from them
            for k, v in recipe.items():
                if callable(v) == later and k not in explicit and hasattr(args, k):
                    setattr(args, k, v(args) if later else v)
    return args


def add_config_args(p: argparse.ArgumentParser):
    """One flag per TrainConfig field (``--no-X`` for booleans); defaults marked for ``apply_recipe``."""
    helps = dict(
        epochs='number of epochs', batch_size='batch size per process (and micro-batch)', opt="'sgd' or 'adamw'",
        lr='peak learning rate (after warmup)', weight_decay='weight decay',
        no_wd_bn_bias='no weight decay on 1-d params (norms, biases)', warmup_epochs='linear warmup epochs',
        label_smoothing='label smoothing', mixup_alpha='mixup Beta(alpha, alpha); 0 = off',
        mixup_off_epoch='mix only the first N epochs (timm: --mixup-off-epoch); 0 = every epoch',
        ema_decay='EMA decay of weights; 0 = off', channels_last='channels_last memory format',
        amp='mixed precision on CUDA', amp_dtype="'auto' (bfloat16 where supported, else float16 with a "
        "GradScaler), 'bfloat16' (also on CPU) or 'float16'", compile='torch.compile the training forward',
        accum_steps='micro-batches per optimizer step (gradient accumulation)',
        backbone_lr_scale='learning rate factor of all parameters outside the classifier head',
        seed='seed (data order, augmentation, init)', cutout='side in pixels of the square cutout erases from each '
        'training image (fill 0, at a uniform position inside it, as timm RandomErasing draws it); 0 = off')
    for f in fields(TrainConfig):
        if f.name == 'command':
            continue
        flag = '--' + f.name.replace('_', '-')
        if f.type in (bool, 'bool'):
            p.add_argument(flag, action=_FlagAndNegation, default=_Default(f.default),
                           help=helps.get(f.name))
        else:
            typ = {'int': int, 'float': float, 'str': str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            p.add_argument(flag, type=typ, default=_Default(f.default), help=helps.get(f.name))


def config_from_args(args) -> TrainConfig:
    apply_recipe(args)
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != 'command'},
                       command=recipe_command(args))


_NOT_RECIPE = ('func', 'command', 'resume', 'resume_override', 'progress', 'log_interval', 'recipe', 'print_command')


def recipe_command(args) -> str:
    """The run as one explicit command line: every option with its value (defaults included)."""
    parts = ['aff-zoo', 'train']
    for k, v in sorted(vars(args).items()):
        v = v.value if isinstance(v, _Default) else v
        if k in _NOT_RECIPE or k.startswith('_') or v is None:
            continue
        flag = '--' + k.replace('_', '-')
        if isinstance(v, bool):
            parts.append(flag if v else '--no-' + k.replace('_', '-'))
        else:
            parts += [flag, str(v)]
    return ' '.join(shlex.quote(p) for p in parts)


def _overrides(text: Optional[str]) -> List[str]:
    return [f.strip().replace('-', '_') for f in (text or '').split(',') if f.strip()]


def _cmd_train(args) -> int:
    import timm
    import aff_zoo  # noqa: F401  (registers the models)
    from ..data import DataError
    from ..data.streaming import open_data, train_val_split
    try:
        apply_recipe(args)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if (args.recipe or args.print_command) and int(os.environ.get('RANK', '0')) == 0:
        print(f'recipe {args.recipe or "(none)"}: {recipe_command(args)}', file=sys.stderr if not args.print_command
              else sys.stdout, flush=True)
    if args.print_command:
        return 0
    distributed = init_distributed()
    try:
        _, rank = _dist_info()
        try:
            data, choice = open_data(args.data, 'train', args.data_path, args.img_size, args.num_classes,
                                     args.workers, progress=rank == 0)
            train_ds, val_ds = train_val_split(data, args.val_per_class)
        except DataError as e:
            print(f'error: {e}', file=sys.stderr)
            return 2
        if rank == 0:
            print(f'data: {choice.path} ({choice.reason})', file=sys.stderr)
        if args.train_subset:
            train_ds = train_ds.subset(torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(0))
                                       [:args.train_subset].sort().values.numpy())
        cfg = config_from_args(args)
        seed_everything(cfg.seed)
        if args.init_from:  # a trained plain peer's weights, fusions starting as addition
            from ..models.upcycle import UpcycleError, upcycle
            try:
                model = upcycle(args.model, args.init_from, num_classes=len(data.classes),
                                drop_path_rate=args.drop_path)
            except UpcycleError as e:
                print(f'error: --init-from: {e}', file=sys.stderr)
                return 2
        else:
            model = timm.create_model(args.model, num_classes=len(data.classes), drop_path_rate=args.drop_path)
        device = None  # auto: this rank's GPU where CUDA is available, else the CPU
        if args.device == 'cuda' and not torch.cuda.is_available():
            print(f'error: --device cuda, but CUDA is not available here (torch {torch.__version__}); '
                  'use --device cpu or auto.', file=sys.stderr)
            return 2
        if args.device != 'auto':
            device = torch.device(f'cuda:{int(os.environ.get("LOCAL_RANK", 0))}' if args.device == 'cuda' else 'cpu')
        try:
            metrics = train(model, train_ds, val_ds, cfg, args.output, resume=args.resume, device=device,
                            extra_metrics=dict(data_path=choice.path, data_source=choice.kind,
                                               data_reason=choice.reason, img_size=args.img_size),
                            resume_override=_overrides(args.resume_override),
                            run_info=dict(train_subset=args.train_subset, drop_path=args.drop_path,
                                          data_path=choice.path, img_size=args.img_size,
                                          init_from=args.init_from))
        except (ValueError, TrainingDiverged) as e:  # RunError and the loop's other clear errors
            print(f'error: {e}', file=sys.stderr)
            return 2
        if rank == 0:
            print(json.dumps({k: metrics[k] for k in ('model', 'val_top1', 'val_top5', 'best_epoch', 'epochs')}))
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


def add_resume_args(p: argparse.ArgumentParser):
    p.add_argument('--resume', action='store_true', help='continue from <output>/checkpoint.pt')
    p.add_argument('--resume-override', default=None, metavar='FIELD[,FIELD...]',
                   help='with --resume: run fields allowed to differ from the checkpoint (e.g. lr,epochs); the '
                        'schedule is recomputed for the new values from the resumed epoch')


def register_cli(subparsers):
    p = subparsers.add_parser('train', help='train a registered model on an image-folder dataset or archive',
                              description=__doc__.splitlines()[0])
    p.add_argument('--model', required=True, help='registered model name, e.g. aff_resnet20')
    p.add_argument('--data', required=True,
                   help='ImageFolder dir, ImageFolder .tar(.gz), or cifar-10-python.tar.gz')
    p.add_argument('--output', required=True, help='run directory (checkpoint, logs, best weights)')
    add_resume_args(p)
    p.add_argument('--recipe', choices=sorted(RECIPES), default=None,
                   help='named preset (explicit flags override its values); prints its full command')
    p.add_argument('--print-command', action='store_true', help='print the full explicit command and exit')
    p.add_argument('--num-classes', type=int, default=None, help='expected class count (checked against the data)')
    p.add_argument('--val-per-class', type=int, default=None,
                   help='last N images (by name) of each class = val (default 500, or a tenth of the smallest '
                        'class when that has under 5000)')
    p.add_argument('--data-path', choices=('auto', 'memory', 'stream'), default='auto',
                   help='memory: decode once, keep uint8 (small fixed-size sets); stream: DataLoader workers read '
                        'and augment (large sets, mixed sizes, WebDataset shards); auto picks by format and size')
    p.add_argument('--img-size', type=int, default=None,
                   help='streaming: train/eval crop size (default: the model\'s input size)')
    p.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='auto',
                   help="auto: this process's GPU (LOCAL_RANK) where CUDA is available, else the CPU")
    p.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1),
                   help='streaming: DataLoader worker processes per training process')
    p.add_argument('--train-subset', type=int, default=_Default(0),
                   help='train on a fixed random subset of N images (0=all)')
    p.add_argument('--drop-path', type=float, default=_Default(0.0), help='stochastic depth rate')
    p.add_argument('--init-from', default=None,
                   help='start from a trained plain peer, upcycled (aff_zoo.upcycle): a timm name such as '
                        'resnet50d.a1_in1k, a zoo tag such as add_resnet20.cifar10_e12, or local-dir:<folder>')
    add_config_args(p)
    p.set_defaults(func=lambda a: _cmd_train(a))
    return p
