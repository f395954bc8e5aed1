"""Pretrained weights: find and verify a registered weight file (HF cache, then the copy shipped in
``hub/<name>/``, then the Hub) and load it; ``load_model`` is what the torch.hub entrypoints call.

Every weight file loaded for a registry record is checked against the record's sha256 first, and
only safetensors files are ever loaded. A user's file (no hash to check) is checked instead: a readable
safetensors file, the tensor names of the requested architecture, every tensor finite, no absurd magnitude;
its label names come from the ``config.json`` beside it, never from the registry's default tag.
The Hub client honours ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN``
as usual (all read when it is imported).
"""
import difflib
import functools
import json
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Optional, Tuple
from urllib.parse import urlparse

import torch

from ..utils import sha256_file
from .weights import Weights, find_weights

__all__ = [
    'HashMismatchError', 'WeightsUnavailableError', 'shipped_root', 'shipped_folder', 'weights_file',
    'resolve_pretrained_file', 'load_model', 'create_model', 'load_safetensors', 'read_state_dict',
    'check_state_dict', 'fit_state_dict', 'file_label_names']

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
MAX_ABS_WEIGHT = 1e6  # above this a trained weight is almost surely a damaged byte, not a value
CURVES_NAME = 'training_curves.png'
REPO_ROOT = Path(__file__).resolve().parents[2]


class HashMismatchError(RuntimeError):
    """A weight file whose sha256 differs from the registry's: never loaded."""


class WeightsUnavailableError(RuntimeError):
    """No verified copy of a weight file could be found or downloaded."""


PACKAGE_SHIPPED = Path(__file__).resolve().parents[1] / '_shipped'  # hub/ as the wheel installs it


def shipped_root() -> Path:
    """The folder of shipped weight folders: ``AFF_ZOO_HUB_DIR`` if set (an empty one: always use the Hub),
    else ``hub/`` of this checkout, else the copy a ``pip install .`` put in the package (``aff_zoo/_shipped``)."""
    if os.environ.get('AFF_ZOO_HUB_DIR'):
        return Path(os.environ['AFF_ZOO_HUB_DIR'])
    checkout = REPO_ROOT / 'hub'
    return checkout if checkout.is_dir() or not PACKAGE_SHIPPED.is_dir() else PACKAGE_SHIPPED


def shipped_folder(record: Weights) -> Path:
    """``<shipped_root>/<arch>.<tag>/``: the folder exactly as its Hub repo holds it."""
    return shipped_root() / record.name


def verify_file(path, record: Weights, source: str) -> str:
    """``path`` if its sha256 is the registry's, else a ``HashMismatchError`` naming both hashes."""
    digest = sha256_file(path)
    if digest != record.sha256:
        raise HashMismatchError(
            f'{record.name}: {record.filename} from {source} ({path}) has sha256 {digest}, but the registry '
            f'(aff_zoo/models/weights.py) expects {record.sha256}. The file is corrupted or not the published one; '
            f'it was not loaded. Delete it (or the Hub cache entry) and download again.')
    return str(path)


def _endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


def _how_to_fix(name: str) -> str:
    from . import weights
    upcycled = next((w for w in weights.UPCYCLED if w.name == name), None)
    local = (f'aff_zoo.upcycle({upcycled.arch!r}, timm.create_model({upcycled.parent!r}, pretrained=True, '
             f'pretrained_cfg_overlay=dict(file="/path/to/{upcycled.parent}/model.safetensors")))'
             if upcycled else f'timm.create_model({name!r}, pretrained=True, '
                              f'pretrained_cfg_overlay=dict(file="/path/to/model.safetensors"))')
    return (
        f'To load it anyway: point HF_ENDPOINT at a reachable Hub or mirror (set it before Python starts; '
        f'huggingface_hub reads it at import), or set HF_HUB_OFFLINE=1 with the file already in the Hub cache '
        f'(HF_HOME / HF_HUB_CACHE), or load a local copy: {local}.')


