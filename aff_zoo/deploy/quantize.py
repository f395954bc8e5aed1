"""int8 post-training static quantisation for x86 CPUs through PT2E (torchao's ``prepare_pt2e``/``convert_pt2e``
with the ``X86InductorQuantizer``), compiled with Inductor; accuracy against fp32 on a validation split and
speed against fp32 eager and fp32 compiled, interleaved (``aff-zoo quantize``).

    aff-zoo quantize --model aff_resnet20.cifar10_e12 --data cifar10-train-jpeg.tar.gz --benchmark

What becomes int8: every convolution (the attention's 1x1 convolutions included) and every linear layer (the
attention's global branch and the classifier), with per-channel weight scales and per-tensor activation scales
from calibration. What stays fp32: the sigmoid and the blend ``scale * lerp(y, x, sigmoid(L + g))`` (the
quantiser has no int8 pattern for them, and an 8-bit attention weight in [0, 1] would step by 1/255 of the
blend), the global pooling means, and the normalisations of the global branch.

One graph fix before quantising (``keep_shared_batchnorms``): torchao folds a BatchNorm into the convolution
before it even when that convolution has other readers, which breaks pre-activation networks (their stem).

Needs ``torchao`` (``pip install torchao``): PyTorch 2.14's ``torch.ao.quantization`` no longer has PT2E.
"""
import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .export import export_program

__all__ = ['int8_quantizer', 'quantize_int8', 'compile_model', 'top1', 'calibration_subset', 'QuantResult',
           'quantize_and_measure', 'register_cli']

DEFAULT_CALIBRATION = 512


def _pt2e():
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as e:
        raise RuntimeError('int8 quantisation needs torchao (PT2E moved there from torch.ao): '
                           'pip install "aff-zoo[quantize]" (or pip install torchao)') from e
    return prepare_pt2e, convert_pt2e, xiq


def int8_quantizer():
    """The x86 Inductor quantiser, static int8 everywhere it has a pattern (its default recipe)."""
    _, _, xiq = _pt2e()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    return quantizer


_BATCH_NORMS = ('_native_batch_norm_legit_no_training.default', 'batch_norm.default')


def keep_shared_batchnorms(graph: torch.fx.GraphModule) -> int:
    """Put a ``clone`` between a convolution and a BatchNorm that reads it when the convolution has other readers.

    Why: torchao's conv-BN folding (``_fuse_conv_bn_``) folds every BatchNorm that reads a convolution into it,
    even when the convolution's output has other readers; in a pre-activation network (the CIFAR models) the stem
    convolution feeds both the first block's BatchNorm and its identity shortcut, and the fold hands the shortcut
    BatchNorm-ed values (measured: top-1 81.5 -> 56 on aff_resnet20). The clone keeps that BatchNorm separate
    (fp32; Inductor removes the copy). Returns the number of clones inserted."""
    inserted = 0
    for bn in list(graph.graph.nodes):
        if bn.op != 'call_function' or not any(str(bn.target).endswith(k) for k in _BATCH_NORMS):
            continue
        conv = bn.args[0]
        if (isinstance(conv, torch.fx.Node) and conv.op == 'call_function' and 'conv' in str(conv.target)
                and len(conv.users) > 1):
            with graph.graph.inserting_after(conv):
                copy = graph.graph.call_function(torch.ops.aten.clone.default, (conv,))
            copy.meta['val'] = conv.meta.get('val')  # not the conv's source meta: it would join its partition
            bn.replace_input_with(conv, copy)
            inserted += 1
    graph.recompile()
    return inserted


@torch.no_grad()
def quantize_int8(model: nn.Module, calibration: Iterable[torch.Tensor], example: torch.Tensor) -> torch.fx.GraphModule:
    """Export (dynamic batch) -> insert observers -> run ``calibration`` batches -> int8 graph (quantise /
    dequantise pairs around int8 weights; ``compile_model`` turns them into int8 kernels)."""
    prepare_pt2e, convert_pt2e, _ = _pt2e()
    graph = export_program(model.eval(), example).module()
    keep_shared_batchnorms(graph)
    prepared = prepare_pt2e(graph, int8_quantizer())
    for x in calibration:
        prepared(x)
    return convert_pt2e(prepared)


def compile_model(model: Callable) -> Callable:
    """Inductor with freezing (weights become constants: folded quantisation, prepacked oneDNN weights), the
    x86 int8 recipe; used for the fp32 baseline too, so that the two compiled models differ only in precision.

    Freezing is switched on around each call (compilation happens lazily, at the first call of each shape) rather
    than through ``torch.compile(options=...)``, with which the int8 graph failed to compile here
    (``UnsupportedOperatorException: onednn.qconv_prepack``)."""
    import torch._inductor.config as inductor_config
    compiled = torch.compile(model)

    def run(x: torch.Tensor) -> torch.Tensor:
        with inductor_config.patch(freezing=True):
            return compiled(x)
    return run


