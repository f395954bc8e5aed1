"""Upcycling: an AFF / iAFF model that starts from a trained plain-addition peer and computes its function.

Every plain tensor of the AFF model (stem, convolutions, BatchNorms, shortcuts, head) is copied from the
parent, with names and shapes checked. Every fusion starts with zero attention logits (the local branch's
last BN gamma and beta, the global branch's last conv weight and bias; for iAFF those of the outer MS-CAM,
which decides the output), so its attention is
``sigmoid(0) = 0.5`` and, with the default ``scale=2``, the fusion is exactly the addition it replaces:
the model's output equals the parent's. Training then moves the zeroed tensors first (their gradients
are not zero) and every other fusion tensor from the second step on: the zero-init-last-layer trick of
ReZero and zero-init residual BN, applied to the attention instead of the residual.
"""
import os
import re
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..layers.fusion import SEFusion

__all__ = ['upcycle', 'plain_keys', 'zero_fusion_logits', 'UpcycleError', 'parent_file', 'build_upcycled']


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
        fusion.zero_init_last()  # iAFF: the outer MS-CAM only (see iAFF.zero_init_last)
        count += 1
    return count


def _parent_state(parent) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], str]:
    """``(state_dict, pretrained_cfg, description)`` of a parent model, name or state dict."""
    if isinstance(parent, str):
        import timm  # zoo tags work as parents: importing this module ran aff_zoo/__init__, which registers them
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


# ------------------------------------------------------------------------------------------------------------
# Registered upcycled weights (``aff_zoo.models.weights.UPCYCLED``): the parent's file, verified, then upcycled.

def _git_blob_sha1(path) -> str:
    """The git object id of a file (what the Hub reports as the etag of a file not stored in LFS)."""
    import hashlib
    h = hashlib.sha1()
    h.update(b'blob %d\0' % os.path.getsize(path))
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def _check_reported(path, record, digest: str, source: str, commit: Optional[str]) -> str:
    """Verify an unpinned parent's file against the digest the Hub reports for it: the LFS sha256 (64 hex) or,
    for a file outside LFS, the git blob id (40 hex)."""
    from ..utils import sha256_file
    from .pretrained import HashMismatchError
    digest = (digest or '').strip('"').lower()
    if re.fullmatch(r'[0-9a-f]{64}', digest):
        kind, actual = 'sha256', sha256_file(path)
    elif re.fullmatch(r'[0-9a-f]{40}', digest):
        kind, actual = 'git blob id', _git_blob_sha1(path)
    else:
        raise HashMismatchError(
            f'{record.name}: the parent record is not pinned and the Hub reported no usable digest ({digest!r}) '
            f'for {record.filename} of {record.parent_repo}; it was not loaded. Pin it: `aff-zoo pin-parents`.')
    if actual != digest:
        raise HashMismatchError(
            f'{record.name}: the parent file {record.filename} of {record.parent_repo} from {source} ({path}) has '
            f'{kind} {actual}, but the Hub reports {digest}. The file is corrupted; it was not loaded. Delete it '
            f'(or the Hub cache entry) and download again.')
    warnings.warn(
        f'{record.name}: the parent record is not pinned yet (no revision/sha256 in aff_zoo/models/weights.py); '
        f'{record.parent_repo}/{record.filename}' + (f' at commit {commit}' if commit else '') +
        f' was checked against the {kind} the Hub reports ({digest[:12]}…). A maintainer with network access '
        f'pins it with `aff-zoo pin-parents`.', stacklevel=4)
    return str(path)


def _verify_parent(path, record, source: str, reported: Optional[str] = None, commit: Optional[str] = None) -> str:
    from .pretrained import verify_file
    if record.sha256:
        return verify_file(path, record, source)  # same check and message as our own files
    if reported is None:  # a cached file: the Hub cache names each blob by the etag the Hub reported at download
        reported = os.path.basename(os.path.realpath(path))
    return _check_reported(path, record, reported, source, commit)


def _hub_file_info(record) -> Tuple[str, Optional[str]]:
    """``(commit, digest the Hub reports for the file)`` for the record's revision (``main`` if unpinned)."""
    from huggingface_hub import HfApi
    from .pretrained import WeightsUnavailableError, _how_to_fix
    api = HfApi()
    revision = record.revision or 'main'
    where = f'revision {revision} of Hub repo {record.parent_repo} ({api.endpoint})'
    try:
        commit = revision if record.revision else api.model_info(record.parent_repo, revision=revision).sha
        infos = api.get_paths_info(record.parent_repo, [record.filename], revision=commit)
    except Exception as e:  # not found, unknown revision, HTTP or connection error: one clear message
        detail = str(e).splitlines()[0]
        raise WeightsUnavailableError(
            f'{record.name}: the parent\'s {where} is not available ({type(e).__name__}: {detail}). '
            + ('The pinned revision may be wrong, or the repo moved; check aff_zoo/models/weights.py. '
               if record.revision else '') + _how_to_fix(record.name)) from None
    if not infos:
        raise WeightsUnavailableError(f'{record.name}: {where} has no {record.filename}. ' + _how_to_fix(record.name))
    info = infos[0]
    lfs = getattr(info, 'lfs', None)
    digest = (lfs.sha256 if lfs is not None else None) or getattr(info, 'blob_id', None)
    return commit, digest


