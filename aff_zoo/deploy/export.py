"""Deployment formats: TorchScript (``torch.jit.script``), ONNX and a ``torch.export`` program (``.pt2``), each
with a dynamic batch size and checked against the eager model on the same input (onnxruntime for ONNX,
``torch.export.load`` for ``.pt2``) before it is reported as written.

    aff-zoo convert --model aff_resnet20 --pretrained --format all --output exported/

Files are written atomically (temporary file, then ``os.replace``), so an interrupted export never
leaves a half-written model behind.
"""
import argparse
import contextlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..utils import atomic_write

__all__ = [
    'ExportResult', 'export_torchscript', 'export_onnx', 'export_program', 'save_exported', 'check_torchscript',
    'check_onnx', 'check_exported', 'convert', 'register_cli']

FORMATS = ('onnx', 'torchscript', 'exported')
SUFFIXES = {'onnx': '.onnx', 'torchscript': '.torchscript.pt', 'exported': '.pt2'}
MAX_BATCH = 4096
ONNX_INPUT, ONNX_OUTPUT = 'input', 'logits'


@dataclass
class ExportResult:
    """One written file and how closely it reproduces the eager model."""
    model: str
    format: str
    path: str
    max_abs_diff: float
    max_abs_output: float
    seconds: float


def _example_input(model: nn.Module, input_size: Optional[Sequence[int]], batch: int = 2, seed: int = 0):
    if input_size is None:
        input_size = model.pretrained_cfg['input_size']
    if len(input_size) == 3:
        input_size = input_size[1:]
    input_size = (getattr(model, 'in_chans', 3), *input_size)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_size, generator=g)


@contextlib.contextmanager
def _quiet_jit():
    """TorchScript still works, but every jit call warns that it is deprecated; the README says it once."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message=r'.*torch\.jit\.\w+` is deprecated', category=FutureWarning)
        yield


def script(model: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script``, safe from a PyTorch bug that failed one CI run: its builtin table is keyed by the
    ``id()`` of functions it does not keep alive (op packets that ``torch.ops`` refreshes), so a module's data
    attribute born at a freed address (Conv2d's ``_reversed_padding_repeated_twice``) is taken for an op, and
    scripting fails with "builtin cannot be used as a value". An entry at the id of a live non-callable
    attribute can only be such a stale one, so it is dropped first."""
    table = torch.jit._builtins._get_builtin_table()
    for m in model.modules():
        for v in vars(m).values():
            if not callable(v) and id(v) in table:
                del table[id(v)]
    with _quiet_jit():
        return torch.jit.script(model)


def export_torchscript(model: nn.Module, path) -> Path:
    """``torch.jit.script`` the eval-mode model and save it to ``path``."""
    path = Path(path)
    model = model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    scripted = script(model)
    atomic_write(str(path), lambda tmp: torch.jit.save(scripted, tmp))
    return path


def batch_dynamic_shapes():
    """``dynamic_shapes`` for ``model(x)`` with a dynamic batch dimension (spatial size and channels fixed)."""
    return ({0: torch.export.Dim('batch', min=1, max=MAX_BATCH)},)


def export_program(model: nn.Module, x: torch.Tensor, strict: bool = False) -> 'torch.export.ExportedProgram':
    """``torch.export.export`` of the eval-mode model at ``x``'s shape with a dynamic batch dimension.

    ``strict=False`` (export's own default since 2.7) traces with Python itself instead of TorchDynamo: about
    as exact here and faster; the programs are the same ATen graph either way."""
    return torch.export.export(model.eval(), (x,), dynamic_shapes=batch_dynamic_shapes(), strict=strict)


def save_exported(model: nn.Module, path, input_size: Optional[Sequence[int]] = None) -> Path:
    """Export (``export_program``) and ``torch.export.save`` to ``path`` (a ``.pt2`` file; ``torch.export.load``
    reads it back, and AOTInductor and ExecuTorch start from it)."""
    path = Path(path)
    program = export_program(model, _example_input(model, input_size))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(str(path), lambda tmp: torch.export.save(program, tmp))
    return path


