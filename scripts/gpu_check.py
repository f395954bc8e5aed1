#!/usr/bin/env python
"""The GPU check of issue 11 (run by scripts/gpu_check.sh): does the CUDA path work, and how fast is it?

1. torch.hub: a published tag loaded with ``torch.hub.load(<checkout>, tag, source='local', pretrained=True,
   device='cuda')`` gives the CPU's logits (fp32, TF32 off; relative difference <= 1e-4).
2. Training: 50 AMP steps (bf16 where supported, else fp16 with a GradScaler; channels_last; SGD Nesterov) of
   aff_resnet50 and resnet50d at batch 128, 224 px, and of aff_resnet20 and add_resnet20 at batch 512, 32 px, on
   synthetic data made on the GPU: the loss stays finite, every parameter gets a gradient, images/s.
3. Inference: fp16 weights, channels_last, batch 256, of every ImageNet AFF/iAFF model and its timm peer,
   timed round-robin (one call of each per round, median of the per-round ratios).

Writes ``<out>/gpu_check.md`` (one table of ratios, the device named) and ``<out>/gpu_check.json``; exits 1 if
a check failed. ``--cpu``: the same code on the CPU with tiny sizes and few steps (fp32), for CI.
"""
import argparse
import json
import math
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import timm  # noqa: E402

import aff_zoo  # noqa: E402,F401  (registers the models)
from aff_zoo.deploy.benchmark import interleaved_rates, markdown_table, paired_ratio  # noqa: E402
from aff_zoo.utils import machine_line  # noqa: E402
from aff_zoo.utils import atomic_write_text  # noqa: E402

HUB_TAG = 'aff_resnet20.cifar10_e12'
TRAIN_PAIRS = [('aff_resnet50', 'resnet50d', 224, 128, 1000), ('aff_resnet20', 'add_resnet20', 32, 512, 10)]
INFER_PAIRS = [('aff_resnet50', 'resnet50d'), ('iaff_resnet50', 'resnet50d'),
               ('aff_resnext50', 'resnext50d_32x4d'), ('iaff_resnext50', 'resnext50d_32x4d'),
               ('aff_resnet101', 'resnet101d'), ('iaff_resnet101', 'resnet101d'),
               # no D-stem ResNeXt-101 in timm: the 7x7-stem one is the nearest peer
               ('aff_resnext101', 'resnext101_32x4d'), ('iaff_resnext101', 'resnext101_32x4d')]


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def check_hub(device, tag=HUB_TAG):
    """Logits of the tag loaded through torch.hub on ``device`` against the CPU's."""
    ref = torch.hub.load(ROOT, tag, source='local', pretrained=True).eval()
    model = torch.hub.load(ROOT, tag, source='local', pretrained=True, device=str(device)).eval()
    on = {p.device.type for p in model.parameters()}
    x = torch.randn(16, *ref.pretrained_cfg['input_size'], generator=torch.Generator().manual_seed(0))
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            a, b = model(x.to(device)).float().cpu(), ref(x)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    rel = float((a - b).abs().max() / b.abs().max())
    ok = on == {device.type} and rel <= 1e-4 and bool(torch.equal(a.argmax(1), b.argmax(1)))
    return dict(check='hub', tag=tag, device=str(device), params_on=sorted(on), max_rel_diff=rel, ok=ok)


