#!/usr/bin/env python
"""Would one fused kernel for the training blend help? Our sigmoid-and-blend (custom autograd Function,
eager ops) against the same formula compiled by torch.compile (inductor writes one fused C++ loop for the
forward and one for the backward), forward + backward at CIFAR ResNet-20 stage-1 size, checked equal first.

    python scripts/ab_compiled_blend.py --shape 128 16 32 32 --step-models add_resnet20 aff_resnet20 iaff_resnet20

Needs a C++ compiler (inductor on CPU). Prints milliseconds per forward+backward (median of 5 rounds,
CPU time of this process, one thread); with ``--step-models``, also whole training steps (batch 128,
SGD) of those models with the eager and the compiled blend, interleaved, as ratios to the first model.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import aff_zoo.layers.fusion as fusion  # noqa: E402
from aff_zoo.deploy.benchmark import interleaved_rates, paired_ratio  # noqa: E402
from aff_zoo.layers.fusion import _SigmoidBlend  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--shape', type=int, nargs=4, default=[128, 16, 32, 32])
    p.add_argument('--scale', type=float, default=2.0)
    p.add_argument('--calls', type=int, default=20, help='forward+backward calls per round')
    p.add_argument('--step-models', nargs='*', default=[], help='also time training steps (first = baseline)')
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    scale = args.scale

    # the formula of ``_SigmoidBlend``, compiled once: here and, with --step-models, inside the networks
    compiled = torch.compile(lambda x, y, logits, s: torch.lerp(y, x, torch.sigmoid(logits)) * s)
    variants = {'ours (eager, custom backward)': lambda x, y, l: _SigmoidBlend.apply(x, y, l, scale),
                'torch.compile (fused kernels)': lambda x, y, l: compiled(x, y, l, scale)}
    x, y, l = (torch.randn(args.shape).contiguous(memory_format=torch.channels_last).requires_grad_() for _ in range(3))
    g = torch.randn(args.shape).contiguous(memory_format=torch.channels_last)

    def run(f):
        x.grad = y.grad = l.grad = None
        f(x, y, l).backward(g)
        return [t.grad for t in (x, y, l)]

    ref = run(variants['ours (eager, custom backward)'])
    for name, f in variants.items():
        for a, b in zip(run(f), ref):  # also compiles
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    def calls(f):
        for _ in range(args.calls):
            run(f)

    rates = interleaved_rates({name: (lambda f=f: calls(f)) for name, f in variants.items()}, args.calls, 5)
    times = {name: [1e3 / r for r in rs] for name, rs in rates.items()}  # ms per forward+backward
    print(f'shape {args.shape}, scale {scale}, forward+backward, 1 thread, CPU clock, median of 5 rounds')
    for name, t in times.items():
        print(f'{name:32s} {statistics.median(t):7.2f} ms  (rounds {", ".join(f"{v:.2f}" for v in t)})')
    if args.step_models:
        step_ab(args.step_models, compiled)
    return 0


def step_ab(names, compiled, rounds: int = 5, batch_size: int = 128):
    """Training steps with the eager (``_sigmoid_blend_autograd``) and the compiled blend swapped in."""
    eager = fusion._sigmoid_blend_autograd
    x = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (batch_size,))
    variants = [(n, 'eager') for n in names] + [(n, 'compiled') for n in names[1:]]
    steps = {}
    for name, kind in variants:
        torch.manual_seed(0)
        model = timm.create_model(name).to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def step(model=model, opt=opt, blend=compiled if kind == 'compiled' else eager):
            fusion._sigmoid_blend_autograd = blend
            loss = F.cross_entropy(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        step(), step()  # warm-up (and compilation)
        steps[(name, kind)] = lambda step=step: (step(), step())
    try:
        times = interleaved_rates(steps, 2 * batch_size, rounds)
    finally:
        fusion._sigmoid_blend_autograd = eager
    print(f'training step, batch {batch_size}, 1 thread, CPU clock, {rounds} rounds; ratio = median over rounds '
          f'of (model / {names[0]}) in the same round')
    for v in variants:
        ratio = paired_ratio(times[v], times[variants[0]])
        print(f'{v[0]:16s} {v[1]:9s} {statistics.median(times[v]):7.1f} img/s  {ratio:.3f}x')


if __name__ == '__main__':
    sys.exit(main())
