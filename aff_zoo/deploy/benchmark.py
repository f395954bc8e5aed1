"""Side-by-side speed benchmark: our models against timm's peers, our fusion modules against the
structure of the existing PyTorch port (``aff-zoo benchmark``; ``scripts/benchmark.py``).

Everything in one table is measured in ONE process, interleaved: each repetition times every
model once, in turn, so load from other processes hits all of them alike; figures are the median
over repetitions with the spread (min-max of the per-repetition throughput, in %). Ratios are to
one chosen baseline row.

The ``Port*`` classes re-implement, from its published description (``aff_pytorch/aff_net/fusion.py``
by @bobo0810, see the paper notes section 1.5), the module structure of the community PyTorch port:
separate local and global ``nn.Sequential`` branches, convolutions with biases, normalisation layers
kept separate (BatchNorm; in the global branch the LayerNorm ours has where the port has BatchNorm), NCHW. They live here, not in the zoo: they exist only to be
timed against, after ``port_from_fusion`` has copied our weights into them so that both compute
the same function (checked before timing). Deviation from the port, so that outputs can match:
iAFF's second stage uses its own global branch (the port's bug, its PR #27) and the output scale
is ours.
"""
import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..utils import atomic_write, atomic_write_text, machine_line, replace_section
from ..models.stats import gmacs as count_gmacs, param_count
from ..layers.fusion import AFF, MSCAM, bottleneck_width, create_fusion, fuse_for_inference, iAFF

__all__ = [
    'PortAFF', 'PortiAFF', 'port_from_fusion', 'benchmark_models', 'benchmark_fusions', 'register_cli', 'main',
]

DEFAULT_IMAGENET = ('resnext50d_32x4d', 'seresnext50_32x4d', 'aff_resnext50', 'iaff_resnext50', 'resnet50d', 'aff_resnet50')
FULL_IMAGENET = (
    'resnet50d', 'resnext50d_32x4d', 'resnext50_32x4d', 'seresnext50_32x4d', 'skresnext50_32x4d', 'resnest50d',
    'aff_resnet50', 'aff_resnext50', 'iaff_resnet50', 'iaff_resnext50')
DEFAULT_CIFAR = ('add_resnet20', 'aff_resnet20', 'iaff_resnet20', 'add_resnet8', 'aff_resnet8')
# (fusion, channels, H=W): the shapes AFF sees in the stages 3-4 of the ImageNet models and in CIFAR ResNet-20.
DEFAULT_FUSION_SHAPES = (('aff', 1024, 14, 16), ('aff', 2048, 7, 16), ('iaff', 1024, 14, 16), ('aff', 64, 8, 4))


# --------------------------------------------------------------------------------------------------
# The port's structure
# --------------------------------------------------------------------------------------------------

def _port_branch(channels: int, hidden: int, pooled: bool) -> nn.Sequential:
    layers: List[nn.Module] = [nn.AdaptiveAvgPool2d(1)] if pooled else []
    # The port has BatchNorm2d(hidden) in the global branch too; ours normalises the pooled hidden units
    # with a LayerNorm (GroupNorm with one group), so the port stand-in does the same to compute our function.
    layers += [
        nn.Conv2d(channels, hidden, 1, bias=True), nn.GroupNorm(1, hidden) if pooled else nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1, bias=True), nn.BatchNorm2d(channels),
    ]
    return nn.Sequential(*layers)


class PortAFF(nn.Module):
    """The port's AFF: ``xa = x + r; wei = sigmoid(local(xa) + global(xa)); s*x*wei + s*r*(1-wei)``."""

    def __init__(self, channels: int, r: int = 4, scale: float = 2.0, hidden: Optional[int] = None):
        super().__init__()
        hidden = hidden or bottleneck_width(channels, r)
        self.local_att = _port_branch(channels, hidden, pooled=False)
        self.global_att = _port_branch(channels, hidden, pooled=True)
        self.sigmoid = nn.Sigmoid()
        self.scale = scale

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        xa = x + residual
        wei = self.sigmoid(self.local_att(xa) + self.global_att(xa))
        return self.scale * x * wei + self.scale * residual * (1 - wei)


