#!/usr/bin/env python
"""CPU figures behind docs/training-at-scale.md: what the streaming path costs per image, and what AFF costs
per training step against its plain peer, both in CPU-seconds of this process (``time.process_time``: the work
done, nearly independent of other jobs on a shared machine; one torch thread).

1. Data: images per CPU-second that one process reads, decodes and augments (timm's RandomResizedCrop + flip
   + colour jitter to 224 px) from a generated folder of ImageNet-size JPEGs (mixed sizes around 500 x 375),
   through ``aff_zoo.data.streaming`` with no workers. Divides into a GPU's training rate to give the
   loader processes a GPU needs.
2. Model: training images per CPU-second of aff_resnet50 and resnet50d (fp32, batch 8, 224 px,
   channels_last), round-robin; their ratio is the AFF cost on this CPU (GPU ratios come from gpu_check.sh).

    python scripts/scale_estimate.py --output scale_estimate.json
    python scripts/scale_estimate.py --from scale_estimate.json      # the estimate table only

3. The wall-time ESTIMATE table of docs/training-at-scale.md: a published plain-peer GPU training rate (timm's
   RTX 3090 AMP channels_last table, not measured here) times the measured AFF ratio, 0.9 efficiency.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import aff_zoo  # noqa: E402,F401
from aff_zoo.data.streaming import open_data, train_val_split  # noqa: E402
from aff_zoo.deploy.benchmark import interleaved_rates, paired_ratio  # noqa: E402
from aff_zoo.utils import machine_line  # noqa: E402


def make_jpegs(root, n, seed=0):
    """Smooth random images (JPEG-compressible like photos, unlike white noise), ~500 x 375, 4 classes."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = os.path.join(root, f'class{i % 4}')
        os.makedirs(d, exist_ok=True)
        w, h = int(rng.integers(400, 600)), int(rng.integers(300, 450))
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(os.path.join(d, f'{i:05d}.jpg'), quality=90)


def data_rate(n_images, rounds):
    with tempfile.TemporaryDirectory() as root:
        make_jpegs(root, n_images)
        data, _ = open_data(root, img_size=224, workers=0, data_path='stream')
        train, _ = train_val_split(data, 1)
        loader = train.make_loader(8, shuffle=True, seed=0, drop_last=True)
        rates, n = [], len(loader) * 8
        for epoch in range(rounds):
            loader.set_epoch(epoch)
            t = time.process_time()
            for _ in loader:
                pass
            rates.append(n / (time.process_time() - t))
        size_kb = sum(os.path.getsize(f) for _, f in train.files) / len(train.files) / 1024
    return dict(images_per_cpu_s=round(statistics.median(rates), 1), rounds=[round(r, 1) for r in rates],
                images=n, mean_jpeg_kb=round(size_kb, 1))


def model_rates(names, batch, size, rounds):
    x = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,))
    fns = {}
    for n in names:
        torch.manual_seed(0)
        m = timm.create_model(n).to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True)

        def step(m=m, opt=opt):
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        step()  # warm-up
        fns[n] = step
    rates = interleaved_rates(fns, batch, rounds)
    out = {n: dict(train_images_per_cpu_s=round(statistics.median(r), 2), rounds=[round(v, 2) for v in r])
           for n, r in rates.items()}
    out['ratio'] = round(paired_ratio(rates[names[0]], rates[names[1]]), 3)
    return out


IMAGENET_TRAIN = 1_281_167
# timm's results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv (huggingface/pytorch-image-models), img/s
PUBLISHED_RTX3090 = {'resnet50d': 1078.0, 'resnext50d_32x4d': 894.57}
EFFICIENCY = 0.9   # evaluation and all-reduce overhead: itself an estimate


def estimate_table(ratio: float) -> str:
    """Hours per recipe on 1, 8 and 16 RTX 3090-class GPUs (ESTIMATES, see the module docstring)."""
    # the AFF ratio measured for ResNet-50 is applied to ResNeXt-50 too (an assumption)
    runs = [('aff_resnet50', 'resnet50d', 'imagenet-paper', 160),
            ('aff_resnext50', 'resnext50d_32x4d', 'imagenet-paper', 240),
            ('aff_resnet50', 'resnet50d', 'imagenet-upcycle', 5),
            ('aff_resnext50', 'resnext50d_32x4d', 'imagenet-upcycle', 5)]
    lines = ['| model | recipe | epochs | est. img/s per GPU | est. hours, 1 GPU | 1 node x 8 | 2 nodes x 8 |',
             '|---|---|---|---|---|---|---|']
    for model, peer, recipe, epochs in runs:
        rate = PUBLISHED_RTX3090[peer] * ratio
        hours = [epochs * IMAGENET_TRAIN / (g * rate * EFFICIENCY) / 3600 for g in (1, 8, 16)]
        lines.append(f'| {model} | {recipe} | {epochs} | {rate:.0f} | ' + ' | '.join(f'{h:.1f}' for h in hours) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--images', type=int, default=96)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--output')
    p.add_argument('--from', dest='from_file', help='print the estimate table from a saved --output file')
    args = p.parse_args(argv)
    if args.from_file:
        with open(args.from_file) as f:
            print(estimate_table(json.load(f)['model']['ratio']))
        return 0
    torch.set_num_threads(1)
    res = dict(machine=machine_line(torch.device('cpu')),
               command='python scripts/scale_estimate.py ' + ' '.join(argv if argv is not None else sys.argv[1:]),
               data=data_rate(args.images, args.rounds),
               model=model_rates(['aff_resnet50', 'resnet50d'], args.batch_size, 224, args.rounds))
    print(json.dumps(res, indent=1))
    print(estimate_table(res['model']['ratio']))
    if args.output:
        with open(args.output, 'w') as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
