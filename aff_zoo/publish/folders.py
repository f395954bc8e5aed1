"""Checkpoint folders exactly as their Hub repos hold them: write one from a model or a training run
(``save_pretrained``, ``export_run``), print its registry record, and check one against the registry."""
import copy
import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..models.pretrained import CURVES_NAME, WEIGHTS_NAME
from ..models.weights import Weights
from ..utils import sha256_file
from .cards import model_card


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
        dtype: str = 'float32',
        **record_fields,
) -> Weights:
    """Write ``folder`` as its Hub repo holds it: ``model.safetensors``, ``config.json`` (timm's format:
    architecture, num_classes, num_features, pretrained_cfg) and ``README.md`` (the model card), plus
    ``training_curves.png`` when ``curves`` is given; ``dtype`` is the stored precision. Returns the
    ``Weights`` record describing the file (paste it into ``aff_zoo/models/weights.py`` to register it)."""
    from timm.models import save_for_hf
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
        # timm's public writer (model.safetensors + config.json); it saves state_dict() as it is, and
        # safetensors refuses non-contiguous tensors, so it gets a CPU copy in the default memory format.
        export = copy.deepcopy(model).cpu().to(dtype=getattr(torch, dtype), memory_format=torch.contiguous_format)
        save_for_hf(export, tmp, model_config=dict(pretrained_cfg=pcfg), safe_serialization=True)
        del export
        record = replace(probe, sha256=sha256_file(tmp / WEIGHTS_NAME), size=(tmp / WEIGHTS_NAME).stat().st_size)
        if curves:
            shutil.copyfile(curves, tmp / CURVES_NAME)
        (tmp / 'README.md').write_text(model_card(record, has_curves=(tmp / CURVES_NAME).is_file()))
        _replace_into(tmp, folder)
    return record


def export_run(run_dir, arch: str, tag: str, out, dataset: str = '', dtype: str = 'float32',
               **record_fields) -> Weights:
    """A training run dir (``model.safetensors``, ``metrics.json``, ``log.csv``, ``curves.png``, as written by
    ``aff-zoo train``) -> the Hub folder ``out`` and its ``Weights`` record. The weights must load strictly
    into ``arch``; metrics and the recipe come from ``metrics.json``."""
    import timm
    from safetensors.torch import load_file
    from .. import models  # noqa: F401
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
                   device=m.get('device'), machine=m.get('machine'), world_size=m.get('world_size'),
                   git_commit=m.get('git_commit'), dtype=dtype if dtype != 'float32' else None,
                   dataset_sha256=m.get('dataset_sha256'))
    metrics = {k: v for k, v in metrics.items() if v is not None}
    curves = run_dir / 'curves.png'
    if not record_fields.get('label_names') and m.get('classes'):
        record_fields['label_names'] = tuple(m['classes'])
    return save_pretrained(
        model, out, tag=tag, dataset=dataset or m.get('dataset', ''), metrics=metrics, recipe=m.get('command', ''),
        curves=str(curves) if curves.is_file() else None, dtype=dtype, **record_fields)


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


def validate_folder(folder, record: Weights) -> None:
    """Raise ``ValueError`` listing every way ``folder`` disagrees with ``record``: weight hash and size,
    config.json (architecture, num_classes, pretrained_cfg), the model card (text and metrics)."""
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