class PortiAFF(PortAFF):
    """The port's iAFF (with ``global_att2`` used, as in MXNet), two stages of the same structure."""

    def __init__(self, channels: int, r: int = 4, scale: float = 2.0, hidden: Optional[int] = None):
        super().__init__(channels, r, scale, hidden)
        hidden = self.local_att[0].out_channels
        self.local_att2 = _port_branch(channels, hidden, pooled=False)
        self.global_att2 = _port_branch(channels, hidden, pooled=True)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        xi = super().forward(x, residual)
        wei2 = self.sigmoid(self.local_att2(xi) + self.global_att2(xi))
        return self.scale * x * wei2 + self.scale * residual * (1 - wei2)


def _identity_bn(bn: nn.BatchNorm2d):
    """Make an eval-mode BN the identity (our global branch has none)."""
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)


def _copy_mscam(att: MSCAM, local: nn.Sequential, glob: nn.Sequential):
    assert att.local_att is not None and att.global_att is not None
    la, ga = att.local_att, att.global_att
    local[0].weight.copy_(la.conv1.weight)
    local[0].bias.zero_()
    local[1].load_state_dict(la.bn1.state_dict())
    local[3].weight.copy_(la.conv2.weight)
    local[3].bias.zero_()
    local[4].load_state_dict(la.bn2.state_dict())
    glob[1].weight.copy_(ga.conv1.weight)
    glob[1].bias.zero_()
    glob[2].load_state_dict(ga.norm.state_dict())
    glob[4].weight.copy_(ga.conv2.weight)
    glob[4].bias.copy_(ga.conv2.bias)
    _identity_bn(glob[5])


@torch.no_grad()
def port_from_fusion(fusion: nn.Module) -> nn.Module:
    """A ``PortAFF``/``PortiAFF`` computing, in eval mode, the same function as our (unfused) ``AFF``/``iAFF``."""
    if isinstance(fusion, AFF):
        att = fusion.att
        assert isinstance(att, MSCAM)
        port = PortAFF(att.channels, scale=fusion.scale, hidden=att.local_att.conv1.out_channels)
        _copy_mscam(att, port.local_att, port.global_att)
    elif isinstance(fusion, iAFF):
        c, hidden = fusion.att1.channels, fusion.att1.local_att.conv1.out_channels
        port = PortiAFF(c, scale=fusion.scale, hidden=hidden)
        _copy_mscam(fusion.att1, port.local_att, port.global_att)
        _copy_mscam(fusion.att2, port.local_att2, port.global_att2)
    else:
        raise TypeError(f'port_from_fusion takes an AFF or iAFF module, got {type(fusion).__name__}')
    return port.eval()


# --------------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------------

def _sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


# ``wall``: elapsed time. ``cpu``: CPU seconds of this process (all its threads); on a CPU shared with
# other jobs and with ``--threads 1`` it counts the work done rather than the time spent waiting for a core.
CLOCKS = {'wall': time.perf_counter, 'cpu': time.process_time}
_clock = time.perf_counter