def amp_dtype(device):
    if device.type != 'cuda':
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def train_steps(name, size, batch, num_classes, steps, device, warmup=5):
    """``steps`` AMP training steps on synthetic GPU data; images/s over the steps after ``warmup``."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=num_classes).to(device).to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    dtype = amp_dtype(device)
    scaler = torch.amp.GradScaler('cuda', enabled=dtype == torch.float16)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device)
    losses, no_grad = [], set()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    t0 = None
    for step in range(steps):
        if step == min(warmup, steps - 1):
            _sync(device)
            t0, timed = time.perf_counter(), steps - step
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if step == 0:
            no_grad = {n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()}
        scaler.step(opt)
        scaler.update()
        losses.append(loss.detach())
    _sync(device)
    seconds = time.perf_counter() - t0
    losses = [float(v) for v in losses]
    amp = str(dtype).replace('torch.', '') if dtype else 'off'
    return dict(model=name, img_size=size, batch=batch, steps=steps, amp=amp,
                train_img_s=timed * batch / seconds, first_loss=losses[0], last_loss=losses[-1],
                finite=all(math.isfinite(v) for v in losses), params_without_grad=sorted(no_grad)[:5],
                peak_mem_gb=torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else None,
                ok=all(math.isfinite(v) for v in losses) and not no_grad)


def inference_rates(pairs, size, batch, rounds, calls, device):
    """Images/s of each model (fp16 + channels_last on CUDA, fp32 on CPU), one timed call per model per round."""
    names = list(dict.fromkeys(n for p in pairs for n in p))
    half = device.type == 'cuda'
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    x = x.half() if half else x
    fns = {}
    for n in names:
        m = timm.create_model(n).eval().to(device).to(memory_format=torch.channels_last)
        m = m.half() if half else m

        def run(m=m):
            with torch.inference_mode():
                for _ in range(calls):
                    m(x)
            _sync(device)
        run()  # warm-up (cuDNN autotuning, allocator)
        fns[n] = run
    rates = interleaved_rates(fns, batch * calls, rounds, clock=time.perf_counter)
    rows = []
    for model, peer in pairs:
        rows.append(dict(check='inference', model=model, peer=peer, img_size=size, batch=batch,
                         dtype='fp16' if half else 'fp32', img_s=sorted(rates[model])[rounds // 2],
                         peer_img_s=sorted(rates[peer])[rounds // 2],
                         ratio=paired_ratio(rates[model], rates[peer]), ok=True))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='gpu_check_out', help='folder for gpu_check.md and gpu_check.json')
    p.add_argument('--cpu', action='store_true', help='tiny sizes on the CPU (CI)')
    p.add_argument('--steps', type=int, default=None, help='training steps per model (default 50; --cpu 3)')
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print('error: no CUDA device; run with --cpu for the CPU fallback', file=sys.stderr)
        return 2
    device = torch.device('cpu' if args.cpu else 'cuda')
    torch.backends.cudnn.benchmark = True
    steps = args.steps or (3 if args.cpu else 50)
    if args.cpu:
        train_pairs = [(a, b, 64 if s == 224 else s, 2 if s == 224 else 8, c) for a, b, s, _, c in TRAIN_PAIRS]
        infer = dict(pairs=INFER_PAIRS[:1], size=64, batch=2, rounds=2, calls=1)
    else:
        train_pairs = TRAIN_PAIRS
        infer = dict(pairs=INFER_PAIRS, size=224, batch=256, rounds=5, calls=4)
    results, t_start = [], time.perf_counter()

    def attempt(what, fn):
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # one failed check must not hide the others
            traceback.print_exc()
            out = [dict(check=what, ok=False, error=f'{type(e).__name__}: {e}')]
        out = out if isinstance(out, list) else [out]
        print(f'{what}: {time.perf_counter() - t0:.1f} s, ' + '; '.join(
            f"{r.get('model', r.get('tag', ''))} ok={r['ok']}" for r in out), flush=True)
        results.extend(out)
        return out

    attempt('hub', lambda: check_hub(device))
    train_rows = {}
    for a, b, size, batch, classes in train_pairs:
        for name in (a, b):
            row = attempt(f'train {name}', lambda n=name: dict(check='train', **train_steps(
                n, size, batch, classes, steps, device)))[0]
            train_rows[name] = row
    attempt('inference', lambda: inference_rates(device=device, **infer))

    table = []
    for a, b, *_ in train_pairs:
        ra, rb = train_rows.get(a, {}), train_rows.get(b, {})
        if 'train_img_s' in ra and 'train_img_s' in rb:
            table.append(dict(measure=f"train, batch {ra['batch']}, {ra['img_size']} px, AMP {ra['amp']}",
                              model=a, peer=b, model_img_s=ra['train_img_s'], peer_img_s=rb['train_img_s'],
                              ratio=ra['train_img_s'] / rb['train_img_s']))
    for r in results:
        if r.get('check') == 'inference' and 'ratio' in r:
            table.append(dict(measure=f"inference, batch {r['batch']}, {r['img_size']} px, {r['dtype']}, "
                                      'channels_last', model=r['model'], peer=r['peer'], model_img_s=r['img_s'],
                              peer_img_s=r['peer_img_s'], ratio=r['ratio']))
    hub = next((r for r in results if r.get('check') == 'hub'), {})
    failed = [r for r in results if not r['ok']]
    md = [f'# GPU check ({"CPU fallback, tiny sizes" if args.cpu else "CUDA"})', '',
          f'Device: {machine_line(device)}. Command: `scripts/gpu_check.sh{" --cpu" if args.cpu else ""}`, '
          f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, {time.perf_counter() - t_start:.0f} s.', '',
          f"torch.hub `{hub.get('tag')}` on {hub.get('device')}: max relative logit difference to the CPU "
          f"{hub.get('max_rel_diff', float('nan')):.2e} ({'ok' if hub.get('ok') else 'FAILED'}).", '',
          'ratio = model images/s / peer images/s (higher is better; training: all steps after 5 warm-up steps, '
          'inference: median of per-round ratios).', '',
          markdown_table(table, ('measure', 'model', 'peer', 'model_img_s', 'peer_img_s', 'ratio')), '',
          f'Checks failed: {len(failed)}' + ''.join(f"\n- {r.get('check')} {r.get('model', '')}: "
                                                   f"{r.get('error') or r}" for r in failed), '']
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, 'gpu_check.md'), '\n'.join(md))
    atomic_write_text(os.path.join(args.out, 'gpu_check.json'), json.dumps(
        dict(device=machine_line(device), cpu_fallback=args.cpu, results=results, table=table), indent=1))
    print('\n'.join(md))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
