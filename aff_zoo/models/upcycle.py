"""Upcycling: an AFF / iAFF model that starts from a trained plain-addition peer and computes its function.

Every plain tensor of the AFF model (stem, convolutions, BatchNorms, shortcuts, head) is copied from the
parent, with names and shapes checked. Every fusion starts with zero attention logits (the local branch's
last BN gamma and beta, the global branch's last conv weight and bias), so its attention is
``sigmoid(0) = 0.5`` and, with the default ``scale=2``, the fusion is exactly the addition it replaces:
the model's output equals the parent's. Training then moves the zeroed tensors first (their gradients
are not zero) and every other fusion tensor from the second step on: the zero-init-last-layer trick of
ReZero and zero-init residual BN, applied to the attention instead of the residual.
"""
from typing import Any, Dict, List, Mapping, Tuple, Union
import warnings

import torch
import torch.nn as nn

from ..layers.fusion import MSCAM, SEFusion, _TwoWaySoftmax

__all__ = ['upcycle', 'plain_keys', 'zero_fusion_logits', 'UpcycleError']


class UpcycleError(ValueError):
    """The parent does not fit the AFF model's plain part (names or shapes), or the fusion cannot start as addition."""


def _fusion_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """``name -> module`` for every fusion module with parameters (``*.fusion``), outermost only."""
    out: Dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if name.rsplit('.', 1)[-1] == 'fusion' and any(True for _ in m.parameters()):
            out[name] = m
    return out


def plain_keys(model: nn.Module) -> List[str]:
    """The state_dict keys of ``model`` outside its fusion modules: the tensors a plain parent provides."""
    prefixes = tuple(f'{n}.' for n in _fusion_modules(model))
    return [k for k in model.state_dict() if not k.startswith(prefixes)]


@torch.no_grad()
def zero_fusion_logits(model: nn.Module) -> int:
    """Zero the last layer of every attention branch so every fusion computes ``scale/2 * (x + y)``.
    Returns the number of attention modules set; refuses fusions that cannot start as addition."""
    count = 0
    for name, fusion in _fusion_modules(model).items():
        if isinstance(fusion, SEFusion):
            raise UpcycleError(
                f'{name}: SE fusion computes x + y * sigmoid(g(y)), which is x + y/2 at zero logits, not x + y; '
                'it cannot start as its plain peer. Upcycle into aff_*, iaff_*, local_* or sk_* models.')
        scale = getattr(fusion, 'scale', 2.0)
        if scale != 2.0:
            raise UpcycleError(
                f'{name}: fusion_scale={scale:g} makes a zero-logit fusion {scale / 2:g} * (x + y), not x + y; '
                'upcycle with the default fusion_scale=2.')
        for m in fusion.modules():
            if isinstance(m, MSCAM):
                if m.local_att is not None:
                    m.local_att.bn2.weight.zero_()
                    m.local_att.bn2.bias.zero_()
                if m.global_att is not None:
                    m.global_att.conv2.weight.zero_()
                    m.global_att.conv2.bias.zero_()
                count += 1
            elif isinstance(m, _TwoWaySoftmax):  # SK: equal logits for both inputs -> softmax 0.5 / 0.5
                m.conv2.weight.zero_()
                m.conv2.bias.zero_()
                count += 1
    return count


def _parent_state(parent) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], str]:
    """``(state_dict, pretrained_cfg, description)`` of a parent model, name or state dict."""
    if isinstance(parent, str):
        import timm
        from .. import models  # noqa: F401  registers the zoo's models (zoo tags work as parents)
        try:
            parent = timm.create_model(parent, pretrained=True)
        except Exception as e:
            raise UpcycleError(f'Cannot load the parent {parent!r}: {e}') from e
    if isinstance(parent, nn.Module):
        cfg = dict(getattr(parent, 'pretrained_cfg', None) or {})
        desc = cfg.get('architecture') or type(parent).__name__
        if cfg.get('tag'):
            desc = f'{desc}.{cfg["tag"]}'
        return parent.state_dict(), cfg, desc
    if isinstance(parent, Mapping):
        return dict(parent), {}, 'the given state dict'
    raise TypeError(f'parent must be a timm model, a timm model name or a state dict, not {type(parent).__name__}')


