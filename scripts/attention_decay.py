"""Which attention units of a published file learned nothing? The table behind docs/cifar10-weights.md's
"What the attention learned".

A norm scale that starts at 1 and never gets a gradient still moves: weight decay shrinks it, step by step, by the
run's own optimizer and schedule. This script replays that (the record's recipe, a zero gradient, up to the
published epoch) and compares every scale of every fusion's MS-CAM with the result. Scales within 2x of it got no
net gradient in the whole run: that unit was dead from the start. Where the recipe keeps decay off norms, such a
scale stays at 1, and one within 1 % of it counts.

    python scripts/attention_decay.py --doc docs/cifar10-weights.md  # its tables (default: the docs' five files)
    python scripts/attention_decay.py iaff_resnet9.cifar10_e96         # any published file, printed
"""
import argparse
import re
import shlex
from collections import defaultdict
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

import aff_zoo  # noqa: F401  (registers the models)
from aff_zoo.cli import build_parser
from aff_zoo.models.weights import WEIGHTS
from aff_zoo.training.train import TrainConfig, config_from_args, create_optimizer, create_scheduler
from aff_zoo.utils import atomic_write_text, replace_section

ROOT = Path(__file__).resolve().parents[1]
UNMOVED = 0.01  # a scale within min(decay-only value, this) of that value never trained: <= 2x the value under
# decay, within 1 % of its start where the recipe keeps decay off norms (it stays at 1 without a gradient)


def recipe_config(recipe: str) -> TrainConfig:
    """A record's exact ``aff-zoo train`` command as the TrainConfig it ran with."""
    return config_from_args(build_parser('train').parse_args(shlex.split(recipe)[1:]))


def decay_only(cfg: TrainConfig, updates_per_epoch: int, epochs: int) -> float:
    """What the run's optimizer and lr schedule leave of a norm scale that starts at 1 and gets a zero gradient."""
    norm = torch.nn.GroupNorm(1, 1).double()  # one norm scale (and bias), in the run's own weight-decay group
    opt = create_optimizer(norm, cfg)
    sched = create_scheduler(opt, cfg, updates_per_epoch)
    for u in range(epochs * updates_per_epoch):
        sched.step_update(u + 1)  # as train.py's loop: before update u
        for p in norm.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    return float(norm.weight.detach())


def attention_rows(name: str) -> tuple:
    """(decay-only value, [(attention, {branch: (scales, share dead %)})]) for a published file."""
    w = next((w for w in WEIGHTS if w.name == name), None)
    if w is None:
        raise SystemExit(f'{name}: no such weight record (see `aff-zoo list --weights`)')
    cfg = recipe_config(w.recipe)
    updates = -(-(w.metrics['train_images'] // cfg.batch_size) // cfg.accum_steps)  # drop_last, as train.py
    floor = decay_only(cfg, updates, w.metrics.get('best_epoch', cfg.epochs))
    trained = load_file(str(ROOT / 'hub' / name / w.filename))
    init = timm.create_model(w.arch, num_classes=w.num_classes).state_dict()
    scales = defaultdict(lambda: defaultdict(list))
    for key, v in trained.items():
        m = re.match(r'(.*\.fusion\.att\d?)\.(local|global)_att\.(bn\d|norm)\.weight$', key)
        if m:  # zero-initialised scales (the outer attention's last BN) start at 0, not 1: left out
            scales[m.group(1)][m.group(2)].append(v.float().abs()[init[key] == 1])
    rows = []
    for att, branches in scales.items():
        cells = {}
        for branch, parts in branches.items():
            s = torch.cat(parts)
            cells[branch] = (s.numel(), 100.0 * float(((s - floor).abs() <= min(floor, UNMOVED)).double().mean()))
        rows.append((att, cells))
    return floor, rows


DOC_NAMES = ('iaff_resnet11.cifar10_mix_e150', 'aff_resnet11.cifar10_mix_e150', 'aff_resnet11.cifar10_e96',
             'iaff_resnet9.cifar10_e96', 'aff_resnet9.cifar10_e96')  # the ResNet-9s: trained from a random attention


def render(names) -> str:
    """One markdown table per file: for each MS-CAM, how many of its norm scales never trained, by branch."""
    out = []
    for name in names:
        floor, rows = attention_rows(name)
        out += [f'`{name}`: weight decay alone leaves {floor:.2e} of a norm scale that starts at 1', '',
                '| attention | local branch: scales at the decay-only value | global branch: the same |',
                '|---|---|---|']
        for att, cells in rows:
            local, glob = (f'{cells[b][1]:.0f} % of {cells[b][0]}' if b in cells else '-' for b in ('local', 'global'))
            out.append(f'| `{att}` | {local} | {glob} |')
        out.append('')
    return '\n'.join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('names', nargs='*', default=list(DOC_NAMES), help='published weight names (default: the docs\' '
                    'five, ' + ', '.join(DOC_NAMES) + ')')
    ap.add_argument('--doc', help='write the tables into this markdown file, between the --section markers')
    ap.add_argument('--section', default='attention-decay-table', help='the marker name (<!-- NAME:start -->)')
    args = ap.parse_args(argv)
    text = render(args.names)
    if args.doc:
        page = Path(args.doc).read_text()
        atomic_write_text(args.doc, replace_section(page, args.section, text))
        print(f'{args.doc}: section {args.section} updated')
    else:
        print(text)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
