"""Weights on the Hugging Face Hub: write a checkpoint folder (``save_pretrained``), find and verify
a registered weight file (HF cache, then the copy shipped in ``hub/<name>/``, then the Hub), publish
a folder with ``huggingface_hub``, and the ``export`` / ``publish`` / ``cards`` subcommands.

Every weight file loaded for a registry record is checked against the record's sha256 first, and
only safetensors files are ever loaded. The Hub client honours ``HF_ENDPOINT``, ``HF_HOME``,
``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` as usual (all read when it is imported).
"""
import hashlib
import json
import os
import shutil
import socket
import tempfile
import dataclasses
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

import torch

from .train import git_commit
from .weights import Weights, find_weights, get_weights

__all__ = [
    'HashMismatchError', 'WeightsUnavailableError', 'sha256_file', 'shipped_folder', 'weights_file',
    'resolve_pretrained_file', 'save_pretrained', 'load_model', 'export_run', 'validate_folder',
    'publish_plan', 'publish']

WEIGHTS_NAME = 'model.safetensors'
CURVES_NAME = 'training_curves.png'
REPO_ROOT = Path(__file__).resolve().parent.parent


class HashMismatchError(RuntimeError):
    """A weight file whose sha256 differs from the registry's: never loaded."""


class WeightsUnavailableError(RuntimeError):
    """No verified copy of a weight file could be found or downloaded."""


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


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
            f'(aff_zoo/weights.py) expects {record.sha256}. The file is corrupted or not the published one; '
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
    import timm
    from . import models  # noqa: F401  registers the models with timm
    device = _check_device(device)
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    return model.to(device) if device is not None else model


# ---------------------------------------------------------------------------------------------------------
# Writing checkpoint folders