def _check_reachable(endpoint: str, timeout: float):
    """One quick TCP connect, so an unreachable Hub fails in seconds instead of the client's retry loop."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == 'https' else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f'cannot connect to {url.hostname}:{port} ({e})') from e


def _unreachable(name: str, where: str, error: Exception) -> 'WeightsUnavailableError':
    from huggingface_hub import constants
    return WeightsUnavailableError(
        f'{name}: the Hub cannot be reached for {where}: {error}; nothing cached in {constants.HF_HUB_CACHE}. '
        + _how_to_fix(name))


def require_hub(name: str, where: str) -> None:
    """A ``WeightsUnavailableError`` within ``AFF_ZOO_CONNECT_TIMEOUT`` seconds (default 5) when the Hub cannot
    be reached, before any client call that would retry for half a minute."""
    from huggingface_hub import constants
    try:
        _check_reachable(constants.ENDPOINT, float(os.environ.get('AFF_ZOO_CONNECT_TIMEOUT', '5')))
    except ConnectionError as e:
        raise _unreachable(name, where, e) from None


def hub_download(repo_id: str, filename: str, name: str, revision: Optional[str] = None) -> str:
    """``hf_hub_download`` (cache first, honours the HF_* variables) with clear, fast errors."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
        RevisionNotFoundError)
    endpoint = constants.ENDPOINT
    where = f'{filename} of Hub repo {repo_id} ({endpoint})'
    try:
        if not constants.HF_HUB_OFFLINE:
            try:
                return hf_hub_download(repo_id, filename, revision=revision, local_files_only=True)
            except LocalEntryNotFoundError:
                pass
            require_hub(name, where)
        return hf_hub_download(repo_id, filename, revision=revision)
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: first
        state = 'HF_HUB_OFFLINE=1 is set and ' if constants.HF_HUB_OFFLINE else 'the Hub cannot be reached and '
        raise WeightsUnavailableError(
            f'{name}: {state}{where} is not in the cache {constants.HF_HUB_CACHE}. ' + _how_to_fix(name)) from None
    except (RepositoryNotFoundError, EntryNotFoundError, RevisionNotFoundError) as e:
        raise WeightsUnavailableError(
            f'{name}: the Hub has no {where} ({type(e).__name__}). Is the repo published there? '
            + _how_to_fix(name)) from None
    except ConnectionError as e:
        raise _unreachable(name, where, e) from None
    except HfHubHTTPError as e:
        raise WeightsUnavailableError(f'{name}: downloading {where} failed: {e}. ' + _how_to_fix(name)) from None


def weights_file(record: Weights) -> str:
    """A local, sha256-verified copy of ``record``'s file: the Hugging Face cache, else the folder shipped
    in this repository or package (``hub/<name>/``, so a clone or an install works offline), else the Hub."""
    from huggingface_hub import try_to_load_from_cache
    cached = try_to_load_from_cache(record.hf_hub_id, record.filename)
    if isinstance(cached, str):
        return verify_file(cached, record, 'the Hugging Face cache')
    shipped = shipped_folder(record) / record.filename
    if shipped.is_file():
        return verify_file(shipped, record, 'the folder shipped in this repository (or package)')
    path = hub_download(record.hf_hub_id, record.filename, record.name)
    return verify_file(path, record, f'the Hub at {_endpoint()}')


def _file_num_classes(path, cfg: Dict[str, Any], state: Optional[Dict[str, torch.Tensor]] = None) -> int:
    """Classes in a checkpoint without a registry record: rows of its classifier weight."""
    from safetensors import safe_open
    head = cfg.get('classifier') or 'fc'
    head = head if isinstance(head, str) else head[0]
    if state is not None:
        w = state.get(f'{head}.weight')
        return w.shape[0] if w is not None else cfg['num_classes']
    with safe_open(str(path), 'pt') as f:
        if f'{head}.weight' in f.keys():
            return f.get_slice(f'{head}.weight').get_shape()[0]
    return cfg['num_classes']


# ---------------------------------------------------------------------------------------------------------
# Checks for weight files without a registry hash (the user's own files, Hub repos outside the registry)


def read_state_dict(path) -> Dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, or one ``ValueError`` saying the file is damaged or not safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise ValueError(f'no such weight file: {path}')
    try:
        return load_file(str(path))
    except SafetensorError as e:
        with open(path, 'rb') as f:
            magic = f.read(2)
        kind = ('it is a zip/pickle file (torch.save\'s format) named .safetensors' if magic in (b'PK', b'\x80\x02')
                else 'it is damaged, truncated or not a safetensors file')
        raise ValueError(
            f'{path} cannot be read as safetensors ({e}): {kind}. Nothing was loaded. Download or copy the file '
            f'again, or convert a checkpoint you trust with safetensors.torch.save_file.') from None