def parent_file(record) -> str:
    """A local, verified copy of an upcycled record's parent file: the Hugging Face cache, else the Hub at
    the pinned revision. Checked against the record's sha256 (or, until pinned, the Hub's reported digest)."""
    from huggingface_hub import constants, try_to_load_from_cache
    from .pretrained import hub_download, require_hub
    revision = record.revision or 'main'
    cached = try_to_load_from_cache(record.parent_repo, record.filename, revision=revision)
    if isinstance(cached, str):
        return _verify_parent(cached, record, 'the Hugging Face cache')
    if constants.HF_HUB_OFFLINE:  # a clear 'not in the cache' error
        hub_download(record.parent_repo, record.filename, record.name, revision)
    require_hub(record.name, f'the parent {record.filename} of Hub repo {record.parent_repo} ({constants.ENDPOINT})')
    commit, digest = _hub_file_info(record)
    # unpinned: by branch name, so the cache records refs/main and the next load (offline too) finds it
    path = hub_download(record.parent_repo, record.filename, record.name, commit if record.revision else revision)
    return _verify_parent(path, record, f'the Hub at {constants.ENDPOINT}', reported=digest, commit=commit)


_FEATURE_KWARGS = ('features_only', 'out_indices', 'feature_cls', 'feature_cfg', 'flatten_sequential',
                   'pretrained_cfg', 'pretrained_cfg_overlay', 'pretrained_strict', 'output_stride')


def build_upcycled(model_cls, variant: str, record, cfg: Dict[str, Any], feature_cfg, kwargs):
    """``build_model_with_cfg`` for an upcycled record: the verified parent state dict is handed to timm's loader
    (so ``num_classes``, ``in_chans`` and ``features_only`` behave as for any timm weight), after its names and
    shapes were checked against the plain part of the model; then every fusion starts at zero logits."""
    from safetensors.torch import load_file
    from timm.models import build_model_with_cfg
    import timm
    path = parent_file(record)
    state = load_file(path)
    with torch.device('meta'):  # the key names and shapes of the plain model, without allocating it
        probe = timm.create_model(variant, **{k: v for k, v in kwargs.items() if k not in _FEATURE_KWARGS})
    target = probe.state_dict()
    first = cfg.get('first_conv') or ''
    adapted = {f'{first}.weight'} | set(_head_keys(probe))  # timm adapts the stem and drops a head of other size
    wanted = set(plain_keys(probe))
    missing = sorted(k for k in wanted if k not in state and not k.endswith('num_batches_tracked'))
    unexpected = sorted(k for k in state if k not in wanted)
    mismatched = sorted(k for k in wanted & set(state) if k not in adapted and state[k].shape != target[k].shape)
    if missing or unexpected or mismatched:
        raise UpcycleError(
            f'{record.name}: the parent file {path} ({record.parent}) does not fit {variant}: missing '
            f'{missing[:8]}, unexpected {unexpected[:8]}, shape mismatches {mismatched[:8]}.')
    num_classes = kwargs.get('num_classes', record.num_classes)
    if num_classes != record.num_classes:
        warnings.warn(
            f'{variant}: the parent has {record.num_classes} classes, the model {num_classes}; the classifier is '
            f're-initialised (random) and these parent keys are not loaded: '
            f'{", ".join(sorted(k for k in state if k in set(_head_keys(probe)) or k.startswith("fc."))) or "none"}. '
            f'Fine-tune before use.', stacklevel=4)
    cfg = dict(cfg, state_dict=state, source='', hf_hub_id=None, url=None, file=None)
    kwargs = dict(kwargs, pretrained_cfg=cfg, pretrained_cfg_overlay=None, pretrained_strict=False)
    model = build_model_with_cfg(model_cls, variant, True, feature_cfg=feature_cfg, **kwargs)
    zero_fusion_logits(model)
    for m in (model, getattr(model, 'model', None)):  # the state dict does not stay in the config
        pc = getattr(m, 'pretrained_cfg', None)
        if isinstance(pc, dict) and 'state_dict' in pc:
            pc = dict(pc, hf_hub_id=record.parent_repo)
            pc.pop('state_dict')
            m.pretrained_cfg = m.default_cfg = pc
    return model
