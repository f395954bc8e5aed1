"""Model cards and the README weights table, generated from the registry (``aff_zoo.models.weights``), whose
metrics and recipe come from the training logs at export time. Never edited by hand: ``aff-zoo cards``
(``aff_zoo.publish.docs.write_generated``) rewrites ``model_cards/<name>.md``, ``hub/<name>/README.md`` and
the README table with the other generated sections; ``tests/test_registry.py`` fails when any is stale."""
from pathlib import Path
from typing import List, Sequence

from ..models.weights import CODE_REPO, Upcycled, Weights
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
    rows = [('top-1 (%)', m.get('top1')), ('top-5 (%)', m.get('top5')),
            ('top-1 with flip test-time augmentation (%)', m.get('top1_flip')), ('evaluation split', m.get('split')),
            ('epochs', m.get('epochs')), ('best epoch', m.get('best_epoch')),
            ('training images', m.get('train_images')), ('validation images', m.get('val_images')),
            ('training time (s)', m.get('train_seconds')), ('trained on', m.get('machine') or m.get('device')),
            ('code commit', m.get('git_commit')), ('stored precision', m.get('dtype'))]
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


def upcycled_card(u: Upcycled) -> str:
    """The model card of an upcycled record: what the weights are (the parent's, AFF untrained), nothing more."""
    fusion = u.arch.split('_', 1)[0]
    c, h, w_ = u.input_size
    pin = (f'revision `{u.revision}`, file `{u.filename}` sha256 `{u.sha256}` ({u.size} bytes), checked before every '
           f'load' if u.revision else
           f'not pinned yet (the file is checked against the digest the Hub reports for it; `aff-zoo pin-parents` '
           f'pins the revision and sha256)')
    test = (f'; test size {u.test_input_size[1]}x{u.test_input_size[2]}, crop {u.test_crop_pct}'
            if u.test_input_size else '')
    return f"""---
library_name: timm
license: {u.license}
pipeline_tag: image-classification
tags:
- image-classification
- timm
- aff_zoo
- attentional-feature-fusion
- upcycled
datasets:
- {u.dataset_id}
base_model: {u.parent_repo}
---

# {u.name}

`{u.arch}` with {_FUSION_TEXT.get(fusion, fusion)}, from the [aff_zoo](https://github.com/{CODE_REPO}) model
zoo, **upcycled** from timm's plain `{u.parent}` ([{u.parent_repo}](https://huggingface.co/{u.parent_repo})).

**What these weights are.** Every plain tensor (stem, convolutions, BatchNorms, shortcuts, classifier) is the
parent's ImageNet-1k weight. The AFF modules are **untrained**: each starts with zero attention logits, so it
computes exactly the addition it replaces, and the model's output equals the parent's at load time (tested to a
relative difference of 1e-5). The attention learns only when you fine-tune. {u.notes}

**Accuracy.** No AFF ImageNet accuracy is claimed. At load time the model's ImageNet-1k accuracy is the
parent's: top-1 {u.parent_top1:.3f} %, top-5 {u.parent_top5:.3f} % ({u.parent_eval}), from {u.results_source}.
The parent file: Hub repo `{u.parent_repo}`, {pin}.

## How to use

```python
import aff_zoo, timm
model = timm.create_model('{u.name}', pretrained=True).eval()  # downloads the parent's file, then upcycles
cfg = timm.data.resolve_data_config({{}}, model=model)  # the parent's: {h}x{w_}, crop {u.crop_pct}, {u.interpolation}
transform = timm.data.create_transform(**cfg)
```

With torch.hub: `torch.hub.load('{CODE_REPO}', '{u.name}', pretrained=True, device='cuda')`. Or upcycle any
plain peer yourself: `aff_zoo.upcycle('{u.arch}', timm.create_model('{u.parent}', pretrained=True))`.

Preprocessing (the parent's): input {c}x{h}x{w_}, resize with {u.interpolation} interpolation, crop_pct
{u.crop_pct}{test}, mean {u.mean}, std {u.std}.

## Fine-tuning

```python
model = timm.create_model('{u.name}', pretrained=True, num_classes=N)  # new head, warning names the skipped keys
```

or `aff-zoo finetune --model {u.name} --pretrained --data my_images/ ...` (see docs/upcycling.md).

## Licence and citation

The weights are the parent's, under its licence: {u.license}. Cite the parent's weights and timm, and the
AFF paper for the architecture:

```bibtex
{u.parent_citation}
```

```bibtex
{u.citation}
```
"""


def upcycled_table(records: Sequence[Upcycled]) -> str:
    """Markdown table of the upcycled weights (the README's weights section, after the trained files)."""
    head = ('| weights (upcycled: AFF modules untrained, output = the parent\'s) | parent (timm) | parent top-1 / top-5 '
            '(%, ImageNet-1k, timm results table) | evaluated at | parent pinned |\n|---|---|---|---|---|\n')
    return head + ''.join(
        f'| `{u.name}` | [{u.parent}](https://huggingface.co/{u.parent_repo}) | {u.parent_top1:.3f} / '
        f'{u.parent_top5:.3f} | {u.parent_eval} | {("`" + u.revision[:10] + "`") if u.revision else "not yet"} |\n'
        for u in records)


def weights_table(records: Sequence[Weights]) -> str:
    """Markdown table of every registered weight file (the README's "Pretrained weights" table)."""
    upcycled = [r for r in records if isinstance(r, Upcycled)]
    records = [r for r in records if not isinstance(r, Upcycled)]
    tail = '\n' + upcycled_table(upcycled) if upcycled else ''
    head = ('| weights (link: Hub repo) | top-1 (%) | top-5 (%) | top-1, flip TTA (%) | epochs | dataset | size (MB) '
            '| sha256 |\n'
            '|---|---|---|---|---|---|---|---|\n')
    if not records:
        return head + '| (none published yet) | | | | | | | |\n' + tail
    return head + ''.join(
        f'| [`{w.name}`](https://huggingface.co/{w.hf_hub_id}) | {_fmt(w.top1)} | {_fmt(w.top5)} '
        f'| {_fmt(w.metrics.get("top1_flip"))} | {_fmt(w.metrics.get("epochs"))} | {w.dataset_id} '
        f'| {w.size / 1e6:.2f} | `{w.sha256[:12]}` |\n'
        for w in records) + tail


def expected_files(root, records: Sequence[Weights]) -> dict:
    """``{path: text}`` for the cards (model_cards/ and hub/<name>/README.md) and the README with its weights
    table (``aff_zoo.publish.docs`` adds the other generated sections)."""
    root = Path(root)
    out = {}
    for w in records:
        if isinstance(w, Upcycled):  # no file or Hub repo of ours: the card only
            out[root / 'model_cards' / f'{w.name}.md'] = upcycled_card(w)
            continue
        card = model_card(w, has_curves=(root / 'hub' / w.name / 'training_curves.png').is_file())
        out[root / 'model_cards' / f'{w.name}.md'] = card
        out[root / 'hub' / w.name / 'README.md'] = card
    out[root / 'README.md'] = replace_section((root / 'README.md').read_text(), 'weights', weights_table(records))
    return out


def write_cards(root, check: bool = False) -> List[Path]:
    """Rewrite the cards and the README weights table where they differ from the registry (``check``: only
    list them)."""
    from ..models import weights
    return write_changed(expected_files(root, weights.WEIGHTS + weights.UPCYCLED), check)