def export_onnx(
        model: nn.Module,
        path,
        input_size: Optional[Sequence[int]] = None,
        opset: int = 18,
        exporter: str = 'dynamo',
) -> Path:
    """Export the eval-mode model to ONNX, batch dimension dynamic, input ``input`` and output ``logits``.

    ``exporter='dynamo'`` is PyTorch's current exporter (``torch.export``); ``'legacy'`` is the older
    TorchScript-tracing one, about ten times faster here and equally exact for these models.
    """
    if exporter not in ('dynamo', 'legacy'):
        raise ValueError(f"exporter must be 'dynamo' or 'legacy', got {exporter!r}")
    path = Path(path)
    model = model.eval()
    x = _example_input(model, input_size)
    if exporter == 'dynamo':
        kwargs = dict(dynamo=True, external_data=False,
                      dynamic_shapes=batch_dynamic_shapes())
    else:
        kwargs = dict(dynamo=False, dynamic_axes={ONNX_INPUT: {0: 'batch'}, ONNX_OUTPUT: {0: 'batch'}})
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        with warnings.catch_warnings():
            # the legacy exporter traces: the input checks become constants for the exported shape (fine)
            warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
            warnings.filterwarnings('ignore', message='.*legacy TorchScript-based ONNX export', category=DeprecationWarning)
            torch.onnx.export(
                model, (x,), tmp, input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                opset_version=opset, verbose=False, **kwargs)
    atomic_write(str(path), write)
    return path


@torch.no_grad()
def _parity(model: nn.Module, run, input_size, batch_sizes: Sequence[int]) -> Tuple[float, float]:
    """(max |run(x) - eager(x)|, max |eager(x)|) over one input per batch size; a shape change is an error."""
    diff = scale = 0.0
    for i, b in enumerate(batch_sizes):
        x = _example_input(model, input_size, batch=b, seed=i + 1)
        ref = model.eval()(x)
        out = run(x)
        if out.shape != ref.shape:
            raise RuntimeError(f'exported output shape {tuple(out.shape)} differs from eager {tuple(ref.shape)}')
        diff = max(diff, (out - ref).abs().max().item())
        scale = max(scale, ref.abs().max().item())
    return diff, scale


def check_torchscript(model: nn.Module, path, input_size=None, batch_sizes: Sequence[int] = (1, 3)) -> Tuple[float, float]:
    """(max |scripted - eager|, max |eager|) over inputs of each batch size."""
    with _quiet_jit():
        loaded = torch.jit.load(str(path), map_location='cpu').eval()
    return _parity(model, loaded, input_size, batch_sizes)


