"""Does distillation from an ensemble of the published CIFAR-10 weights lift one of them toward 93 %?

A probe, not a recipe (docs/cifar10-weights.md): the four published ``.cifar10_e96`` files, averaged over each
training image and its mirror image, give 93.26 % on the validation split (93.56 with flip TTA) against 91.74-92.22
alone. This fine-tunes one published network for a few epochs on the ensemble's soft targets (computed once on the
un-augmented training images, cached outside the repo) with crop-and-flip augmentation, cosine lr, bfloat16
autocast, and reports the validation top-1 after each epoch. The teachers never see the validation images.
Resumable: rerun the same command and it goes on from the last finished epoch.

    python scripts/distill_probe.py --student aff_resnet11.cifar10_e96 --epochs 8 --lr 0.04 --output /tmp/kd-aff11
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy
from tqdm import tqdm

import aff_zoo  # noqa: F401  (registers the models)
from aff_zoo.data import load_images, split_train_val
from aff_zoo.data.memory import cache_dir, gpu_augment, normalize, to_tensor_nchw
from aff_zoo.models.pretrained import create_model
from aff_zoo.models.weights import WEIGHTS
from aff_zoo.training.evaluate import evaluate
from aff_zoo.training.train import TrainConfig, atomic_torch_save, create_optimizer, create_scheduler

ROOT = Path(__file__).resolve().parents[1]
TEACHERS = tuple(w.name for w in WEIGHTS if w.tag == 'cifar10_e96')


def published(name: str) -> torch.nn.Module:
    """The shipped file of a published CIFAR-10 weight (``hub/<name>/``), channels_last."""
    w = next(w for w in WEIGHTS if w.name == name)
    model = create_model(w.arch, weights=ROOT / 'hub' / w.name / w.filename, num_classes=w.num_classes)
    return model.to(memory_format=torch.channels_last)


@torch.inference_mode()
def view_probs(names, images: torch.Tensor, mirror: bool = True, bf16: bool = False,
               batch: int = 500) -> torch.Tensor:
    """Mean softmax of the networks ``names`` on uint8 ``images``: views x N x classes, the views being the image
    and (``mirror``) its mirror image. float32 as ``aff-zoo evaluate`` runs, or bfloat16 autocast (``bf16``)."""
    total = 0
    for name in names:
        model = published(name).eval()
        cfg = model.pretrained_cfg
        probs = []
        for i in tqdm(range(0, len(images), batch), desc=f'teacher {name}', leave=False):
            x = normalize(images[i:i + batch], cfg['mean'], cfg['std'], True)
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
                probs.append(torch.stack([model(v).float().softmax(1) for v in ([x, x.flip(3)] if mirror else [x])]))
        total = total + torch.cat(probs, 1)
    return total / len(names)


def report_ensemble(names, val_ds) -> None:
    """Top-1 (%) on the validation split of each network and of the mean softmax of all, one view and with the
    mirror image (mean softmax over both; a separate column, as in the README)."""
    images, labels = to_tensor_nchw(val_ds.images), torch.as_tensor(val_ds.labels, dtype=torch.long)
    total = 0
    for name in names:
        p = view_probs([name], images)
        total = total + p
        print(f'{name:32s} {top1(p[0], labels):6.2f} {top1(p.mean(0), labels):6.2f}', flush=True)
    print(f'{"mean of the " + str(len(names)):32s} {top1(total[0], labels):6.2f} {top1(total.mean(0), labels):6.2f}')


def report_gap(student: str, teachers, train_ds, val_ds, n: int = 2000, seed: int = 0) -> None:
    """What is left to distil: KL(ensemble || student) in nats and their top-1 agreement on ``n`` training
    images, on ``n`` mixup blends of training images (lambda uniform: Beta(1, 1)), and on ``n`` validation images.
    The teachers fit their own training images, so only inputs they have not memorised carry their knowledge."""
    g = torch.Generator().manual_seed(seed)
    train = to_tensor_nchw(train_ds.images)[torch.randperm(len(train_ds), generator=g)[:n]]
    lam = torch.rand(n, 1, 1, 1, generator=g)
    mixed = (train.float() * lam + train.roll(1, 0).float() * (1 - lam)).round().to(torch.uint8)
    val = to_tensor_nchw(val_ds.images)[torch.randperm(len(val_ds), generator=g)[:n]]
    print(f'{"images (" + str(n) + " each)":24s} {"KL nats":>8s} {"agree %":>8s}')
    for label, images in (('training', train), ('training, mixup', mixed), ('validation', val)):
        t = view_probs(teachers, images, mirror=False)[0].clamp_min(1e-8)
        s_ = view_probs([student], images, mirror=False)[0].clamp_min(1e-8)
        kl = float((t * (t.log() - s_.log())).sum(1).mean())
        print(f'{label:24s} {kl:8.4f} {float((t.argmax(1) == s_.argmax(1)).double().mean()) * 100:8.2f}', flush=True)


def top1(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return round(float((probs.argmax(1) == labels).double().mean()) * 100, 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--student', help='a published weight name, e.g. aff_resnet11.cifar10_e96')
    p.add_argument('--teachers', default=','.join(TEACHERS))
    p.add_argument('--data', default=str(ROOT.parent / 'shared/data/cifar10-train-jpeg.tar.gz'))
    p.add_argument('--epochs', type=int, default=8)
    p.add_argument('--lr', type=float, default=0.04)
    p.add_argument('--warmup-epochs', type=float, default=0.5)
    p.add_argument('--label-weight', type=float, default=0.0, help='weight of the label-smoothed (0.2) labels')
    p.add_argument('--batch-size', type=int, default=512)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--output', help='the run folder (checkpoint.pt, log.json)')
    p.add_argument('--function-matching', action='store_true',
                   help='blend image pairs (mixup, lambda ~ U(0, 1)) and run the teachers on each blended batch, '
                   'instead of their cached outputs on the training images (Beyer et al. 2022)')
    p.add_argument('--report-ensemble', action='store_true',
                   help='print the validation top-1 of each teacher and of their mean, then stop')
    p.add_argument('--report-gap', action='store_true',
                   help="print the student's distance to the ensemble on training, mixed and validation images")
    a = p.parse_args(argv)
    if not a.student and not a.report_ensemble:
        p.error('--student is required (but for --report-ensemble)')

    train_ds, val_ds = split_train_val(load_images(a.data), 500)
    teachers = a.teachers.split(',')
    if a.report_ensemble or a.report_gap:
        if a.report_ensemble:
            report_ensemble(teachers, val_ds)
        if a.report_gap:
            report_gap(a.student, teachers, train_ds, val_ds)
        return 0
    if not a.output:
        p.error('--output is required for a fine-tune')
    key = f'kd-{train_ds.sha256[:12]}-' + '-'.join(t.replace('.', '_') for t in teachers) + '.pt'
    cache = Path(cache_dir()) / key
    images = to_tensor_nchw(train_ds.images)
    labels = torch.as_tensor(train_ds.labels, dtype=torch.long)
    if a.function_matching:  # the teachers run on each step's own blended batch
        targets, nets = None, [published(t).eval() for t in teachers]
    elif cache.exists():
        targets = torch.load(cache, weights_only=True)  # our own cache of plain tensors
    else:
        t0 = time.perf_counter()
        targets = view_probs(teachers, images, bf16=True).mean(0)
        atomic_torch_save(targets, str(cache))
        print(f'teacher targets: {time.perf_counter() - t0:.0f} s, top-1 on the training images '
              f'{(targets.argmax(1) == labels).float().mean() * 100:.2f} %', flush=True)
    if targets is not None:
        smooth = mixup_target(labels, 10, smoothing=0.2)  # timm's label-smoothed one-hot (lam=1: no mixing)
        targets = (1 - a.label_weight) * targets + a.label_weight * smooth

    model = published(a.student)
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, warmup_epochs=a.warmup_epochs,
                      no_wd_bn_bias=False, weight_decay=5e-4, seed=a.seed)
    opt = create_optimizer(model, cfg)
    steps = len(train_ds) // a.batch_size
    sched = create_scheduler(opt, cfg, steps)
    mean, std = model.pretrained_cfg['mean'], model.pretrained_cfg['std']
    loss_fn = SoftTargetCrossEntropy()
    os.makedirs(a.output, exist_ok=True)
    ckpt, log = os.path.join(a.output, 'checkpoint.pt'), []
    start = 0
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=True)  # written by this script
        model.load_state_dict(state['model'])
        opt.load_state_dict(state['optimizer'])
        start, log = state['epoch'], state['log']
    else:
        log.append(dict(epoch=0, val_top1=round(evaluate(model, val_ds)['top1'], 2)))
        print(json.dumps(log[-1]), flush=True)
    for epoch in range(start, a.epochs):
        gen = torch.Generator().manual_seed(a.seed * 1_000_003 + epoch)
        order = torch.randperm(len(train_ds), generator=gen)
        model.train()
        t0, loss_sum = time.perf_counter(), 0.
        for step in tqdm(range(steps), desc=f'epoch {epoch + 1}/{a.epochs}', leave=False):
            idx = order[step * a.batch_size:(step + 1) * a.batch_size]
            sched.step_update(epoch * steps + step + 1)
            x = gpu_augment(images[idx], gen, pad=4, flip=True)
            if targets is None:  # blend each image with the next one, lambda ~ U(0, 1), as report_gap measures
                lam = torch.rand(len(idx), 1, 1, 1, generator=gen)
                x = x.float() * lam + x.roll(1, 0).float() * (1 - lam)
            x = normalize(x, mean, std, True)
            with torch.autocast('cpu', dtype=torch.bfloat16):
                if targets is None:
                    with torch.no_grad():
                        target = sum(t(x).float().softmax(1) for t in nets) / len(nets)
                else:
                    target = targets[idx]
                logits = model(x)
            loss = loss_fn(logits.float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += float(loss)
        ev = evaluate(model, val_ds)  # aff-zoo evaluate's figures: CPU, float32, batch 500
        log.append(dict(epoch=epoch + 1, train_loss=round(loss_sum / steps, 4), val_top1=round(ev['top1'], 2),
                        val_loss=round(ev['loss'], 4), seconds=round(time.perf_counter() - t0, 1)))
        print(json.dumps(log[-1]), flush=True)
        atomic_torch_save(dict(model=model.state_dict(), optimizer=opt.state_dict(), epoch=epoch + 1, log=log), ckpt)
    Path(a.output, 'log.json').write_text(json.dumps(dict(args=vars(a), log=log), indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
