"""What every aff_zoo model file shares: default configs derived from the weights registry,
and one ``build_aff_model`` that turns a bad tag or a missing weight into a clear error and
loads only sha256-verified safetensors files."""
import contextlib
import sys
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple

import torch

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_function
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg

from . import weights as _weights
from .weights import Weights, available_tags, pretrained_cfg_entries

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def imagenet_cfg(**kwargs) -> Dict[str, Any]:
    return dict(
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
        interpolation='bilinear', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv='conv1.0', classifier='fc', license='apache-2.0', **kwargs)


def cifar_cfg(**kwargs) -> Dict[str, Any]:
    return dict(dict(
        num_classes=10, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0,
        interpolation='bilinear', mean=CIFAR10_MEAN, std=CIFAR10_STD,
        first_conv='stem.conv', classifier='fc', license='apache-2.0'), **kwargs)


_BASE_CFGS: Dict[str, Callable[..., Dict[str, Any]]] = {}  # arch -> its base cfg, to rebuild cfgs


def make_default_cfgs(archs, base_cfg: Callable[..., Dict[str, Any]]):
    """timm ``default_cfgs`` for ``archs``: one ``arch.tag`` entry per registered weight file
    (see ``aff_zoo.models.weights``), or one untagged, weightless entry for an architecture without weights."""
    cfgs = {}
    for arch in archs:
        _BASE_CFGS[arch] = base_cfg
        entries = pretrained_cfg_entries(arch)
        if not entries:
            cfgs[arch] = base_cfg()
        for name_tag, overrides in entries:
            cfgs[name_tag] = dict(base_cfg(), **overrides)
    return generate_default_cfgs(cfgs)


def refresh_pretrained_cfgs(archs: Iterable[str]):
    """Re-derive timm's pretrained cfgs of ``archs`` from the registry as it is now (after
    ``registered_weights`` changed it): rebuild the module's ``default_cfgs``
    entry and re-register the entrypoint, which makes timm drop the stale tags."""
    from timm.models import register_model
    from timm.models._registry import _model_entrypoints
    for arch in archs:
        fn = _model_entrypoints[arch]
        mod = sys.modules[fn.__module__]
        mod.default_cfgs.update(make_default_cfgs([arch], _BASE_CFGS[arch]))
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            register_model(fn)


@contextlib.contextmanager
def registered_weights(*records, replace: bool = False) -> Iterator[Tuple[Weights, ...]]:
    """Temporarily add ``records`` (``Weights`` to ``WEIGHTS``, ``Upcycled`` to ``UPCYCLED``) to the registry
    (or use only them with ``replace=True``), timm's pretrained configs included; restored on exit. For tests
    and for trying a new record before pasting it into the registry. Yields ``WEIGHTS`` as it is inside."""
    saved, saved_up = _weights.WEIGHTS, _weights.UPCYCLED
    own = tuple(w for w in records if isinstance(w, Weights))
    up = tuple(w for w in records if isinstance(w, _weights.Upcycled))
    archs = {w.arch for w in records} | ({w.arch for w in saved + saved_up} if replace else set())
    _weights.WEIGHTS = own if replace else saved + tuple(w for w in own if w not in saved)
    _weights.UPCYCLED = up if replace else saved_up + tuple(w for w in up if w not in saved_up)
    try:
        refresh_pretrained_cfgs(archs)
        yield _weights.WEIGHTS
    finally:
        _weights.WEIGHTS, _weights.UPCYCLED = saved, saved_up
        refresh_pretrained_cfgs(archs)


def _has_weights(cfg) -> bool:
    return any(getattr(cfg, k, None) for k in ('hf_hub_id', 'url', 'file', 'state_dict'))


