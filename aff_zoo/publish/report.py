"""Tables for docs/training.md from run directories (their metrics.json), so every figure shown comes from a log.

``aff-zoo runs-table --kind ablation RUN_DIR...`` groups runs by model (seeds pooled) and prints
val top-1 mean ± sample std over seeds, the paired difference to the addition baseline of the same architecture
(same seeds), params and training images/s; ``--kind checkpoints`` prints one row per run;
``--against RUN_DIR...`` pairs each model's runs with the same model and seeds there.
``--doc docs/training.md`` replaces the text between ``<!-- {kind}-table:start -->`` and
``<!-- {kind}-table:end -->`` instead of printing (``--section NAME``: other markers).
"""
import glob
import json
import os
import statistics
import sys
from typing import Dict, List, Optional, Sequence

from ..utils import atomic_write_text, replace_section

__all__ = ['load_runs', 'ablation_table', 'paired_table', 'checkpoint_table', 'register_cli']


def load_runs(paths: Sequence[str]) -> List[Dict]:
    """metrics.json of each run directory (globs allowed); unfinished runs (no metrics.json) are skipped."""
    runs = []
    for pattern in paths:
        for d in sorted(glob.glob(pattern)) or [pattern]:
            f = os.path.join(d, 'metrics.json')
            if os.path.isfile(f):
                with open(f) as fh:
                    m = json.load(fh)
                m['run_dir'] = d
                log = os.path.join(d, 'log.json')
                if os.path.isfile(log):  # the least-contended epoch: on a shared machine the mean mostly measures load
                    with open(log) as fh:
                        m['train_images_per_s_max'] = max(r['train_images_per_s'] for r in json.load(fh))
                runs.append(m)
    return runs


def _recipe_key(m: Dict) -> str:
    from ..training.train import RESUME_FREE, TrainConfig
    from dataclasses import asdict
    c = {**asdict(TrainConfig()), **m['config']}  # a field added later (cutout) has its default in older runs
    for k in ('seed', *RESUME_FREE):  # the seed, and what changes how a run executes but not what it learns
        c.pop(k, None)
    return json.dumps([c, m.get('train_images')], sort_keys=True)


def paired_difference(ms: List[Dict], base: List[Dict]) -> str:
    """Top-1 of ``ms`` minus that of ``base`` over the seeds both have: mean ± std of the differences and
    the paired t statistic (|t| below ~4.3 at 3 seeds, ~2.8 at 5, is no evidence at the 5 % level)."""
    by_seed = {m['config']['seed']: m['val_top1'] for m in base}
    d = [m['val_top1'] - by_seed[m['config']['seed']] for m in ms if m['config']['seed'] in by_seed]
    if not d:
        return '–'
    if len(d) == 1:
        return f'{d[0]:+.2f} (1 seed)'
    mean, sd = statistics.mean(d), statistics.stdev(d)
    t = f'{mean / (sd / len(d) ** 0.5):.1f}' if sd > 0 else '∞'
    return f'{mean:+.2f} ± {sd:.2f} ({len(d)} seeds, t = {t})'


def ablation_table(runs: List[Dict], throughput: Optional[Dict] = None) -> str:
    """One row per model; refuses runs whose recipes differ (apart from the seed), so the table is fair.

    ``throughput``: the JSON of ``scripts/benchmark_train_step.py``, adding a controlled images/s column.
    """
    if not runs:
        raise ValueError('No finished runs (metrics.json) found.')
    recipes = {_recipe_key(m) for m in runs}
    if len(recipes) > 1:
        raise ValueError('The runs do not share one recipe (apart from the seed); an ablation table would '
                         'compare unlike things. Pass only same-recipe run directories.')
    by_model: Dict[str, List[Dict]] = {}
    for m in runs:
        by_model.setdefault(m['model'], []).append(m)
    bench = (throughput or {}).get('models', {})
    lines = ['| model | fusion | val top-1 (%) mean ± std | seeds (top-1 each) | minus add, same seeds (points) | '
             'val top-5 (%) | params | train images/s (fastest epoch, shared machine: mostly load) |'
             + (' train-step images/s (benchmark) |' if bench else ''),
             '|---|---|---|---|---|---|---|---|' + ('---|' if bench else '')]
    rows = []
    for model, ms in by_model.items():
        top1 = [m['val_top1'] for m in ms]
        mean = statistics.mean(top1)
        spread = f' ± {statistics.stdev(top1):.2f}' if len(top1) > 1 else ''
        seeds = ', '.join(f'{m["config"]["seed"]}: {m["val_top1"]:.2f}' for m in sorted(ms, key=lambda m: m['config']['seed']))
        fusion, arch = model.split('_', 1) if '_' in model else (model, '')
        base = by_model.get(f'add_{arch}')
        paired = paired_difference(ms, base) if base and fusion != 'add' else '–'
        rows.append((mean, f'| `{model}` | {fusion} | {mean:.2f}{spread} | {seeds} | {paired} | '
                           f'{statistics.mean(m["val_top5"] for m in ms):.2f} | {ms[0]["params"]:,} | '
                           f'{max(m.get("train_images_per_s_max", m["train_images_per_s"]) for m in ms):.0f} |'
                           + (f' {bench[model]["images_per_s"]:.0f} |' if model in bench else (' – |' if bench else ''))))
    lines += [r for _, r in sorted(rows, key=lambda r: -r[0])]
    m = runs[0]
    c = m['config']
    lines.append('')
    lines.append(f'Recipe (all rows): {c["epochs"]} epochs over {m["train_images"]:,} training images, batch '
                 f'{c["batch_size"]}, {c["opt"]} lr {c["lr"]} (cosine, {c["warmup_epochs"]} warmup epochs), '
                 f'weight decay {c["weight_decay"]}; validated on {m["val_images"]:,} images '
                 f'({m["val_split"]}); dataset sha256 {m["dataset_sha256"][:12]}…; '
                 f'git {", ".join(sorted({r["git_commit"][:7] for r in runs}))} (per run in metrics.json).')
    if bench:
        t = throughput['meta']
        lines.append(f'\nTrain-step benchmark: `{t["command"]}` (median of round-robin rounds, batch '
                     f'{t["batch_size"]}, {t["device"]}, {t["threads"]} threads).')
    return '\n'.join(lines)