def _normalized(images: np.ndarray, mean, std) -> torch.Tensor:
    from ..data.memory import normalize, to_tensor_nchw
    return normalize(to_tensor_nchw(images), mean, std)


@torch.no_grad()
def top1(fn: Callable[[torch.Tensor], torch.Tensor], ds, mean, std, batch_size: int = 250) -> float:
    """Top-1 accuracy (%) of ``fn`` on an ``ImageArrays`` split."""
    correct = 0
    for i in range(0, len(ds), batch_size):
        logits = fn(_normalized(ds.images[i:i + batch_size], mean, std))
        correct += int((logits.argmax(1).numpy() == ds.labels[i:i + batch_size]).sum())
    return 100.0 * correct / max(len(ds), 1)


def calibration_subset(train, n: int, seed: int = 0):
    """``n`` training images drawn at random (fixed seed), in file order."""
    if n > len(train):
        raise ValueError(f'--calibration {n} is more than the {len(train)} training images')
    idx = np.random.default_rng(seed).choice(len(train), n, replace=False)
    return train.subset(np.sort(idx))


@dataclass
class QuantResult:
    model: str
    calibration_images: int
    seconds_to_quantize: float
    val_images: int = 0
    top1_fp32: Optional[float] = None
    top1_int8: Optional[float] = None
    speed: Dict[str, Dict[str, float]] = field(default_factory=dict)  # batch -> {variant: img/s, ratios}

    @property
    def drop(self) -> Optional[float]:
        return None if self.top1_fp32 is None else self.top1_fp32 - self.top1_int8


def _speed(fns: Dict[str, Callable], x: torch.Tensor, rounds: int, min_seconds: float) -> Dict[str, float]:
    """Images/s of each variant (median of interleaved rounds, CPU clock) and the paired ratios of int8."""
    from .benchmark import interleaved_rates, paired_ratio
    with torch.no_grad():
        for fn in fns.values():  # compile and warm up
            fn(x), fn(x)
        t0 = time.process_time()
        fns['fp32 eager'](x)
        reps = max(1, int(min_seconds / max(time.process_time() - t0, 1e-6)))

        def repeated(fn):
            return lambda: [fn(x) for _ in range(reps)]
        rates = interleaved_rates({k: repeated(f) for k, f in fns.items()}, len(x) * reps, rounds)
    out = {f'{k} img/s': float(np.median(v)) for k, v in rates.items()}
    for base in ('fp32 eager', 'fp32 compiled'):
        out[f'int8 / {base}'] = paired_ratio(rates['int8 compiled'], rates[base])
    return out


def quantize_and_measure(
        name: str,
        train=None,
        val=None,
        calibration: int = DEFAULT_CALIBRATION,
        batch_sizes: Sequence[int] = (),
        rounds: int = 5,
        min_seconds: float = 0.3,
        input_size: Optional[int] = None,
        progress: bool = True,
        compiled: bool = True,
) -> QuantResult:
    """Quantise model ``name`` (a timm name with tag; its registered weights when it has some), calibrated on
    ``calibration`` images of ``train`` (random inputs when ``train`` is None: speed only), top-1 of fp32 and
    int8 on ``val``, and speed at each of ``batch_sizes``. ``compiled=False`` measures the uncompiled int8 graph
    (quantise-dequantise in fp32: the same rounding as the int8 kernels, without Inductor's compile time)."""
    if batch_sizes and not compiled:
        raise ValueError('timing needs the compiled int8 model: drop --no-compile or --benchmark')
    import timm
    import aff_zoo  # noqa: F401  registers the models
    torch.manual_seed(0)
    try:
        model = timm.create_model(name, pretrained=True).eval()
    except RuntimeError:  # no weights registered: random weights, for speed only
        model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    size = input_size or cfg['input_size'][-1]
    mean, std = cfg['mean'], cfg['std']
    if train is not None:
        calib = calibration_subset(train, calibration)
        batches = [_normalized(calib.images[i:i + 64], mean, std) for i in range(0, len(calib), 64)]
    else:
        g = torch.Generator().manual_seed(0)
        batches = [torch.randn(min(16, calibration - i), 3, size, size, generator=g) for i in range(0, calibration, 16)]
    if progress:
        print(f'{name}: export, calibrate on {calibration} images, convert ...', file=sys.stderr, flush=True)
    t = time.perf_counter()
    qmodel = quantize_int8(model, batches, batches[0][:2])
    res = QuantResult(name, calibration, round(time.perf_counter() - t, 1))
    int8 = compile_model(qmodel) if compiled else qmodel
    if val is not None:
        res.val_images = len(val)
        res.top1_fp32 = top1(model, val, mean, std)
        res.top1_int8 = top1(int8, val, mean, std)
    if batch_sizes:
        fp32_compiled = compile_model(model)
        fns = {'fp32 eager': model, 'fp32 compiled': fp32_compiled, 'int8 compiled': int8}
        for b in batch_sizes:
            if progress:
                print(f'{name}: timing batch {b} ...', file=sys.stderr, flush=True)
            x = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(b))
            res.speed[str(b)] = _speed(fns, x, rounds, min_seconds)
    return res


