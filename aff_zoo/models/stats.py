"""Model size and cost: parameters and multiply-accumulates from torch's own FLOP counter."""
from typing import Sequence, Tuple

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gmacs(model: torch.nn.Module, input_size: Sequence[int], batch_size: int = 1) -> float:
    """Giga multiply-accumulates per forward pass of ``batch_size`` images (conv/matmul ops, as
    ``torch.utils.flop_counter`` counts them; element-wise ops are not counted)."""
    p = next(model.parameters())
    x = torch.zeros(batch_size, *input_size, device=p.device, dtype=p.dtype)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    return counter.get_total_flops() / 2e9


def model_stats(name: str, **kwargs) -> Tuple[int, float]:
    """``(parameters, GMACs at the default input size)`` of a registered model, built on the meta
    device so that even the 101-layer models cost no memory or time."""
    with torch.device('meta'):
        model = timm.create_model(name, **kwargs)
        return param_count(model), gmacs(model, model.pretrained_cfg['input_size'])


def models_table(pattern: str = '*', fmt: str = 'text') -> str:
    """The zoo as a text or markdown table: family, fusion, input, params, GMACs, weight tags."""
    from . import IMAGENET_MODELS, list_models
    from .weights import available_tags
    header = ['model', 'family', 'fusion', 'input', 'params (M)', 'GMACs', 'weights']
    rows = []
    for name in list_models(pattern):
        tags = available_tags(name)
        cfg = timm.get_pretrained_cfg(tags[0] if tags else name)
        params, macs = model_stats(name)
        rows.append([
            name, 'ImageNet' if name in IMAGENET_MODELS else 'CIFAR', name.split('_', 1)[0],
            'x'.join(map(str, cfg.input_size[1:])), f'{params / 1e6:.2f}', f'{macs:.3f}',
            ', '.join(t.split('.', 1)[1] for t in tags) or '-',
        ])
    if not rows:
        return ''
    if fmt == 'markdown':
        lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
        lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
    else:
        widths = [max(len(x) for x in col) for col in zip(header, *rows)]
        lines = ['  '.join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in [header] + rows]
    return '\n'.join(lines)