def paired_table(runs: List[Dict], against: List[Dict]) -> str:
    """One row per model: these runs against the same model's runs of ``against`` with the same seeds, on one
    recipe (what differs is the code, e.g. an initialisation: the git commits are listed)."""
    if not runs or not against:
        raise ValueError('No finished runs (metrics.json) found on one side of the comparison.')
    if len({_recipe_key(m) for m in runs + against}) > 1:
        raise ValueError('The two sets of runs do not share one recipe (apart from the seed); '
                         'pass same-recipe run directories.')
    against = [m for m in against if m['model'] in {r['model'] for r in runs}]
    lines = ['| model | seeds (top-1 these / against) | val top-1 (%) these, mean | against, same seeds, mean | '
             'these minus against (points) |', '|---|---|---|---|---|']
    for model in sorted({m['model'] for m in runs}):
        ms = sorted((m for m in runs if m['model'] == model), key=lambda m: m['config']['seed'])
        base = [m for m in against if m['model'] == model]
        by_seed = {m['config']['seed']: m['val_top1'] for m in base}
        pairs = [(m['config']['seed'], m['val_top1'], by_seed[m['config']['seed']])
                 for m in ms if m['config']['seed'] in by_seed]
        if not pairs:
            raise ValueError(f'{model}: no run of the same model and seed to compare with.')
        seeds = ', '.join(f'{s}: {a:.2f} / {b:.2f}' for s, a, b in pairs)
        lines.append(f'| `{model}` | {seeds} | {statistics.mean(a for _, a, _ in pairs):.2f} | '
                     f'{statistics.mean(b for _, _, b in pairs):.2f} | {paired_difference(ms, base)} |')
    these, other = (', '.join(sorted({r['git_commit'][:7] for r in rs})) for rs in (runs, against))
    c = runs[0]['config']
    lines += ['', f'Recipe (all runs): {c["epochs"]} epochs, batch {c["batch_size"]}, {c["opt"]} lr {c["lr"]}; '
                  f'validated on {runs[0]["val_images"]:,} images. git: these {these}, against {other}.']
    return '\n'.join(lines)


def checkpoint_table(runs: List[Dict]) -> str:
    lines = ['| model | val top-1 (%) | val top-5 (%) | best epoch / epochs | train images | params | '
             'train hours | train images/s (fastest epoch) | run dir |', '|---|---|---|---|---|---|---|---|---|']
    for m in sorted(runs, key=lambda m: m['model']):
        lines.append(
            f'| `{m["model"]}` | {m["val_top1"]:.2f} | {m["val_top5"]:.2f} | {m["best_epoch"]} / {m["epochs"]} | '
            f'{m["train_images"]:,} | {m["params"]:,} | {m["total_train_seconds"] / 3600:.2f} | '
            f'{m.get("train_images_per_s_max", m["train_images_per_s"]):.0f} | `{os.path.basename(m["run_dir"].rstrip("/"))}` |')
    return '\n'.join(lines)


def _cmd_runs_table(args) -> int:
    runs = load_runs(args.runs)
    try:
        throughput = None
        if args.throughput:
            with open(args.throughput) as f:
                throughput = json.load(f)
        if args.against:
            table = paired_table(runs, load_runs(args.against))
        else:
            table = ablation_table(runs, throughput) if args.kind == 'ablation' else checkpoint_table(runs)
        if args.readme:
            with open(args.readme) as f:
                text = f.read()
            new = replace_section(text, args.section or f'{args.kind}-table', table)
            atomic_write_text(args.readme, new)
        else:
            print(table)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


def register_cli(subparsers):
    p = subparsers.add_parser('runs-table', help='markdown table (ablation or checkpoints) from run directories',
                              description=__doc__.splitlines()[0])
    p.add_argument('runs', nargs='+', help='run directories holding metrics.json (globs allowed)')
    p.add_argument('--kind', choices=('ablation', 'checkpoints'), default='ablation')
    p.add_argument('--against', nargs='+', metavar='RUN_DIR',
                   help='a paired table instead: each model of RUNS against its runs here with the same seeds')
    p.add_argument('--throughput', help='JSON written by scripts/benchmark_train_step.py (adds a column)')
    p.add_argument('--doc', '--readme', dest='readme', metavar='PAGE',
                   help='replace the table between this page\'s <!-- KIND-table:start/end --> markers '
                        '(docs/training.md holds both tables)')
    p.add_argument('--section', metavar='NAME',
                   help='markers <!-- NAME:start/end --> instead of KIND-table (a page with two tables of one kind)')
    p.set_defaults(func=_cmd_runs_table)
    return p
