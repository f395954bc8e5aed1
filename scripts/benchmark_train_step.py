#!/usr/bin/env python
"""Training-step throughput of several models, measured round-robin; prints and writes JSON.

Two figures per model: wall-clock images/s (what you get, but on a shared machine mostly a measure of
the other jobs' load) and images per CPU-second of this process (``time.process_time``: the compute
cost, nearly independent of the load; on an idle machine with N threads, wall images/s is at most
about N times it). The median over rounds is kept.

    python scripts/benchmark_train_step.py add_resnet8 aff_resnet8 --rounds 5 --steps 5 --output bench.json

One step = augmentation + normalisation + forward + backward + SGD update on a batch of uint8 32x32
images, channels_last, fp32 on CPU (AMP on CUDA), exactly as `aff-zoo train` does it; ``--bf16`` autocasts to
bfloat16 on either device (the cifar10-r9 recipe; fast on CPUs with AMX); ``--compile`` wraps the model in
torch.compile as ``aff-zoo train --compile`` does (the first step, which compiles, is the untimed warm-up).
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import aff_zoo  # noqa: E402,F401
from aff_zoo.data import gpu_augment, normalize  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('models', nargs='+')
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--steps', type=int, default=5, help='timed steps per model per round')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--bf16', action='store_true', help='bfloat16 autocast (also on CPU)')
    p.add_argument('--compile', action='store_true', help='torch.compile the forward, as `aff-zoo train --compile`')
    p.add_argument('--output')
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    state = {}
    for name in args.models:
        m = timm.create_model(name).to(device).to(memory_format=torch.channels_last).train()
        state[name] = (torch.compile(m) if args.compile else m,
                       torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True))

    def step(name):
        m, opt = state[name]
        xx = normalize(gpu_augment(x, gen), m.pretrained_cfg['mean'], m.pretrained_cfg['std'], True)
        with torch.autocast(device.type, dtype=torch.bfloat16 if args.bf16 else None,
                            enabled=args.bf16 or device.type == 'cuda'):
            loss = F.cross_entropy(m(xx).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for name in args.models:  # warm-up
        step(name)
    rates = {n: [] for n in args.models}
    for _ in range(args.rounds):
        for name in args.models:
            if device.type == 'cuda':
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step(name)
            if device.type == 'cuda':
                torch.cuda.synchronize()
            n_img = args.batch_size * args.steps
            rates[name].append((n_img / (time.perf_counter() - t), n_img / (time.process_time() - c)))
    out = {n: dict(images_per_s=round(statistics.median(w for w, _ in r), 1),
                   images_per_cpu_s=round(statistics.median(c for _, c in r), 1),
                   rounds=[[round(w, 1), round(c, 1)] for w, c in r],
                   params=sum(p.numel() for p in state[n][0].parameters())) for n, r in rates.items()}
    meta = dict(device=str(device), threads=torch.get_num_threads(), batch_size=args.batch_size, bf16=args.bf16,
                compile=args.compile,
                command='python scripts/benchmark_train_step.py ' + ' '.join(argv or sys.argv[1:]))
    for n, r in out.items():
        print(f'{n:24s} {r["images_per_s"]:8.1f} img/s wall  {r["images_per_cpu_s"]:8.1f} img per CPU-s  '
              f'(rounds [wall, cpu]: {r["rounds"]})')
    if args.output:
        with open(args.output + '.tmp', 'w') as f:
            json.dump(dict(meta=meta, models=out), f, indent=1)
        os.replace(args.output + '.tmp', args.output)


if __name__ == '__main__':
    main()
