"""The ``export``, ``publish`` and ``cards`` subcommands."""
from pathlib import Path

from ..models.weights import get_weights


def _cmd_export(args) -> int:
    from .folders import export_run, record_source
    out = args.out or str(Path('hub') / f'{args.arch}.{args.tag}')
    extra = {'label_names': tuple(args.label_names)} if args.label_names else {}
    if args.notes:
        extra['notes'] = args.notes
    record = export_run(args.run_dir, args.arch, args.tag, out, dataset=args.dataset or '', dtype=args.dtype,
                        **extra)
    print(f'wrote {out}: ' + ', '.join(sorted(p.name for p in Path(out).iterdir())))
    print('Add this record to WEIGHTS in aff_zoo/models/weights.py, then run `aff-zoo cards`:\n')
    print(record_source(record))
    return 0


def _cmd_publish(args) -> int:
    from .upload import publish
    record = get_weights(args.name) if args.name else None
    publish(args.folder, record=record, repo_id=args.repo_id, endpoint=args.endpoint, private=args.private,
            token=args.token, dry_run=args.dry_run)
    return 0


def _cmd_cards(args) -> int:
    from .docs import write_generated
    paths = write_generated(Path(args.root), check=args.check)
    for path in paths:
        print(('stale: ' if args.check else 'wrote ') + str(path))
    return 1 if args.check and paths else 0


def register_cli(sub):
    p = sub.add_parser('export')
    p.add_argument('run_dir', help='a finished `aff-zoo train` output dir (model.safetensors, metrics.json, ...)')
    p.add_argument('--arch', required=True, help='registered model name, e.g. aff_resnet20')
    p.add_argument('--tag', required=True, help='weights tag, e.g. cifar10')
    p.add_argument('--out', help='Hub folder to write (default: hub/<arch>.<tag> in the current directory)')
    p.add_argument('--dataset', help='dataset description for the card (default: from metrics.json)')
    p.add_argument('--label-names', nargs='+', help='class names in output order (default: the run\'s classes '
                   'from metrics.json, where it has them)')
    p.add_argument('--dtype', choices=('float32', 'float16', 'bfloat16'), default='float32',
                   help='stored precision (float16: half the file; loads into a float32 model as usual)')
    p.add_argument('--notes', help='a paragraph for the record and the card (how it was trained, caveats)')
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser('publish')
    p.add_argument('folder', help='e.g. hub/aff_resnet20.cifar10')
    p.add_argument('--name', help='registry name arch.tag (default: the folder name)')
    p.add_argument('--repo-id', help='Hub repo (default: the registry\'s, org from AFF_ZOO_HUB_ORG)')
    p.add_argument('--endpoint', help='Hub URL (default: HF_ENDPOINT or https://huggingface.co)')
    p.add_argument('--token', help='write token (default: HF_TOKEN or the saved login)')
    p.add_argument('--private', action='store_true', help='create the repo private')
    p.add_argument('--dry-run', action='store_true', help='list the exact operations, sizes and hashes; upload nothing')
    p.set_defaults(func=_cmd_publish)
    p = sub.add_parser('cards')
    p.add_argument('--root', default='.', help='the aff_zoo checkout (README.md, docs/, hub/, model_cards/); default: .')
    p.add_argument('--check', action='store_true', help='write nothing; list stale files, exit 1 if any')
    p.set_defaults(func=_cmd_cards)