def _replace_into(tmp_dir: Path, folder: Path):
    """Move every file of ``tmp_dir`` into ``folder`` with ``os.replace`` (atomic per file)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in sorted(tmp_dir.iterdir()):
        os.replace(f, folder / f.name)


def save_pretrained(
        model: torch.nn.Module,
        folder,
        tag: Optional[str] = None,
        dataset: str = '',
        metrics: Optional[Dict[str, Any]] = None,
        recipe: str = '',
        curves: Optional[str] = None,
        **record_fields,
) -> Weights:
    """Write ``folder`` as its Hub repo holds it: ``model.safetensors``, ``config.json`` (timm's format:
    architecture, num_classes, num_features, pretrained_cfg) and ``README.md`` (the model card), plus
    ``training_curves.png`` when ``curves`` is given. Returns the ``Weights`` record describing the file
    (paste it into ``aff_zoo/weights.py`` to register it)."""
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf
    from .cards import model_card
    folder = Path(folder)
    cfg = dict(model.pretrained_cfg)
    arch = cfg['architecture']
    tag = tag or cfg.get('tag') or 'custom'
    probe = Weights(arch=arch, tag=tag, sha256='', size=0, num_classes=model.num_classes, dataset=dataset,
                    metrics=dict(metrics or {}), recipe=recipe, **record_fields)
    pcfg = {k: v for k, v in probe.pretrained_cfg().items() if k not in ('hf_hub_id', 'architecture')}
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f'.{folder.name}.') as tmp:
        tmp = Path(tmp)
        # weights: contiguous CPU copies (a channels_last or CUDA model saves as is); config: timm's own writer
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={'format': 'pt'})
        save_config_for_hf(model, tmp / 'config.json', model_config=dict(pretrained_cfg=pcfg))
        record = replace(probe, sha256=sha256_file(tmp / WEIGHTS_NAME), size=(tmp / WEIGHTS_NAME).stat().st_size)
        if curves:
            shutil.copyfile(curves, tmp / CURVES_NAME)
        (tmp / 'README.md').write_text(model_card(record, has_curves=(tmp / CURVES_NAME).is_file()))
        _replace_into(tmp, folder)
    return record


def export_run(run_dir, arch: str, tag: str, out, dataset: str = '', **record_fields) -> Weights:
    """A training run dir (``model.safetensors``, ``metrics.json``, ``log.csv``, ``curves.png``, as written by
    ``aff-zoo train``) -> the Hub folder ``out`` and its ``Weights`` record. The weights must load strictly
    into ``arch``; metrics and the recipe come from ``metrics.json``."""
    import timm
    from safetensors.torch import load_file
    from . import models  # noqa: F401
    run_dir = Path(run_dir)
    weights, metrics_path = run_dir / WEIGHTS_NAME, run_dir / 'metrics.json'
    for p in (weights, metrics_path):
        if not p.is_file():
            raise FileNotFoundError(f'{p} is missing: export needs a finished run dir written by `aff-zoo train`.')
    m = json.loads(metrics_path.read_text())
    if m.get('model') and m['model'] != arch:
        raise ValueError(f'{run_dir} trained {m["model"]!r}, not {arch!r}; pass --arch {m["model"]}.')
    state = load_file(str(weights))
    num_classes = m.get('num_classes') or next(v.shape[0] for k, v in state.items() if k.endswith('fc.weight'))
    model = timm.create_model(arch, num_classes=num_classes)
    model.load_state_dict(state, strict=True)
    metrics = dict(top1=m['val_top1'], top5=m.get('val_top5'), split=m.get('val_split', ''), epochs=m.get('epochs'),
                   best_epoch=m.get('best_epoch'), train_images=m.get('train_images'), val_images=m.get('val_images'),
                   train_seconds=m.get('total_train_seconds'),
                   device=m.get('device'), world_size=m.get('world_size'), git_commit=m.get('git_commit'),
                   dataset_sha256=m.get('dataset_sha256'))
    metrics = {k: v for k, v in metrics.items() if v is not None}
    curves = run_dir / 'curves.png'
    if not record_fields.get('label_names') and m.get('classes'):
        record_fields['label_names'] = tuple(m['classes'])
    return save_pretrained(
        model, out, tag=tag, dataset=dataset or m.get('dataset', ''), metrics=metrics, recipe=m.get('command', ''),
        curves=str(curves) if curves.is_file() else None, **record_fields)


def record_source(record: Weights) -> str:
    """``record`` as Python source, ready to paste into ``WEIGHTS`` (lines under 120 characters)."""
    import textwrap
    from dataclasses import fields

    def fmt(v, indent):
        if isinstance(v, str) and len(v) > 90:
            parts = textwrap.wrap(v, 90, drop_whitespace=False, break_on_hyphens=False)
            return ('\n' + ' ' * (indent + 4)).join(repr(p) for p in parts)
        if isinstance(v, dict) and len(repr(v)) > 90:
            items = [f'{k!r}: {fmt(x, indent + 4)}' for k, x in v.items()]
            return '{\n' + ''.join(f'{" " * (indent + 4)}{i},\n' for i in items) + ' ' * indent + '}'
        return repr(v)

    parts = []
    for f in fields(Weights):
        v = getattr(record, f.name)
        if (f.default is not dataclasses.MISSING and f.default == v) or (f.name == 'extra' and not v):
            continue
        parts.append(f'    {f.name}={fmt(v, 4)},')
    return 'Weights(\n' + '\n'.join(parts) + '\n),'


# ---------------------------------------------------------------------------------------------------------
# Publishing


def validate_folder(folder, record: Weights) -> None:
    """Raise ``ValueError`` listing every way ``folder`` disagrees with ``record``: weight hash and size,
    config.json (architecture, num_classes, pretrained_cfg), the model card (text and metrics)."""
    from .cards import model_card
    folder = Path(folder)
    problems = []
    weights = folder / record.filename
    if not weights.is_file():
        problems.append(f'{weights} is missing')
    else:
        digest, size = sha256_file(weights), weights.stat().st_size
        if digest != record.sha256:
            problems.append(f'{weights.name}: sha256 {digest} != registry {record.sha256}')
        if size != record.size:
            problems.append(f'{weights.name}: {size} bytes != registry {record.size}')
    cfg_path = folder / 'config.json'
    if not cfg_path.is_file():
        problems.append(f'{cfg_path} is missing')
    else:
        cfg = json.loads(cfg_path.read_text())
        pcfg = cfg.get('pretrained_cfg', {})
        for key, want, got in [
                ('architecture', record.arch, cfg.get('architecture')),
                ('num_classes', record.num_classes, cfg.get('num_classes')),
                ('pretrained_cfg.tag', record.tag, pcfg.get('tag')),
                ('pretrained_cfg.input_size', list(record.input_size), pcfg.get('input_size')),
                ('pretrained_cfg.mean', list(record.mean), pcfg.get('mean')),
                ('pretrained_cfg.std', list(record.std), pcfg.get('std')),
                ('pretrained_cfg.interpolation', record.interpolation, pcfg.get('interpolation')),
                ('pretrained_cfg.crop_pct', record.crop_pct, pcfg.get('crop_pct')),
                ('pretrained_cfg.label_names', list(record.label_names) or None, pcfg.get('label_names'))]:
            if want != got:
                problems.append(f'config.json {key}: {got!r} != registry {want!r}')
    card = folder / 'README.md'
    if not card.is_file():
        problems.append(f'{card} (model card) is missing')
    elif card.read_text() != model_card(record, has_curves=(folder / CURVES_NAME).is_file()):
        problems.append(f'{card} (model card) differs from the card generated from the registry (metrics or text); '
                        f'regenerate it with `aff-zoo cards`')
    if problems:
        raise ValueError(f'{folder} does not match the registry record {record.name}:\n  - ' + '\n  - '.join(problems))


def publish_plan(folder, record: Weights, repo_id: Optional[str] = None):
    """``(repo_id, commit message, [CommitOperationAdd])``: exactly what ``publish`` sends."""
    from huggingface_hub import CommitOperationAdd
    folder = Path(folder)
    validate_folder(folder, record)
    files = sorted(p for p in folder.rglob('*') if p.is_file() and not any(s.startswith('.') for s in p.parts[
        len(folder.parts):]))
    ops = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files]
    message = (f'{record.name}: weights sha256 {record.sha256[:12]}, top-1 {record.top1}; '
               f'aff_zoo code at git commit {git_commit()}')
    return repo_id or record.hf_hub_id, message, ops


def publish(folder, record: Optional[Weights] = None, repo_id: Optional[str] = None, endpoint: Optional[str] = None,
            private: bool = False, token: Optional[str] = None, dry_run: bool = False, log=print):
    """Validate ``folder`` against the registry, then ``create_repo(exist_ok=True)`` and one commit holding
    the plan's operations (what ``upload_folder`` does, with the listed files exactly). ``dry_run``: list
    the repo, the commit message and each operation's size and sha256, upload nothing."""
    folder = Path(folder)
    record = record or get_weights(folder.name)
    repo_id, message, ops = publish_plan(folder, record, repo_id)
    endpoint = endpoint or _endpoint()
    log(f'{"[dry-run] " if dry_run else ""}repo {repo_id} on {endpoint} ({"private" if private else "public"})')
    log(f'commit message: {message}')
    for op in ops:
        log(f'  add {op.path_in_repo:<24} {op.upload_info.size:>12} bytes  sha256 {op.upload_info.sha256.hex()}')
    if dry_run:
        log('[dry-run] nothing uploaded')
        return None
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
        info = api.create_commit(repo_id, operations=ops, commit_message=message, repo_type='model')
    except HfHubHTTPError as e:
        status = getattr(getattr(e, 'response', None), 'status_code', None)
        hint = {401: 'the token is missing or invalid (HF_TOKEN, `hf auth login`, or --token)',
                403: f'the token may not write to {repo_id}',
                404: f'{endpoint} has no write API here (a read-only mirror?)',
                405: f'{endpoint} has no write API here (a read-only mirror?)'}.get(status, 'see the error above')
        raise RuntimeError(f'Publishing {folder} to {repo_id} on {endpoint} failed (HTTP {status}): {hint}.\n{e}') \
            from None
    log(f'published: {info.commit_url}')
    return info