def check_state_dict(state: Dict[str, torch.Tensor], source: str) -> None:
    """A file without a hash: every tensor must be finite (else ``ValueError`` naming the tensor), and a
    magnitude above ``MAX_ABS_WEIGHT`` is warned about (a flipped exponent bit, not a trained value)."""
    huge = []
    for k, v in state.items():
        if not v.is_floating_point() or not v.numel():
            continue
        finite = torch.isfinite(v)
        if not finite.all():
            n = int((~finite).sum())
            raise ValueError(
                f'{source}: tensor {k} {list(v.shape)} has {n} NaN or infinite value(s); the file is damaged '
                f'(e.g. a flipped byte) or comes from a diverged run. It was not loaded: use another copy.')
        m = float(v.abs().max())
        if m > MAX_ABS_WEIGHT:
            huge.append(f'{k} (max |w| = {m:.3g})')
    if huge:
        warnings.warn(
            f'{source}: {len(huge)} tensor(s) hold values above {MAX_ABS_WEIGHT:g}: {", ".join(huge[:5])}. '
            f'Trained weights are not that large: the file may be damaged (a flipped byte); compare it with '
            f'the original.', stacklevel=2)


def _keys(keys) -> FrozenSet[str]:
    # FrozenBatchNorm2d checkpoints have no num_batches_tracked: never a reason to refuse a file
    return frozenset(k for k in keys if not k.endswith('num_batches_tracked'))


@functools.lru_cache(maxsize=None)
def _arch_keys(arch: str) -> FrozenSet[str]:
    """The tensor names of ``arch`` as built by default (on the meta device: no memory, no init cost)."""
    import timm
    with torch.device('meta'):
        return _keys(timm.create_model(arch).state_dict())


def zoo_models() -> List[str]:
    """Every model aff_zoo registered with timm (read from timm's registry: importing ``aff_zoo.models``
    here would be an import cycle)."""
    import timm
    from timm.models import model_entrypoint
    return [n for n in timm.list_models() if model_entrypoint(n).__module__.startswith(__package__ + '.')]


def identify_architecture(keys) -> Optional[str]:
    """The registered aff_zoo model whose tensor names are exactly ``keys``, or ``None``."""
    from timm.models import model_entrypoint
    keys = _keys(keys)
    family = '.resnet' if any(k.startswith('conv1.') for k in keys) else '.cifar'  # ImageNet stem: conv1.0
    archs = sorted(zoo_models(), key=lambda a: not model_entrypoint(a).__module__.endswith(family))
    for arch in archs:
        if _arch_keys(arch) == keys:
            return arch
    return None


def fit_state_dict(arch: str, keys, source: str, file_arch: Optional[str] = None) -> None:
    """``ValueError`` unless ``keys`` are ``arch``'s tensor names; it names the model the file is for
    (from its ``config.json``, ``file_arch``, or by matching the names against every registered model)."""
    keys = _keys(keys)
    expected = _arch_keys(arch)
    if keys == expected:
        return
    how = 'its config.json says so'
    other = file_arch if file_arch and file_arch != arch else None
    if other is None:
        other, how = identify_architecture(keys), 'its tensor names are exactly that model\'s'
    if other and other != arch:
        raise ValueError(f'{source} is for {other}, not {arch} ({how}). Use the model name {other} '
                         f'(--model {other}).')
    missing, unexpected = sorted(expected - keys), sorted(keys - expected)
    raise ValueError(
        f'{source} does not fit {arch} and matches no aff_zoo model: {len(missing)} of {arch}\'s tensors are '
        f'missing (e.g. {", ".join(missing[:3]) or "none"}), {len(unexpected)} are unexpected (e.g. '
        f'{", ".join(unexpected[:3]) or "none"}). Use the model name these weights were trained with.')


def file_config(path) -> Dict[str, Any]:
    """The timm ``config.json`` beside a weight file (``{}`` if there is none)."""
    cfg_path = Path(path).parent / CONFIG_NAME
    if not cfg_path.is_file():
        return {}
    try:
        config = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f'{cfg_path} (beside the weights) is not valid JSON ({e}); fix or remove it.') from None
    return config if isinstance(config, dict) else {}


def file_label_names(config: Dict[str, Any]) -> Optional[List[str]]:
    """Class names in a timm ``config.json``: top-level ``label_names`` (timm lets it win), else
    ``pretrained_cfg.label_names`` (or the legacy ``labels``)."""
    pc = config.get('pretrained_cfg') if isinstance(config.get('pretrained_cfg'), dict) else config
    names = config.get('label_names') or pc.get('label_names') or pc.get('labels')
    return [str(n) for n in names] if names else None


_DATA_CFG_KEYS = ('input_size', 'mean', 'std', 'interpolation', 'crop_pct', 'crop_mode')