def check_onnx(model: nn.Module, path, input_size=None, batch_sizes: Sequence[int] = (1, 3)) -> Tuple[float, float]:
    """(max |onnxruntime - eager|, max |eager|) over inputs of each batch size (proves the batch is dynamic)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RuntimeError('The ONNX check needs onnxruntime: pip install onnxruntime (or pass --no-check).') from e
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return _parity(model, lambda x: torch.from_numpy(sess.run([ONNX_OUTPUT], {ONNX_INPUT: x.numpy()})[0]),
                   input_size, batch_sizes)


def check_exported(model: nn.Module, path, input_size=None, batch_sizes: Sequence[int] = (1, 3)) -> Tuple[float, float]:
    """(max |loaded program - eager|, max |eager|) over inputs of each batch size (proves the batch is dynamic)."""
    return _parity(model, torch.export.load(str(path)).module(), input_size, batch_sizes)


def convert(
        model: nn.Module,
        out_dir,
        name: str,
        formats: Sequence[str] = FORMATS,
        input_size: Optional[Sequence[int]] = None,
        opset: int = 18,
        exporter: str = 'dynamo',
        check: bool = True,
        atol: float = 1e-4,
) -> List[ExportResult]:
    """Write ``out_dir/<name>.onnx``, ``<name>.torchscript.pt`` and/or ``<name>.pt2``; check each against ``model``.

    Raises ``RuntimeError`` when a written file differs from the eager model by more than ``atol``.
    """
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f'Unknown format(s) {bad}; choose from {", ".join(FORMATS)}')
    model = model.eval()
    results = []
    for fmt in formats:
        t = time.perf_counter()
        path = Path(out_dir) / f'{name}{SUFFIXES[fmt]}'
        if fmt == 'onnx':
            export_onnx(model, path, input_size, opset, exporter)
        elif fmt == 'exported':
            save_exported(model, path, input_size)
        else:
            export_torchscript(model, path)
        checker = {'onnx': check_onnx, 'torchscript': check_torchscript, 'exported': check_exported}[fmt]
        diff, scale = checker(model, path, input_size) if check else (float('nan'), float('nan'))
        results.append(ExportResult(name, fmt, str(path), diff, scale, time.perf_counter() - t))
        if check and not diff <= atol:
            raise RuntimeError(
                f'{fmt} export of {name} differs from the eager model by {diff:.3g} (> {atol:g}; largest output '
                f'{scale:.3g}). Untrained networks can have huge activations (BatchNorm statistics never '
                f'estimated) that amplify rounding: export trained weights, or raise --atol.')
    return results


# ---------------------------------------------------------------------------------------------------------
# Console command


def _models_for(pattern: str) -> List[str]:
    import aff_zoo
    if any(c in pattern for c in '*?['):
        names = aff_zoo.list_models(pattern)
        if not names:
            raise ValueError(f'No aff_zoo model matches {pattern!r}; see `aff-zoo list`.')
        return names
    return [pattern]


def _load(name: str, args) -> nn.Module:
    import timm
    import aff_zoo  # noqa: F401  registers the models
    kwargs = {}
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    if args.in_chans is not None:
        kwargs['in_chans'] = args.in_chans
    model = timm.create_model(name, pretrained=args.pretrained, **kwargs)
    if args.checkpoint:
        from ..models.pretrained import load_safetensors
        load_safetensors(model, args.checkpoint)
    return model


def _cmd_convert(args) -> int:
    formats = {'both': ('onnx', 'torchscript'), 'all': FORMATS}.get(args.format, (args.format,))
    input_size = tuple(args.input_size) if args.input_size else None
    failed = 0
    for name in _models_for(args.model):
        model = _load(name, args)
        file_name = name.split(':', 1)[-1].rstrip('/').replace('/', '_') if ':' in name else name
        try:
            results = convert(model, args.output, file_name, formats, input_size, args.opset, args.exporter,
                              check=not args.no_check, atol=args.atol)
        except RuntimeError as e:
            print(f'FAILED {name}: {e}')
            failed += 1
            continue
        for r in results:
            print(f'{r.model:24s} {r.format:12s} max|diff| {r.max_abs_diff:.2e} (max|out| {r.max_abs_output:.2e}) '
                  f'{r.seconds:6.1f}s  {r.path}')
    return 1 if failed else 0


def register_cli(sub) -> None:
    p = sub.add_parser(
        'convert', help='export models to ONNX / TorchScript / torch.export (.pt2), checked against the eager model',
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', required=True,
                   help="model name (or wildcard such as 'aff_*', or local-dir:<checkpoint folder>, hf-hub:<repo>)")
    p.add_argument('--format', choices=(*FORMATS, 'both', 'all'), default='both',
                   help="'both': onnx and torchscript; 'all': also exported (a torch.export .pt2 program)")
    p.add_argument('--output', default='exported', help='output folder')
    p.add_argument('--pretrained', action='store_true', help='load the registered (or folder) weights')
    p.add_argument('--checkpoint', help='a model.safetensors to load into the model')
    p.add_argument('--num-classes', type=int, help='classifier size (must match --checkpoint)')
    p.add_argument('--in-chans', type=int, help='input channels')
    p.add_argument('--input-size', type=int, nargs=2, metavar=('H', 'W'),
                   help='spatial size of the example input; default: the model\'s pretrained input size')
    p.add_argument('--opset', type=int, default=18, help='ONNX opset')
    p.add_argument('--exporter', choices=('dynamo', 'legacy'), default='dynamo', help='ONNX exporter')
    p.add_argument('--atol', type=float, default=1e-4, help='largest accepted |exported - eager|')
    p.add_argument('--no-check', action='store_true', help='skip the parity check')
    p.set_defaults(func=_cmd_convert)