def _head_keys(model: nn.Module) -> List[str]:
    head = model.get_classifier() if hasattr(model, 'get_classifier') else None
    if not isinstance(head, nn.Module):
        return []
    prefix = next((n for n, m in model.named_modules() if m is head), None)
    return [f'{prefix}.{k}' for k in head.state_dict()] if prefix else []


# The pretrained_cfg fields that describe the parent's data (they carry over to the upcycled model).
_DATA_CFG_KEYS = ('input_size', 'test_input_size', 'fixed_input_size', 'interpolation', 'crop_pct', 'test_crop_pct',
                  'crop_mode', 'mean', 'std', 'label_names', 'label_descriptions', 'num_classes')


def upcycle(arch: str, parent: Union[nn.Module, str, Mapping[str, torch.Tensor]], **create_kwargs) -> nn.Module:
    """The registered model ``arch`` (e.g. ``'aff_resnet50'``) starting from ``parent``'s weights,
    computing exactly ``parent``'s function (see the module docstring).

    ``parent``: a timm model (e.g. ``timm.create_model('resnet50d', pretrained=True)``), a timm / zoo
    pretrained name (``'resnet50d.a1_in1k'``, ``'add_resnet20.cifar10_e12'``, ``'local-dir:/path'``) or
    a state dict. ``create_kwargs`` go to ``timm.create_model`` (``num_classes`` defaults to the parent's;
    another value gets a fresh head, with a warning). Raises ``UpcycleError`` naming the keys that do not fit.
    """
    import timm
    from .. import models  # noqa: F401
    create_kwargs.pop('pretrained', None)  # the weights come from the parent
    state, parent_cfg, desc = _parent_state(parent)
    state = {k: v for k, v in state.items()}
    parent_classes = None
    if 'num_classes' not in create_kwargs:
        parent_classes = parent_cfg.get('num_classes')
        fc = state.get('fc.weight')  # every zoo family and timm's ResNet call the head fc
        if fc is not None:
            parent_classes = fc.shape[0]
        if parent_classes:
            create_kwargs['num_classes'] = parent_classes
    model = timm.create_model(arch, **create_kwargs)
    target = model.state_dict()
    wanted = plain_keys(model)
    head = set(_head_keys(model))
    # Missing BN counters (checkpoints of frozen BNs have none) are the one tolerated difference.
    missing = [k for k in wanted if k not in state and not k.endswith('num_batches_tracked')]
    wanted_set = set(wanted)
    unexpected = [k for k in state if k not in wanted_set]
    mismatched = [k for k in wanted if k in state and k not in head and state[k].shape != target[k].shape]
    if missing or unexpected or mismatched:
        def show(keys):
            return ', '.join(keys[:8]) + (f' (+{len(keys) - 8} more)' if len(keys) > 8 else '') if keys else 'none'
        raise UpcycleError(
            f'{desc} is not a plain peer of {arch}: keys of {arch} the parent lacks: {show(missing)}; parent keys '
            f'{arch} has no plain place for: {show(unexpected)}; shape mismatches: '
            + (', '.join(f'{k} {list(state[k].shape)} vs {list(target[k].shape)}' for k in mismatched[:8]) or 'none')
            + f'. Upcycle from the plain-addition network of the same depth, width and stem '
              f'(e.g. resnet50d for aff_resnet50, add_resnet20 for aff_resnet20).')
    skipped = [k for k in head if k in state and state[k].shape != target[k].shape]
    if skipped:
        warnings.warn(f'{arch}: the parent head ({", ".join(f"{k} {list(state[k].shape)}" for k in skipped)}) does '
                      f'not fit num_classes={create_kwargs.get("num_classes")}; the head starts fresh (random).',
                      stacklevel=2)
    load = {k: state[k] for k in wanted if k in state and k not in skipped}
    model.load_state_dict(load, strict=False)
    zero_fusion_logits(model)
    if parent_cfg:  # the parent's preprocessing is the upcycled model's: same function at load time
        cfg = dict(model.pretrained_cfg)
        cfg.update({k: parent_cfg[k] for k in _DATA_CFG_KEYS if k in parent_cfg and k != 'num_classes'})
        if skipped:
            cfg.pop('label_names', None)
            cfg.pop('label_descriptions', None)
        cfg['num_classes'] = model.num_classes
        cfg['upcycled_from'] = desc
        model.pretrained_cfg = model.default_cfg = cfg
    return model
