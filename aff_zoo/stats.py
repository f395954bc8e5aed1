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
