"""Model cards and the README weights table, generated from the registry (``aff_zoo.models.weights``), whose
metrics and recipe come from the training logs at export time. Never edited by hand: ``aff-zoo cards``
(``aff_zoo.publish.docs.write_generated``) rewrites ``model_cards/<name>.md``, ``hub/<name>/README.md`` and
the README table with the other generated sections; ``tests/test_registry.py`` fails when any is stale."""
from pathlib import Path
from typing import List, Sequence

from ..models.weights import CODE_REPO, Weights
from ..utils import replace_section, write_changed


_FUSION_TEXT = {
    'aff': 'AFF (attentional feature fusion: Z = M(X+Y)*X + (1-M(X+Y))*Y with a multi-scale channel attention '
           'module M)',
    'iaff': 'iAFF (iterative AFF: the initial X+Y inside M is itself an AFF with its own MS-CAM)',
    'add': 'plain addition (the ResNet baseline)',
    'se': 'SE-style global channel attention fusion (baseline)',
    'sk': 'SK-style selective fusion (baseline)',
    'local': 'local-only MS-CAM fusion (baseline)',
}


def _fmt(v) -> str:
    return '-' if v is None else (f'{v:.2f}' if isinstance(v, float) else str(v))


def _yaml_header(w: Weights) -> str:
    m = w.metrics
    metrics = ''.join(
        f'      - type: accuracy\n        name: {label}\n        value: {m[key]}\n'
        for key, label in (('top1', 'top-1 accuracy'), ('top5', 'top-5 accuracy')) if m.get(key) is not None)
    return (
        '---\n'
        'library_name: timm\n'
        f'license: {w.license}\n'
        'pipeline_tag: image-classification\n'
        'tags:\n- image-classification\n- timm\n- aff_zoo\n- attentional-feature-fusion\n'
        f'datasets:\n- {w.dataset_id}\n'
        'model-index:\n'
        f'- name: {w.name}\n'
        '  results:\n'
        '  - task:\n      type: image-classification\n      name: Image Classification\n'
        f'    dataset:\n      type: {w.dataset_id}\n      name: {w.dataset_id}\n'
        f'      split: {m.get("split", "validation")!r}\n'
        f'    metrics:\n{metrics}'
        '---\n')


def model_card(w: Weights, has_curves: bool = False) -> str:
    """The Hub model card (``README.md`` of the repo) for one registry record."""
    fusion = w.arch.split('_', 1)[0]
    m = w.metrics
    rows = [('top-1 (%)', m.get('top1')), ('top-5 (%)', m.get('top5')), ('evaluation split', m.get('split')),
            ('epochs', m.get('epochs')), ('best epoch', m.get('best_epoch')),
            ('training images', m.get('train_images')), ('validation images', m.get('val_images')),
            ('training time (s)', m.get('train_seconds')), ('trained on', m.get('device')),
            ('code commit', m.get('git_commit'))]
    metric_rows = ''.join(f'| {k} | {_fmt(v)} |\n' for k, v in rows if v is not None)
    c, h, _ = w.input_size
    curves = (f'\n![training curves](training_curves.png)\n\nLoss and accuracy per epoch, from the training log.\n'
              if has_curves else '')
    notes = f'\n{w.notes}\n' if w.notes else ''
    return f"""{_yaml_header(w)}
# {w.name}

`{w.arch}` with {_FUSION_TEXT.get(fusion, fusion)}, from the [aff_zoo](https://github.com/{CODE_REPO})
model zoo, a timm implementation of *Attentional Feature Fusion* (Dai et al., WACV 2021, arXiv:2009.14082).
Trained on {w.dataset or w.dataset_id}; {w.num_classes} classes, input {c}x{h}x{w.input_size[2]}.
{notes}
## Results

| metric | value |
|---|---|
{metric_rows}
## How to use

With timm (`pip install aff-zoo`; `import aff_zoo` registers the models). The file is checked against
the sha256 in aff_zoo's registry before it is loaded:

```python
import aff_zoo, timm
model = timm.create_model('{w.name}', pretrained=True).eval()
cfg = timm.data.resolve_data_config({{}}, model=model)  # mean {w.mean}, std {w.std}
transform = timm.data.create_transform(**cfg)
```

Straight from this repo with timm: `timm.create_model('hf-hub:{w.hf_hub_id}', pretrained=True)` (after `import aff_zoo`).

With torch.hub (loads on the CPU, then moves to `device`):

```python
import torch
model = torch.hub.load('{CODE_REPO}', '{w.name}', pretrained=True, device='cuda')  # or device=None: CPU
```

## Fine-tuning

Pass your number of classes; the classifier is re-initialised (a warning names the skipped keys) and the
rest is loaded; then train as usual, e.g. with a smaller learning rate than from scratch:

```python
model = timm.create_model('{w.name}', pretrained=True, num_classes=N)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
```

## Training

Weights file `{w.filename}`: {w.size} bytes, sha256 `{w.sha256}`. Recipe (the exact command):

```
{w.recipe or '(not recorded)'}
```

Preprocessing at evaluation: resize with {w.interpolation} interpolation, crop_pct {w.crop_pct}, normalise
with mean {w.mean} and std {w.std}.
{curves}
## Limitations

Trained on {w.dataset_id} only, at {h}x{w.input_size[2]} pixels: expect accuracy to drop on other image
statistics or sizes; no robustness or fairness evaluation was done. The figures above come from the
training run recorded here (its command, code commit and device), not from the paper.

## Citation

```bibtex
{w.citation}
```
"""


def weights_table(records: Sequence[Weights]) -> str:
    """Markdown table of every registered weight file (the README's "Pretrained weights" table)."""
    head = ('| weights | top-1 (%) | top-5 (%) | epochs | dataset | Hub repo | size (MB) | sha256 |\n'
            '|---|---|---|---|---|---|---|---|\n')
    if not records:
        return head + '| (none published yet) | | | | | | | |\n'
    return head + ''.join(
        f'| `{w.name}` | {_fmt(w.top1)} | {_fmt(w.top5)} | {_fmt(w.metrics.get("epochs"))} | {w.dataset_id} '
        f'| [{w.hf_hub_id}](https://huggingface.co/{w.hf_hub_id}) | {w.size / 1e6:.2f} | `{w.sha256[:12]}` |\n'
        for w in records)


def expected_files(root, records: Sequence[Weights]) -> dict:
    """``{path: text}`` for the cards (model_cards/ and hub/<name>/README.md) and the README with its weights
    table (``aff_zoo.publish.docs`` adds the other generated sections)."""
    root = Path(root)
    out = {}
    for w in records:
        card = model_card(w, has_curves=(root / 'hub' / w.name / 'training_curves.png').is_file())
        out[root / 'model_cards' / f'{w.name}.md'] = card
        out[root / 'hub' / w.name / 'README.md'] = card
    out[root / 'README.md'] = replace_section((root / 'README.md').read_text(), 'weights', weights_table(records))
    return out


def write_cards(root, check: bool = False) -> List[Path]:
    """Rewrite the cards and the README weights table where they differ from the registry (``check``: only
    list them)."""
    from ..models import weights
    return write_changed(expected_files(root, weights.WEIGHTS), check)