# ---------------------------------------------------------------------------------------------------------
# Console command

def _fmt(v, spec='.1f'):
    return '-' if v is None else format(v, spec)


def markdown_table(results: List[QuantResult]) -> str:
    """One row per model and batch size: top-1 fp32 / int8 / drop, img/s of the three variants, int8 speed-ups."""
    lines = ['| model | top-1 fp32 | top-1 int8 | drop (points) | batch | fp32 eager img/s '
             '| fp32 compiled img/s | int8 compiled img/s | int8 vs fp32 eager | int8 vs fp32 compiled |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    for r in results:
        for b, s in (r.speed.items() or [('-', {})]):
            lines.append(
                f'| {r.model} | {_fmt(r.top1_fp32, ".2f")} '
                f'| {_fmt(r.top1_int8, ".2f")} | {_fmt(r.drop, "+.2f")} | {b} '
                f'| {_fmt(s.get("fp32 eager img/s"))} | {_fmt(s.get("fp32 compiled img/s"))} '
                f'| {_fmt(s.get("int8 compiled img/s"))} | {_fmt(s.get("int8 / fp32 eager"), ".2f")}x '
                f'| {_fmt(s.get("int8 / fp32 compiled"), ".2f")}x |')
    return '\n'.join(lines)


def _cpu_line() -> str:
    from ..utils import cpuinfo, machine_line
    from .benchmark import _load_line
    cpu_flags = set(cpuinfo().get('flags', '').split())
    flags = ', int8 instructions: ' + (' '.join(
        k for k in ('amx_int8', 'avx512_vnni', 'avx_vnni', 'avx2') if k in cpu_flags) or 'none of avx2/vnni/amx')
    return f'{machine_line(torch.device("cpu"))}{flags if cpu_flags else ""}; {_load_line()}'


def _cmd_quantize(args) -> int:
    from ..data.memory import DataError, load_images, split_train_val
    if args.threads:
        torch.set_num_threads(args.threads)
    train = val = None
    if args.data:
        try:
            data = load_images(args.data, split='train', progress=not args.quiet)
            train, val = split_train_val(data, args.val_per_class)
        except DataError as e:
            print(f'error: {e}', file=sys.stderr)
            return 2
        if args.val_images:
            val = val.subset(np.random.default_rng(0).choice(len(val), min(args.val_images, len(val)), replace=False))
    batch_sizes = args.batch_sizes if args.benchmark else ()
    results = []
    for name in args.model:
        results.append(quantize_and_measure(name, train, val, args.calibration, batch_sizes, args.rounds,
                                            progress=not args.quiet, compiled=not args.no_compile))
    for name in args.speed_only or ():
        results.append(quantize_and_measure(name, None, None, args.calibration, batch_sizes, args.rounds,
                                            progress=not args.quiet, compiled=not args.no_compile))
    for r in results:
        print(json.dumps(dict(asdict(r), drop=r.drop)))
    if args.benchmark or args.table:
        print(f'\n{_cpu_line()}\n')
        print(markdown_table(results))
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser(
        'quantize', help='int8 post-training quantisation (PT2E, x86 Inductor): top-1 drop and speed-up vs fp32',
        description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', nargs='+', required=True, help='model name(s) with tag, e.g. aff_resnet20.cifar10_e12')
    p.add_argument('--data', help='training images (ImageFolder folder or archive, e.g. cifar10-train-jpeg.tar.gz): '
                                  'calibration from the training part, accuracy on the validation part')
    p.add_argument('--val-per-class', type=int, default=500, help='validation split: last N images per class')
    p.add_argument('--val-images', type=int, help='evaluate on a random subset of this many validation images')
    p.add_argument('--calibration', type=int, default=DEFAULT_CALIBRATION, help='calibration images')
    p.add_argument('--speed-only', nargs='+', metavar='MODEL',
                   help='also time these models (random weights if none are registered; random calibration)')
    p.add_argument('--benchmark', action='store_true',
                   help='also time fp32 eager, fp32 compiled and int8 compiled, interleaved, and print the table')
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 64])
    p.add_argument('--rounds', type=int, default=5, help='interleaved timing rounds')
    p.add_argument('--threads', type=int, help='torch threads (default: torch\'s)')
    p.add_argument('--table', action='store_true', help='print the markdown table (without --benchmark: accuracy only)')
    p.add_argument('--no-compile', action='store_true',
                   help='accuracy of the uncompiled int8 graph (same rounding, no Inductor compile time)')
    p.add_argument('--quiet', action='store_true')
    p.set_defaults(func=_cmd_quantize)