def build_aff_model(model_cls, variant: str, pretrained: bool, feature_cfg: Optional[dict] = None, **kwargs):
    """``timm.build_model_with_cfg`` plus the checks timm only warns about: unknown tags and missing weights."""
    pretrained_cfg = kwargs.get('pretrained_cfg')
    if isinstance(pretrained_cfg, str) and pretrained_cfg:
        try:
            known = get_pretrained_cfg(f'{variant}.{pretrained_cfg}') is not None
        except RuntimeError:  # timm: 'Invalid pretrained tag'
            known = False
        if not known:
            raise ValueError(
                f'Unknown pretrained tag {pretrained_cfg!r} for {variant}. '
                f'Tags with weights: {", ".join(available_tags(variant)) or "none yet"}. '
                f'All weights in the zoo: {", ".join(available_tags()) or "none yet"}.')
    if pretrained:
        from timm.models._builder import resolve_pretrained_cfg
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg, kwargs.get('pretrained_cfg_overlay'))
        if not _has_weights(cfg) and variant in _weights.NO_PARENT:
            raise RuntimeError(
                f'No weights exist for {variant}: {_weights.NO_PARENT[variant]}. Tags with weights: '
                f'{", ".join(available_tags()) or "none yet"}. Use pretrained=False (and train it), or pass '
                f'pretrained_cfg_overlay=dict(file="/path/to/model.safetensors").')
        if not _has_weights(cfg):
            raise RuntimeError(
                f'No trained weights exist for {variant} (yet). '
                f'Tags with weights: {", ".join(available_tags()) or "none yet"}. '
                f'Use pretrained=False, pick one of those tags, or pass '
                f'pretrained_cfg_overlay=dict(file="/path/to/model.safetensors").')
        upcycled = _weights.find_upcycled(f'{variant}.{cfg.tag}') if cfg.tag and cfg.source != 'hf-hub' else None
        if upcycled is not None and not cfg.file and cfg.state_dict is None:
            # a plain parent's file, verified, then upcycled (aff_zoo.models.upcycle)
            from .upcycle import build_upcycled
            feature_cfg = dict(dict(feature_cls='getter'), **(feature_cfg or {}))
            return build_upcycled(model_cls, variant, upcycled, cfg.to_dict(), feature_cfg, kwargs)
        from .pretrained import resolve_pretrained_file
        cfg = cfg.to_dict()
        resolved = resolve_pretrained_file(cfg)  # verified local safetensors file, or None: timm loads
        if resolved is not None:
            path, ckpt_classes = resolved
            cfg.update(file=path, source='', hf_hub_id=None, url=None, num_classes=ckpt_classes)
            _warn_head_reset(variant, path, ckpt_classes, kwargs.get('num_classes', ckpt_classes), cfg)
            kwargs.update(pretrained_cfg=cfg, pretrained_cfg_overlay=None)
    # features_only runs forward_intermediates (timm's 'getter'): one feature code path, with its input checks.
    feature_cfg = dict(dict(feature_cls='getter'), **(feature_cfg or {}))
    return build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=feature_cfg, **kwargs)


def _warn_head_reset(variant: str, path: str, ckpt_classes: int, num_classes: int, cfg: Dict[str, Any]):
    """timm silently drops the checkpoint's classifier when ``num_classes`` differs; say which keys."""
    if num_classes == ckpt_classes:
        return
    from safetensors import safe_open
    heads = cfg.get('classifier') or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    with safe_open(path, 'pt') as f:
        skipped = [k for k in f.keys() if k.rsplit('.', 1)[0] in heads]
    warnings.warn(
        f'{variant}: the checkpoint has {ckpt_classes} classes, the model {num_classes}; the classifier is '
        f're-initialised (random) and these checkpoint keys are not loaded: {", ".join(skipped) or "none"}. '
        f'Fine-tune before use.', stacklevel=3)


@register_notrace_function  # an FX leaf: the check stays in traced graphs (callers add torch.fx.wrap)
def check_image_batch(x: torch.Tensor, in_chans: int, min_size: int) -> None:
    """One clear error for the two usual input mistakes: wrong channel count, image below the total stride.

    TorchScript-compatible (string concatenation, no f-strings), so it can sit in ``forward_features``.
    """
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(
            'Expected an N x ' + str(in_chans) + ' x H x W image batch, got shape ' + str(list(x.shape)) + '. '
            'Create the model with in_chans=<your channel count> to use other inputs '
            '(pretrained stem weights are then adapted by timm).')
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(
            'Input of ' + str(x.shape[2]) + 'x' + str(x.shape[3]) + ' pixels is smaller than the network\'s '
            'total stride (' + str(min_size) + '): the deepest feature map would be empty or a single padded '
            'pixel. Resize the images to at least ' + str(min_size) + 'x' + str(min_size)
            + ' (ideally the pretrained input size).')
