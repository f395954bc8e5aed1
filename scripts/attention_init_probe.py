"""Do a model's weights blow up in its first steps? The probe behind docs/cifar10-weights.md's init table.

Trains each model for a few steps on real CIFAR-10 images (lr rising linearly to its peak, SGD with Nesterov
momentum, wd 5e-4, label smoothing 0.1, bfloat16 autocast: the start of the cifar10-r32w4 recipe) and prints
the stem's weight norm, the largest BN running variance and the loss, side by side. With random attention a
deep iAFF stack multiplies its gradients and the stem's weights grow by orders of magnitude.

    python scripts/attention_init_probe.py add_resnet32 iaff_resnet32 iaff_resnet32:random \\
        iaff_resnet32:random:clip1 aff_resnet32:random aff_resnet32

``MODEL[:random][:clipN]``: ``random`` = ``zero_init_last=False`` (the attention's random start), ``clipN`` =
clip the gradient norm to N.
"""
import argparse
import time

import numpy as np
import timm
import torch

import aff_zoo  # noqa: F401  (registers the models)
from aff_zoo.data import load_images, normalize


def probe(spec: str, images: torch.Tensor, labels: torch.Tensor, steps: int, batch: int, peak: float) -> dict:
    name, *opts = spec.split(':')
    clip = next((float(o[4:]) for o in opts if o.startswith('clip')), float('inf'))
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, zero_init_last='random' not in opts).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group['lr'] = peak * (step + 1) / steps
        x, y = images[step * batch:(step + 1) * batch], labels[step * batch:(step + 1) * batch]
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        inner = _grad_norm(model, '.att1.')  # iAFF's inner attention against its outer one, before clipping
        inner = inner / _grad_norm(model, '.att2.') if inner is not None else None
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    running_var = max(float(b.max()) for k, b in model.named_buffers() if k.endswith('running_var'))
    return dict(model=spec, stem=float(model.stem.conv.weight.detach().norm()), running_var=running_var,
                loss=float(loss.detach()), inner=inner, seconds=time.time() - t0)


def _grad_norm(model: torch.nn.Module, part: str):
    """The gradient norm over the parameters whose names contain ``part`` (None if there are none)."""
    grads = [p.grad for n, p in model.named_parameters() if part in n and p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('models', nargs='+', help='MODEL[:random][:clipN]')
    p.add_argument('--data', default='../shared/data/cifar10-train-jpeg.tar.gz')
    p.add_argument('--steps', type=int, default=96)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--lr', type=float, default=0.1, help='peak lr, reached at the last step')
    args = p.parse_args()
    data = load_images(args.data, progress=False)
    idx = torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(0))[:args.steps * args.batch_size]
    first = timm.create_model(args.models[0].split(':')[0])
    cfg = first.pretrained_cfg
    images = normalize(torch.from_numpy(np.asarray(data.images)[idx.numpy()]).permute(0, 3, 1, 2),
                       cfg['mean'], cfg['std'])
    labels = torch.from_numpy(np.asarray(data.labels)[idx.numpy()]).long()
    print(f'{args.steps} steps of {args.batch_size} images, lr rising to {args.lr}; stem weight norm at the start: '
          f'{float(first.stem.conv.weight.detach().norm()):.3g}')
    print('| model | stem weight norm | largest BN running variance | loss | iAFF: inner / outer attention gradient '
          '(last step) | seconds |\n|---|---|---|---|---|---|')
    for spec in args.models:
        r = probe(spec, images, labels, args.steps, args.batch_size, args.lr)
        inner = '-' if r['inner'] is None else f'{r["inner"]:.2g}'
        print(f'| `{r["model"]}` | {r["stem"]:.3g} | {r["running_var"]:.3g} | {r["loss"]:.3f} | {inner} | '
              f'{r["seconds"]:.0f} |', flush=True)


if __name__ == '__main__':
    main()
