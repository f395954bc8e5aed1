#!/usr/bin/env python
"""A/B of one inference detail: the blend writing into the attention map's memory (``reuse_w``, the
default) against a fresh output tensor (the code before it), whole networks, interleaved in one run.

    python scripts/ab_inference_blend.py --models resnext50d_32x4d iaff_resnext50 aff_resnext50 resnet50d aff_resnet50

Prints images/s per model and variant (median over rounds, CPU time of this process, one thread) and
the ratio to the first model. Our models are BN-folded (``fuse_for_inference``), as in `aff-zoo benchmark`.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import timm  # noqa: E402
import torch  # noqa: E402

import aff_zoo  # noqa: E402,F401
import aff_zoo.layers.fusion as fusion  # noqa: E402
from aff_zoo.deploy.benchmark import interleaved_rates, paired_ratio  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', nargs='+', required=True, help='first = baseline of the ratios')
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--rounds', type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size).contiguous(memory_format=torch.channels_last)
    reuse_blend = fusion.blend

    def fresh_blend(x, y, w, scale, reuse_w=False):
        return reuse_blend(x, y, w, scale, False)

    zoo = set(aff_zoo.list_models())
    models = {}
    for name in args.models:
        m = timm.create_model(name).to(memory_format=torch.channels_last).eval()
        models[name] = fusion.fuse_for_inference(m) if name in zoo else m
    variants = [(n, 'reuse') for n in models] + [(n, 'fresh') for n in models if n in zoo]

    def forward(name, kind):
        fusion.blend = fresh_blend if kind == 'fresh' else reuse_blend
        models[name](x)

    calls = {v: (lambda v=v: forward(*v)) for v in variants}
    try:
        with torch.inference_mode():
            for call in calls.values():  # warm-up
                call()
            times = interleaved_rates(calls, args.batch_size, args.rounds)
    finally:
        fusion.blend = reuse_blend
    base = times[variants[0]]
    print(f'batch {args.batch_size}, {args.img_size}px, 1 thread, CPU clock, {args.rounds} rounds; '
          f'ratio = median over rounds of (model / {args.models[0]}) in the same round')
    for v in variants:
        med = statistics.median(times[v])
        ratio = paired_ratio(times[v], base)
        print(f'{v[0]:22s} {v[1]:6s} {med:8.2f} img/s  {ratio:.3f}x  spread {(max(times[v]) - min(times[v])) / med * 100:.0f}%')
    return 0


if __name__ == '__main__':
    sys.exit(main())