def _adopt_file_config(cfg: Dict[str, Any], config: Dict[str, Any]) -> None:
    """A user's file brings its own label names and preprocessing (config.json beside it); the arch's
    default tag's (e.g. CIFAR-10 class names) never apply to it. Where the file has none, there are none."""
    pc = config.get('pretrained_cfg') if isinstance(config.get('pretrained_cfg'), dict) else {}
    for k in _DATA_CFG_KEYS:
        if pc.get(k) is not None:
            cfg[k] = tuple(pc[k]) if isinstance(pc[k], list) else pc[k]
    names = file_label_names(config)
    cfg['label_names'] = tuple(names) if names else None
    cfg['label_descriptions'] = None


def check_user_file(path, arch: str, cfg: Optional[Dict[str, Any]] = None) -> Dict[str, torch.Tensor]:
    """Everything a weight file without a hash must pass before it is loaded; returns its tensors.
    With ``cfg`` (a resolved timm pretrained cfg), the file's label names and preprocessing go into it."""
    config = file_config(path)
    state = read_state_dict(path)
    fit_state_dict(arch, state.keys(), str(path), config.get('architecture'))
    check_state_dict(state, str(path))
    if cfg is not None:
        _adopt_file_config(cfg, config)
    return state


def resolve_pretrained_file(cfg: Dict[str, Any]) -> Optional[Tuple[str, int]]:
    """``(local safetensors file, its num_classes)`` for a resolved timm pretrained cfg, or ``None`` to let
    timm load an in-memory ``state_dict``. Registry weights are verified; anything not safetensors is refused."""
    if cfg.get('state_dict') is not None:
        return None
    arch, tag, source = cfg.get('architecture'), cfg.get('tag'), cfg.get('source') or ''
    hub_id = cfg.get('hf_hub_id')
    if source == 'hf-hub':  # ``hf-hub:org/repo`` names: a registry record only if the repo is the registry's
        record = find_weights(hf_hub_id=hub_id)
    elif cfg.get('file'):  # the user's own file or folder (pretrained_cfg_overlay=dict(file=...))
        path = Path(cfg['file'])
        if source == 'local-dir' or path.is_dir():
            path = path / WEIGHTS_NAME
        if not path.is_file():
            raise ValueError(f'{arch}: no such weight file: {path}')
        if path.suffix != '.safetensors':
            raise ValueError(f'{arch}: only safetensors weight files are loaded; {path} is not one '
                             '(pickled .pt/.pth checkpoints never are).')
        state = check_user_file(path, arch, cfg)  # and cfg takes the file's label names, not the default tag's
        return str(path), _file_num_classes(path, cfg, state)
    else:
        record = find_weights(name=f'{arch}.{tag}' if tag else None, hf_hub_id=hub_id)
    if record is not None:
        return weights_file(record), record.num_classes
    if hub_id:  # a Hub repo outside the registry (e.g. someone's fine-tune): safetensors, no hash to check
        repo, _, revision = hub_id.partition('@')
        path = hub_download(repo, WEIGHTS_NAME, f'hf-hub:{hub_id}', revision or None)
        state = check_user_file(path, arch)
        return path, _file_num_classes(path, cfg, state)
    if cfg.get('url'):
        raise ValueError(f'{arch}: weights from a URL ({cfg["url"]}) are not loaded; only registered safetensors.')
    return None


def load_safetensors(model: torch.nn.Module, path, strict: bool = True) -> None:
    """Load a safetensors state dict, with one clear message for a damaged file, a head of another class
    count, or a file of another architecture."""
    if not str(path).endswith('.safetensors'):
        raise ValueError(f'{path}: only .safetensors weight files are loaded (pickled checkpoints never are).')
    state = read_state_dict(path)
    check_state_dict(state, str(path))
    load_checked_state(model, state, str(path), strict)