# ---------------------------------------------------------------------------------------------------------
# Console subcommands


def _cmd_export(args) -> int:
    out = args.out or str(Path('hub') / f'{args.arch}.{args.tag}')
    extra = {'label_names': tuple(args.label_names)} if args.label_names else {}
    record = export_run(args.run_dir, args.arch, args.tag, out, dataset=args.dataset or '', **extra)
    print(f'wrote {out}: ' + ', '.join(sorted(p.name for p in Path(out).iterdir())))
    print('Add this record to WEIGHTS in aff_zoo/weights.py, then run `aff-zoo cards`:\n')
    print(record_source(record))
    return 0


def _cmd_publish(args) -> int:
    record = get_weights(args.name) if args.name else None
    publish(args.folder, record=record, repo_id=args.repo_id, endpoint=args.endpoint, private=args.private,
            token=args.token, dry_run=args.dry_run)
    return 0


def _cmd_cards(args) -> int:
    from .cards import write_cards
    paths = write_cards(Path(args.root), check=args.check)
    for path in paths:
        print(('stale: ' if args.check else 'wrote ') + str(path))
    return 1 if args.check and paths else 0


def register_cli(sub):
    p = sub.add_parser('export', help='training run dir -> Hub folder (safetensors, config, card) + registry record')
    p.add_argument('run_dir', help='a finished `aff-zoo train` output dir (model.safetensors, metrics.json, ...)')
    p.add_argument('--arch', required=True, help='registered model name, e.g. aff_resnet20')
    p.add_argument('--tag', required=True, help='weights tag, e.g. cifar10')
    p.add_argument('--out', help='Hub folder to write (default: hub/<arch>.<tag> in the current directory)')
    p.add_argument('--dataset', help='dataset description for the card (default: from metrics.json)')
    p.add_argument('--label-names', nargs='+', help='class names in output order (default: the run\'s classes '
                   'from metrics.json, where it has them)')
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser('publish', help='validate a Hub folder against the registry and upload it')
    p.add_argument('folder', help='e.g. hub/aff_resnet20.cifar10')
    p.add_argument('--name', help='registry name arch.tag (default: the folder name)')
    p.add_argument('--repo-id', help='Hub repo (default: the registry\'s, org from AFF_ZOO_HUB_ORG)')
    p.add_argument('--endpoint', help='Hub URL (default: HF_ENDPOINT or https://huggingface.co)')
    p.add_argument('--token', help='write token (default: HF_TOKEN or the saved login)')
    p.add_argument('--private', action='store_true', help='create the repo private')
    p.add_argument('--dry-run', action='store_true', help='list the exact operations, sizes and hashes; upload nothing')
    p.set_defaults(func=_cmd_publish)
    p = sub.add_parser('cards', help='regenerate model cards, hub/*/README.md and the README weights table')
    p.add_argument('--root', default='.', help='the aff_zoo checkout (README.md, hub/, model_cards/); default: .')
    p.add_argument('--check', action='store_true', help='write nothing; list stale files, exit 1 if any')
    p.set_defaults(func=_cmd_cards)
