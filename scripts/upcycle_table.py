#!/usr/bin/env python
"""The upcycling table of docs/upcycling.md from run directories (their metrics.json and log.json):
val top-1 per model (mean and each seed) and the paired difference to the add run of the same seed.

    python scripts/upcycle_table.py /work/runs/upcycle/*_resnet20-up-e1-s*
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aff_zoo.publish.report import _recipe_key, load_runs  # noqa: E402


def table(runs) -> str:
    if not runs:
        raise SystemExit('error: no finished runs (metrics.json) found')
    if len({_recipe_key(m) for m in runs}) > 1:
        raise SystemExit('error: the runs do not share one recipe (apart from the seed)')
    by = {}
    for m in runs:
        by.setdefault(m['model'], {})[m['config']['seed']] = m
    base = by.get('add_resnet20', {})
    inits = {m['command'].split('--init-from ')[1].split()[0] for m in runs if '--init-from ' in m['command']}
    lines = ['| model | val top-1 (%) mean | each seed (seed: top-1) | paired diff. to add (points): mean | each seed | '
             'val top-5 (%) mean | params |', '|---|---|---|---|---|---|---|']
    for model in sorted(by, key=lambda k: ('add' in k, k)):
        ms = by[model]
        t1 = [ms[s]['val_top1'] for s in sorted(ms)]
        each = ', '.join(f'{s}: {ms[s]["val_top1"]:.2f}' for s in sorted(ms))
        diffs = {s: ms[s]['val_top1'] - base[s]['val_top1'] for s in sorted(ms) if s in base}
        if model == 'add_resnet20' or not diffs:
            dmean, deach = '–', '–'
        else:
            dmean = f'{statistics.mean(diffs.values()):+.2f}'
            deach = ', '.join(f'{s}: {d:+.2f}' for s, d in diffs.items())
        lines.append(f'| `{model}` | {statistics.mean(t1):.2f} | {each} | {dmean} | {deach} | '
                     f'{statistics.mean(ms[s]["val_top5"] for s in ms):.2f} | {next(iter(ms.values()))["params"]:,} |')
    m = runs[0]
    c = m['config']
    lines += ['', f'All rows start from `{", ".join(sorted(inits)) or "?"}` (upcycled; output = the parent\'s at step 0) '
                  f'and train {c["epochs"]} epoch(s) over {m["train_images"]:,} images: batch {c["batch_size"]}, '
                  f'{c["opt"]} lr {c["lr"]} ({c["warmup_epochs"]} warmup epochs, cosine to {c["min_lr"]}), weight '
                  f'decay {c["weight_decay"]}; validated on {m["val_images"]:,} images ({m["val_split"]}); dataset '
                  f'sha256 {m["dataset_sha256"][:12]}…; git {", ".join(sorted({r["git_commit"][:7] for r in runs}))}.']
    return '\n'.join(lines)


if __name__ == '__main__':
    print(table(load_runs(sys.argv[1:])))
