"""Pretrained weights: find and verify a registered weight file (HF cache, then the copy shipped in
``hub/<name>/``, then the Hub) and load it; ``load_model`` is what the torch.hub entrypoints call.

Every weight file loaded for a registry record is checked against the record's sha256 first, and
only safetensors files are ever loaded. The Hub client honours ``HF_ENDPOINT``, ``HF_HOME``,
``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` as usual (all read when it is imported).
"""
import os
import socket
from pathlib import Path
from typing import Any, Dict, Optional, Tuple
from urllib.parse import urlparse

import torch

from ..utils import sha256_file
from .weights import Weights, find_weights

__all__ = [
    'HashMismatchError', 'WeightsUnavailableError', 'shipped_folder', 'weights_file',
    'resolve_pretrained_file', 'load_model', 'load_safetensors']

WEIGHTS_NAME = 'model.safetensors'
CURVES_NAME = 'training_curves.png'
REPO_ROOT = Path(__file__).resolve().parents[2]


class HashMismatchError(RuntimeError):
    """A weight file whose sha256 differs from the registry's: never loaded."""


class WeightsUnavailableError(RuntimeError):
    """No verified copy of a weight file could be found or downloaded."""


def shipped_folder(record: Weights) -> Path:
    """``hub/<arch>.<tag>/`` in this repository: the folder exactly as its Hub repo holds it.
    ``AFF_ZOO_HUB_DIR`` names another folder of such folders (an empty one: always use the Hub)."""
    return Path(os.environ.get('AFF_ZOO_HUB_DIR') or REPO_ROOT / 'hub') / record.name


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
    return (
        f'To load it anyway: point HF_ENDPOINT at a reachable Hub or mirror (set it before Python starts; '
        f'huggingface_hub reads it at import), or set HF_HUB_OFFLINE=1 with the file already in the Hub cache '
        f'(HF_HOME / HF_HUB_CACHE), or load a local copy: timm.create_model({name!r}, pretrained=True, '
        f'pretrained_cfg_overlay=dict(file="/path/to/model.safetensors")).')


def _check_reachable(endpoint: str, timeout: float):
    """One quick TCP connect, so an unreachable Hub fails in seconds instead of the client's retry loop."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == 'https' else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f'cannot connect to {url.hostname}:{port} ({e})') from e


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
            _check_reachable(endpoint, float(os.environ.get('AFF_ZOO_CONNECT_TIMEOUT', '5')))
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
        raise WeightsUnavailableError(
            f'{name}: the Hub cannot be reached for {where}: {e}; nothing cached in {constants.HF_HUB_CACHE}. '
            + _how_to_fix(name)) from None
    except HfHubHTTPError as e:
        raise WeightsUnavailableError(f'{name}: downloading {where} failed: {e}. ' + _how_to_fix(name)) from None


def weights_file(record: Weights) -> str:
    """A local, sha256-verified copy of ``record``'s file: the Hugging Face cache, else the folder shipped
    in this repository (``hub/<name>/``, so a clone works offline), else a download from the Hub."""
    from huggingface_hub import try_to_load_from_cache
    cached = try_to_load_from_cache(record.hf_hub_id, record.filename)
    if isinstance(cached, str):
        return verify_file(cached, record, 'the Hugging Face cache')
    shipped = shipped_folder(record) / record.filename
    if shipped.is_file():
        return verify_file(shipped, record, 'the folder shipped in this repository')
    path = hub_download(record.hf_hub_id, record.filename, record.name)
    return verify_file(path, record, f'the Hub at {_endpoint()}')


def _file_num_classes(path, cfg: Dict[str, Any]) -> int:
    """Classes in a checkpoint without a registry record: rows of its classifier weight."""
    from safetensors import safe_open
    head = cfg.get('classifier') or 'fc'
    head = head if isinstance(head, str) else head[0]
    with safe_open(str(path), 'pt') as f:
        if f'{head}.weight' in f.keys():
            return f.get_slice(f'{head}.weight').get_shape()[0]
    return cfg['num_classes']


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
        if path.suffix != '.safetensors' or not path.is_file():
            raise ValueError(f'{arch}: only safetensors weight files are loaded; {path} is not one (or is missing).')
        return str(path), _file_num_classes(path, cfg)
    else:
        record = find_weights(name=f'{arch}.{tag}' if tag else None, hf_hub_id=hub_id)
    if record is not None:
        return weights_file(record), record.num_classes
    if hub_id:  # a Hub repo outside the registry (e.g. someone's fine-tune): safetensors, no hash to check
        repo, _, revision = hub_id.partition('@')
        path = hub_download(repo, WEIGHTS_NAME, f'hf-hub:{hub_id}', revision or None)
        return path, _file_num_classes(path, cfg)
    if cfg.get('url'):
        raise ValueError(f'{arch}: weights from a URL ({cfg["url"]}) are not loaded; only registered safetensors.')
    return None


def load_safetensors(model: torch.nn.Module, path, strict: bool = True) -> None:
    """Load a safetensors state dict, with one clear message for a head of another class count."""
    from safetensors.torch import load_file
    if not str(path).endswith('.safetensors'):
        raise ValueError(f'{path}: only .safetensors weight files are loaded (pickled checkpoints never are).')
    state = load_file(str(path))
    head = model.get_classifier() if hasattr(model, 'get_classifier') else None
    if isinstance(head, torch.nn.Linear):
        head_name = next(n for n, m in model.named_modules() if m is head)
        w = state.get(f'{head_name}.weight')
        if w is not None and w.shape[0] != head.out_features:
            raise ValueError(
                f'{path} holds a {w.shape[0]}-class head ({head_name}.weight {list(w.shape)}) but the model was '
                f'built with {head.out_features} classes. Build it with num_classes={w.shape[0]} (--num-classes '
                f'{w.shape[0]}) to use these weights as they are, or fine-tune them to {head.out_features} '
                f'classes with `aff-zoo finetune`, which replaces the head.')
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Frozen (FrozenBatchNorm2d) checkpoints have no num_batches_tracked: the only tolerated difference.
    missing = [k for k in missing if not k.endswith('num_batches_tracked')]
    if strict and (missing or unexpected):
        raise ValueError(
            f'{path} does not fit this architecture: missing {missing[:5]}, unexpected {unexpected[:5]}. '
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


def load_model(name: str, pretrained: bool = False, device=None, **kwargs) -> torch.nn.Module:
    """``timm.create_model`` on the CPU, then moved to ``device`` (so GPU-trained files load anywhere).
    The torch.hub entrypoints in ``hubconf.py`` are this function with the model name filled in."""
    import timm  # the models are registered: importing this module ran aff_zoo/__init__ (models) first
    device = _check_device(device)
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    return model.to(device) if device is not None else model