def _time(fn: Callable[[], object], iters: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``iters`` calls, on the chosen clock."""
    _sync(device)
    t0 = _clock()
    for _ in range(iters):
        fn()
    _sync(device)
    return (_clock() - t0) / iters


def _rss_mb() -> float:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    return float('nan')


def _peak_growth_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory growth of one call: CUDA max allocated, or on CPU the RSS high-water mark (VmHWM,
    reset through /proc/self/clear_refs) above the RSS before the call. NaN where unavailable."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        base = _rss_mb()
        fn()
        with open('/proc/self/status') as f:
            hwm = next(int(line.split()[1]) / 1024 for line in f if line.startswith('VmHWM:'))
        return hwm - base
    except (OSError, StopIteration):
        return float('nan')


def _saved_mb(model: nn.Module, x: torch.Tensor) -> float:
    """MB of distinct tensors autograd saves for backward in one training forward: the activation memory
    of a training step, exactly and on any device (RSS growth on a CPU is blurred by the allocator)."""
    seen: Dict[object, int] = {}

    def pack(t: torch.Tensor):
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(seen.values()) / 2 ** 20


def _summary(values: List[float]) -> Dict[str, float]:
    med = statistics.median(values)
    return dict(median=med, spread=(max(values) - min(values)) / med * 100 if med else float('nan'))


def _load_line() -> str:
    try:
        load = os.getloadavg()
        return f'load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores'
    except OSError:
        return 'load average unknown'




# --------------------------------------------------------------------------------------------------
# Model benchmark
# --------------------------------------------------------------------------------------------------

def _prepare(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _autocast(device: torch.device, amp: Optional[str]):
    if not amp:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dict(bf16=torch.bfloat16, fp16=torch.float16)[amp])


def benchmark_models(
        names: Sequence[str],
        batch_size: int = 16,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        device: str = 'cpu',
        amp: Optional[str] = None,
        channels_last: bool = True,
        compile: bool = False,
        fuse: bool = True,
        repeats: int = 5,
        iters: int = 2,
        latency_iters: int = 5,
        train: bool = True,
        train_batch_size: Optional[int] = None,
        warmup: int = 2,
        grad_checkpointing: bool = False,
        progress: bool = True,
) -> List[Dict[str, object]]:
    """Time every model in ``names`` side by side; one result dict per model (figures: medians over ``repeats``).

    ``fuse`` folds the BatchNorms of our MS-CAMs into their convolutions for the inference figures
    (``fuse_for_inference``); timm's peers run as timm builds them. Training is timed on the unfused model.
    """
    import timm
    from .. import models as _  # noqa: F401  (registers the zoo)
    dev = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    train_bs = train_batch_size or batch_size
    x = torch.randn(batch_size, in_chans, img_size, img_size, device=dev).contiguous(memory_format=fmt)
    x1 = x[:1].contiguous(memory_format=fmt)
    xt = torch.randn(train_bs, in_chans, img_size, img_size, device=dev).contiguous(memory_format=fmt)
    target = torch.randint(0, num_classes, (train_bs,), device=dev)

    rows, infer_fns, lat_fns, train_fns = [], [], [], []
    for name in names:
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=num_classes, in_chans=in_chans)
        model = _prepare(model, dev, channels_last)
        n_params = param_count(model)
        if grad_checkpointing:
            model.set_grad_checkpointing(True)
        ours = name in _zoo_names()
        eval_model = timm.create_model(name, num_classes=num_classes, in_chans=in_chans)
        eval_model.load_state_dict(model.state_dict())
        eval_model = _prepare(eval_model, dev, channels_last).eval()
        if fuse and ours:
            fuse_for_inference(eval_model)
        gmacs = count_gmacs(eval_model, x.shape[1:])  # per image
        run_eval = torch.compile(eval_model) if compile else eval_model
        run_train = torch.compile(model) if compile else model
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()

        def infer(m=run_eval, inp=x):
            with torch.inference_mode(), _autocast(dev, amp):
                return m(inp)

        def latency(m=run_eval):
            with torch.inference_mode(), _autocast(dev, amp):
                return m(x1)

        def step(m=run_train, model=model, opt=opt):
            model.train()
            opt.zero_grad(set_to_none=True)
            with _autocast(dev, amp):
                loss = loss_fn(m(xt), target)
            loss.backward()
            opt.step()

        for _ in range(warmup):
            infer(), latency()
            if train:
                step()
        row = dict(model=name, params_m=n_params / 1e6, gmacs=gmacs)
        row['infer_mem_mb'] = _peak_growth_mb(infer, dev)
        if train:
            row['train_mem_mb'] = _peak_growth_mb(step, dev)
            model.train()
            with _autocast(dev, amp):
                row['saved_mb'] = _saved_mb(run_train, xt)
        rows.append(row)
        infer_fns.append(infer), lat_fns.append(latency), train_fns.append(step)

    infer_t: List[List[float]] = [[] for _ in names]
    lat_t: List[List[float]] = [[] for _ in names]
    train_t: List[List[float]] = [[] for _ in names]
    rounds = range(repeats)
    if progress:
        from tqdm import tqdm
        rounds = tqdm(rounds, desc='benchmark rounds', file=sys.stderr)
    for _ in rounds:
        for i in range(len(names)):  # interleaved: every model once per round
            infer_t[i].append(batch_size / _time(infer_fns[i], iters, dev))
            for _ in range(latency_iters):
                lat_t[i].append(_time(lat_fns[i], 1, dev) * 1e3)
            if train:
                train_t[i].append(train_bs / _time(train_fns[i], iters, dev))
    for i, row in enumerate(rows):
        s = _summary(infer_t[i])
        row['infer_img_s'], row['infer_spread_pct'] = s['median'], s['spread']
        row['infer_rounds'] = infer_t[i]
        lat = sorted(lat_t[i])
        row['latency_ms_median'] = statistics.median(lat)
        row['latency_ms_p90'] = lat[min(len(lat) - 1, math.ceil(0.9 * len(lat)) - 1)]
        if train:
            s = _summary(train_t[i])
            row['train_img_s'], row['train_spread_pct'] = s['median'], s['spread']
            row['train_rounds'] = train_t[i]
    return rows


def _zoo_names() -> List[str]:
    from ..models import list_models
    return list_models()


def paired_ratio(values: Sequence[float], base: Sequence[float]) -> float:
    """Median over rounds of the ratio within each round, ``values[i] / base[i]``."""
    return statistics.median(a / b for a, b in zip(values, base))


def interleaved_rates(fns: Dict[Any, Callable[[], object]], items: int, rounds: int,
                      clock: Callable[[], float] = time.process_time) -> Dict[Any, List[float]]:
    """Items per second of every ``fns[k]()`` call (which handles ``items`` items), one call of each per
    round, in turn, for ``rounds`` rounds: the raw rounds for ``paired_ratio``. CPU clock by default."""
    rates: Dict[Any, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            rates[k].append(items / (clock() - t0))
    return rates


def add_ratios(rows: List[Dict[str, object]], baseline: str, keys: Sequence[str], ratio_name: str = 'x'):
    """Add ``<key>_x`` = row/baseline for each throughput key (higher is better).

    Where per-round figures exist (``<prefix>_rounds``, e.g. ``infer_rounds`` for ``infer_img_s``), the
    ratio is the median over rounds of the ratio within each round: a round times every model within
    seconds of each other, so load that comes and goes cancels in the pair, where the ratio of two
    medians would mix rounds of different load. Also adds ``gmacs_bound_x`` = baseline GMACs / row GMACs,
    the ratio a model would reach if every multiply-add ran at the baseline's speed.
    """
    base = next((r for r in rows if r.get('model') == baseline or r.get('name') == baseline), None)
    if base is None:
        raise ValueError(f'baseline {baseline!r} is not among the rows: {[r.get("model", r.get("name")) for r in rows]}')
    for r in rows:
        for k in keys:
            if k in r and k in base:
                rounds = k.split('_')[0] + '_rounds'
                if rounds in r and rounds in base and len(r[rounds]) == len(base[rounds]):
                    r[f'{k}_{ratio_name}'] = paired_ratio(r[rounds], base[rounds])
                else:
                    r[f'{k}_{ratio_name}'] = r[k] / base[k]
        if r.get('gmacs') and base.get('gmacs'):
            r[f'gmacs_bound_{ratio_name}'] = base['gmacs'] / r['gmacs']
    return rows


# --------------------------------------------------------------------------------------------------
# Fusion-module benchmark: ours against the port's structure
# --------------------------------------------------------------------------------------------------

def benchmark_fusions(
        shapes: Sequence = DEFAULT_FUSION_SHAPES,
        batch_size: int = 16,
        device: str = 'cpu',
        repeats: int = 7,
        iters: int = 5,
        warmup: int = 3,
        atol: float = 1e-5,
        progress: bool = True,
) -> List[Dict[str, object]]:
    """Eval-mode AFF/iAFF: ours (BN folded, channels_last) against the port's structure (NCHW, as it is
    published, and channels_last, to separate structure from memory format), given the same weights.

    Before timing, asserts that all variants agree to ``atol`` (relative to the output's scale).
    """
    dev = torch.device(device)
    cases = []
    for fusion, channels, hw, r in shapes:
        torch.manual_seed(0)
        ours = create_fusion(fusion, channels, r=r)
        for m in ours.modules():  # non-trivial BN statistics and biases, so the check means something
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.5), nn.init.normal_(m.bias, std=0.2)
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2.0)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                nn.init.normal_(m.bias, std=0.2)
        ours.eval()
        port = port_from_fusion(ours).to(dev)
        port_cl = port_from_fusion(ours).to(dev).to(memory_format=torch.channels_last)
        unfused = create_fusion(fusion, channels, r=r)
        unfused.load_state_dict(ours.state_dict())
        unfused = unfused.eval().to(dev).to(memory_format=torch.channels_last)
        fused = fuse_for_inference(ours.to(dev).to(memory_format=torch.channels_last))
        x = torch.randn(batch_size, channels, hw, hw, device=dev)
        y = torch.randn(batch_size, channels, hw, hw, device=dev)
        xc, yc = x.contiguous(memory_format=torch.channels_last), y.contiguous(memory_format=torch.channels_last)
        variants = {
            'port (NCHW)': (port, x, y),
            'port (channels_last)': (port_cl, xc, yc),
            'ours unfused (channels_last)': (unfused, xc, yc),
            'ours fused (channels_last)': (fused, xc, yc),
        }
        with torch.inference_mode():
            ref = port(x, y)
            for label, (m, a, b) in variants.items():
                err = (m(a, b) - ref).abs().max().item() / max(ref.abs().max().item(), 1.0)
                if err > atol:
                    raise AssertionError(f'{fusion} C={channels}: {label} differs from the port by {err:.2e} > {atol}')
        cases.append((f'{fusion} C={channels} {hw}x{hw} r={r}', variants))

    times = {(c, v): [] for c, vs in cases for v in vs}
    n_calls = {}  # calls per timing: enough for ~50 ms, so that small modules are not timed at clock resolution
    for case, variants in cases:
        for label, (m, a, b) in variants.items():
            with torch.inference_mode():
                for _ in range(warmup):
                    m(a, b)
                once = _time(lambda: m(a, b), 1, dev)
            n_calls[(case, label)] = max(iters, min(200, math.ceil(0.05 / max(once, 1e-6))))
    rounds = range(repeats)
    if progress:
        from tqdm import tqdm
        rounds = tqdm(rounds, desc='fusion rounds', file=sys.stderr)
    for _ in rounds:
        for case, variants in cases:
            for label, (m, a, b) in variants.items():
                def call(m=m, a=a, b=b):
                    with torch.inference_mode():
                        return m(a, b)
                times[(case, label)].append(_time(call, n_calls[(case, label)], dev) * 1e3)
    rows = []
    for case, variants in cases:
        base = statistics.median(times[(case, 'port (NCHW)')])
        for label in variants:
            t = times[(case, label)]
            med = statistics.median(t)
            rows.append(dict(case=case, name=label, ms_median=med, spread_pct=(max(t) - min(t)) / med * 100,
                             speedup_vs_port=base / med))
    return rows


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return '-'
        return f'{v:.3f}' if abs(v) < 10 else f'{v:.1f}'
    return str(v)


def markdown_table(rows: List[Dict[str, object]], columns: Sequence[str]) -> str:
    cols = [c for c in columns if any(c in r for r in rows)]
    lines = ['| ' + ' | '.join(cols) + ' |', '|' + '|'.join('---' for _ in cols) + '|']
    lines += ['| ' + ' | '.join(_fmt(r.get(c, float('nan'))) for c in cols) + ' |' for r in rows]
    return '\n'.join(lines)


MODEL_COLUMNS = (
    'model', 'params_m', 'gmacs', 'gmacs_bound_x', 'infer_img_s', 'infer_spread_pct', 'infer_img_s_x', 'latency_ms_median',
    'latency_ms_p90', 'train_img_s', 'train_spread_pct', 'train_img_s_x', 'infer_mem_mb', 'train_mem_mb', 'saved_mb')
FUSION_COLUMNS = ('case', 'name', 'ms_median', 'spread_pct', 'speedup_vs_port')


def _write(rows: List[Dict[str, object]], path_stem: str, meta: Dict[str, object]):
    os.makedirs(os.path.dirname(os.path.abspath(path_stem)), exist_ok=True)
    atomic_write_text(path_stem + '.json', json.dumps(dict(meta=meta, rows=rows), indent=1))
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def write_csv(tmp):
        with open(tmp, 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    atomic_write(path_stem + '.csv', write_csv)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser):
    p.add_argument('--suite', nargs='+', default=['fusion', 'imagenet', 'cifar'],
                   choices=['fusion', 'imagenet', 'cifar'],
                   help='which tables: fusion (modules vs the port), imagenet (models vs timm peers), cifar')
    p.add_argument('--imagenet-models', nargs='+', default=list(DEFAULT_IMAGENET),
                   help=f'ImageNet-size models (timm names; full peer list: {" ".join(FULL_IMAGENET)})')
    p.add_argument('--imagenet-baseline', default='resnext50d_32x4d')
    p.add_argument('--cifar-models', nargs='+', default=list(DEFAULT_CIFAR))
    p.add_argument('--cifar-baseline', default='add_resnet20')
    p.add_argument('--batch-size', type=int, default=8, help='ImageNet inference batch (the goals use 16)')
    p.add_argument('--img-size', type=int, default=160, help='ImageNet resolution (the goals use 224)')
    p.add_argument('--train-batch-size', type=int, default=None, help='ImageNet training batch (default: --batch-size)')
    p.add_argument('--imagenet-train', action='store_true',
                   help='also time the ImageNet training step (slow on a CPU: off by default)')
    p.add_argument('--cifar-batch-size', type=int, default=128)
    p.add_argument('--fusion-batch-size', type=int, default=16)
    p.add_argument('--device', default='cpu')
    p.add_argument('--amp', choices=['bf16', 'fp16'], default=None, help='autocast dtype (default: float32)')
    p.add_argument('--no-channels-last', action='store_true')
    p.add_argument('--compile', action='store_true', help='torch.compile every model')
    p.add_argument('--grad-checkpointing', action='store_true',
                   help='train with gradient checkpointing (timm set_grad_checkpointing): less memory, more time')
    p.add_argument('--no-fuse', action='store_true', help="don't fold MS-CAM BatchNorms for inference")
    p.add_argument('--threads', type=int, default=None,
                   help='torch threads (on a loaded shared CPU, 1 thread gives steadier figures)')
    p.add_argument('--clock', choices=list(CLOCKS), default='wall',
                   help='wall time, or CPU time of this process (steadier on a shared CPU with --threads 1)')
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--iters', type=int, default=2, help='timed calls per model per repetition')
    p.add_argument('--out', default='benchmark', help='output path stem: writes <out>-<suite>.json/.csv/.md')
    p.add_argument('--doc', '--readme', dest='readme', default=None, metavar='PAGE',
                   help='also write each table into this page (docs/speed.md), between '
                        '<!-- speed-<suite><suffix>:start/end --> markers')
    p.add_argument('--doc-suffix', '--readme-suffix', dest='readme_suffix', default='',
                   help='suffix of the page\'s section names (e.g. -full)')


def _command(args) -> str:
    """The ``aff-zoo benchmark`` command line that reproduces ``args`` (options that differ from the defaults)."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    defaults = vars(p.parse_args([]))
    parts = ['aff-zoo benchmark']
    for action in p._actions:
        key = action.dest
        if key == 'help' or getattr(args, key, None) == defaults.get(key) or key in ('readme', 'readme_suffix', 'out'):
            continue
        value = getattr(args, key)
        flag = action.option_strings[0]
        if isinstance(value, bool):
            parts.append(flag)
        else:
            parts += [flag, *map(str, value if isinstance(value, list) else [value])]
    return ' '.join(parts)


def run(args) -> int:
    global _clock
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == 'cpu' and args.device != 'cpu':
        raise ValueError('--clock cpu only makes sense with --device cpu')
    _clock = CLOCKS[args.clock]
    dev = torch.device(args.device)
    meta = dict(machine=machine_line(dev), load_before=_load_line(), command=_command(args), device=args.device,
                amp=args.amp or 'fp32', channels_last=not args.no_channels_last, compile=args.compile,
                fuse=not args.no_fuse, threads=torch.get_num_threads(), clock=args.clock)
    print(f'# {meta["machine"]}\n# {meta["load_before"]}', flush=True)
    common = dict(device=args.device, amp=args.amp, channels_last=not args.no_channels_last, compile=args.compile,
                  fuse=not args.no_fuse, repeats=args.repeats, iters=args.iters,
                  grad_checkpointing=args.grad_checkpointing)
    for models, baseline, suite in ((args.imagenet_models, args.imagenet_baseline, 'imagenet'),
                                    (args.cifar_models, args.cifar_baseline, 'cifar')):
        if suite in args.suite and baseline not in models:
            raise ValueError(f'--{suite}-baseline {baseline!r} is not in --{suite}-models {models}; add it or pick one')
    for suite in args.suite:
        if suite == 'fusion':
            rows = benchmark_fusions(batch_size=args.fusion_batch_size, device=args.device, repeats=args.repeats)
            cols, title = FUSION_COLUMNS, (
                f'Fusion modules, eval, batch {args.fusion_batch_size}, fp32: ours vs the port\'s structure '
                f'(same weights, outputs checked equal)')
        elif suite == 'imagenet':
            rows = benchmark_models(args.imagenet_models, batch_size=args.batch_size, img_size=args.img_size,
                                    train=args.imagenet_train, train_batch_size=args.train_batch_size, **common)
            add_ratios(rows, args.imagenet_baseline, ('infer_img_s', 'train_img_s'))
            cols, title = MODEL_COLUMNS, (
                f'ImageNet-size, batch {args.batch_size}, {args.img_size}x{args.img_size}, ratios (_x) to '
                f'{args.imagenet_baseline}')
        else:
            rows = benchmark_models(args.cifar_models, batch_size=args.cifar_batch_size, img_size=32,
                                    num_classes=10, **common)
            add_ratios(rows, args.cifar_baseline, ('infer_img_s', 'train_img_s'))
            cols, title = MODEL_COLUMNS, (
                f'CIFAR-size, batch {args.cifar_batch_size}, 32x32, ratios (_x) to {args.cifar_baseline}')
        meta_s = dict(meta, suite=suite, title=title, load_after=_load_line())
        _write(rows, f'{args.out}-{suite}', meta_s)
        table = markdown_table(rows, cols)
        text = (f'{title}. {meta_s["amp"]}, channels_last={meta_s["channels_last"]}, compile={args.compile}, '
                f'clock={args.clock}, {args.repeats} repetitions. Machine: {meta["machine"]}; '
                f'{meta_s["load_before"]} before, {meta_s["load_after"]} after.\n\n{table}\n')
        with open(f'{args.out}-{suite}.md', 'w') as f:
            f.write(text)
        if args.readme:
            with open(args.readme) as f:
                readme = f.read()
            readme = replace_section(readme, f'speed-{suite}{args.readme_suffix}', f'Command: `{_command(args)}`\n\n{text}')
            atomic_write_text(args.readme, readme)
        print(f'\n## {title}\n{table}\n# {meta_s["load_after"]}', flush=True)
    return 0


def register_cli(subparsers):
    p = subparsers.add_parser('benchmark', help='speed: our models vs timm peers, our AFF vs the port',
                              description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog='benchmark', description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))