def load_checked_state(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str,
                       strict: bool = True) -> None:
    """``model.load_state_dict(state)`` whose errors say what is wrong: another class count (how to fix),
    or another architecture (which one, when the tensor names match a registered model)."""
    head = model.get_classifier() if hasattr(model, 'get_classifier') else None
    if isinstance(head, torch.nn.Linear):
        head_name = next(n for n, m in model.named_modules() if m is head)
        w = state.get(f'{head_name}.weight')
        if w is not None and w.shape[0] != head.out_features:
            raise ValueError(
                f'{source} holds a {w.shape[0]}-class head ({head_name}.weight {list(w.shape)}) but the model was '
                f'built with {head.out_features} classes. Build it with num_classes={w.shape[0]} (--num-classes '
                f'{w.shape[0]}) to use these weights as they are, or fine-tune them to {head.out_features} '
                f'classes with `aff-zoo finetune`, which replaces the head.')
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Frozen (FrozenBatchNorm2d) checkpoints have no num_batches_tracked: the only tolerated difference.
    missing = [k for k in missing if not k.endswith('num_batches_tracked')]
    if strict and (missing or unexpected):
        arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
        other = identify_architecture(state.keys())
        if other and other != arch:
            raise ValueError(f'{source} is for {other}, not {arch} (its tensor names are exactly that model\'s). '
                             f'Use the model name {other} (--model {other}).')
        raise ValueError(
            f'{source} does not fit {arch}: {len(missing)} tensors missing (e.g. {", ".join(missing[:3]) or "none"}), '
            f'{len(unexpected)} unexpected (e.g. {", ".join(unexpected[:3]) or "none"}). '
            'Use the model name these weights were trained with.')


def _check_device(device) -> Optional[torch.device]:
    if device is None:
        return None
    device = torch.device(device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError(
            f'device={str(device)!r} was requested but CUDA is not available here (torch {torch.__version__}, '
            f'no usable GPU/driver). Use device="cpu" or device=None; weights always load on the CPU first.')
    if device.type == 'mps' and not torch.backends.mps.is_available():
        raise RuntimeError(f'device={str(device)!r} was requested but MPS is not available. Use device="cpu".')
    return device


def check_model_name(name: str) -> None:
    """``ValueError`` for a model name timm does not know, suggesting the closest registered names."""
    import timm
    if name.startswith(('hf-hub:', 'local-dir:')):
        return
    arch = name.split('.', 1)[0]
    if timm.is_model(arch):
        return
    close = (difflib.get_close_matches(arch, zoo_models(), n=3, cutoff=0.6)
             or difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.75))
    hint = f' Did you mean {" or ".join(close)}?' if close else ''
    raise ValueError(f'Unknown model {arch!r}.{hint} `aff-zoo list` shows the zoo\'s models.')


def hf_hub_config(model_id: str) -> Tuple[Dict[str, Any], str, Dict[str, Any]]:
    """``(pretrained_cfg, architecture, model_args)`` of ``hf-hub:<model_id>`` from its config.json, fetched by
    ``hub_download`` (cache first, fails in seconds when the Hub is unreachable; timm's own path retries ~30 s)."""
    from timm.models._hub import load_model_config_from_path
    repo, _, revision = model_id.partition('@')
    path = hub_download(repo, CONFIG_NAME, f'hf-hub:{model_id}', revision or None)
    try:
        pretrained_cfg, arch, model_args = load_model_config_from_path(Path(path).parent)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f'hf-hub:{model_id}: its {CONFIG_NAME} is not a timm model config ({e!r}).') from None
    pretrained_cfg.pop('file', None)  # parsed as a local folder; it is the Hub repo's, as timm's hf-hub path says
    pretrained_cfg.update(hf_hub_id=model_id, source='hf-hub')
    return pretrained_cfg, arch, model_args


def create_model(name: str, pretrained: bool = False, weights=None, **kwargs) -> torch.nn.Module:
    """``timm.create_model`` with the zoo's checks: an unknown name suggests close ones; ``hf-hub:`` names
    fetch their config through ``hub_download``; ``weights`` (a safetensors file or its folder) is loaded
    instead of the published weights, with its own label names (config.json beside it) or none."""
    import timm  # the models are registered: importing this module ran aff_zoo/__init__ (models) first
    check_model_name(name)
    if weights is not None:
        overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {}, file=str(weights))
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    if name.startswith('hf-hub:'):
        pretrained_cfg, arch, model_args = hf_hub_config(name[len('hf-hub:'):])
        check_model_name(arch)
        for k, v in model_args.items():
            kwargs.setdefault(k, v)
        return timm.create_model(arch, pretrained=pretrained, pretrained_cfg=pretrained_cfg, **kwargs)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def load_model(name: str, pretrained: bool = False, device=None, **kwargs) -> torch.nn.Module:
    """``create_model`` on the CPU, then moved to ``device`` (so GPU-trained files load anywhere).
    The torch.hub entrypoints in ``hubconf.py`` are this function with the model name filled in."""
    device = _check_device(device)
    model = create_model(name, pretrained=pretrained, **kwargs)
    return model.to(device) if device is not None else model
