#!/usr/bin/env python
"""Where a model's time goes: torch.profiler's table of operators (self CPU time), one thread.

    python scripts/profile_ops.py iaff_resnext50 resnext50d_32x4d --batch-size 16 --img-size 224
    python scripts/profile_ops.py aff_resnet20 add_resnet20 --train --batch-size 128 --img-size 32

Inference: eval mode, our models BN-folded (``fuse_for_inference``), as `aff-zoo benchmark` runs them.
Training: forward + backward + SGD step. channels_last, float32.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import profile  # noqa: E402

import aff_zoo  # noqa: E402
from aff_zoo.layers.fusion import fuse_for_inference  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('models', nargs='+')
    p.add_argument('--train', action='store_true', help='profile training steps instead of inference')
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--steps', type=int, default=2)
    p.add_argument('--rows', type=int, default=15)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    zoo = set(aff_zoo.list_models())
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size).contiguous(memory_format=torch.channels_last)
    for name in args.models:
        model = timm.create_model(name).to(memory_format=torch.channels_last)
        if args.train:
            target = torch.randint(0, model.num_classes, (args.batch_size,))
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def run():
                loss = F.cross_entropy(model(x), target)
                opt.zero_grad()
                loss.backward()
                opt.step()
        else:
            model.eval()
            if name in zoo:
                fuse_for_inference(model)

            def run():
                with torch.inference_mode():
                    model(x)
        run()  # warm-up
        with profile() as prof:
            for _ in range(args.steps):
                run()
        print(f'\n{name}: {"training" if args.train else "inference"}, batch {args.batch_size}, '
              f'{args.img_size}px, {args.steps} steps, 1 thread')
        print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=args.rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())
