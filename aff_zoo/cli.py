"""``aff-zoo``: the console command. ``list`` and ``classify`` live here; other subcommands are
registered by the module that implements them (see ``_COMMAND_MODULES``)."""
import argparse
import importlib
import sys
from typing import List, Optional

# Modules that define ``register_cli(subparsers)``; each adds its own subcommand(s).
_COMMAND_MODULES: List[str] = [
    'aff_zoo.training.train', 'aff_zoo.training.evaluate', 'aff_zoo.training.finetune', 'aff_zoo.publish.report',
    'aff_zoo.publish.commands', 'aff_zoo.deploy.benchmark', 'aff_zoo.deploy.export', 'aff_zoo.deploy.quantize']

DEFAULT_MODEL = 'aff_resnext50'


def _cmd_list(args) -> int:
    from .models.stats import models_table
    table = models_table(args.pattern, args.format)
    if not table:
        print(f'No aff_zoo model matches {args.pattern!r}; `aff-zoo list` shows all of them.', file=sys.stderr)
        return 2
    print(table)
    return 0


def _load_image(path: str):
    from PIL import Image, UnidentifiedImageError
    try:
        return Image.open(path).convert('RGB')
    except FileNotFoundError:
        raise SystemExit(f'aff-zoo classify: no such image file: {path}')
    except (UnidentifiedImageError, OSError) as e:
        raise SystemExit(f'aff-zoo classify: cannot read {path} as an image ({e}); give a JPEG/PNG file.')


def _label_names(model) -> Optional[List[str]]:
    names = model.pretrained_cfg.get('label_names')
    if names and len(names) == model.num_classes:
        return list(names)
    if model.pretrained_cfg.get('num_classes') == 1000 and model.num_classes == 1000:
        from timm.data import ImageNetInfo
        return list(ImageNetInfo().label_descriptions(as_dict=True).values())
    return None


def _cmd_classify(args) -> int:
    import timm
    import torch
    from timm.data import create_transform, resolve_data_config
    kwargs = {}
    if args.weights:
        kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=args.weights))
    elif args.pretrained:
        kwargs = dict(pretrained=True)
    model = timm.create_model(args.model, **kwargs).eval()
    if not kwargs:
        print(f'note: {args.model} has random weights (no --pretrained/--weights given); the classes are noise.',
              file=sys.stderr)
    transform = create_transform(**resolve_data_config({}, model=model))
    labels = _label_names(model)
    batch = torch.stack([transform(_load_image(p)) for p in args.images])
    with torch.no_grad():
        probs = model(batch).softmax(-1)
    k = min(args.topk, probs.shape[-1])
    top_p, top_i = probs.topk(k, dim=-1)
    for path, ps, idx in zip(args.images, top_p.tolist(), top_i.tolist()):
        print(path)
        for p, i in zip(ps, idx):
            label = labels[i] if labels else f'class {i}'
            print(f'  {p * 100:6.2f}%  {label}')
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='aff-zoo', description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('list', help='list the zoo as a table (parameters, GMACs, published weights)')
    p.add_argument('pattern', nargs='?', default='*', help='wildcard filter, e.g. "iaff_*"')
    p.add_argument('--format', choices=['text', 'markdown'], default='text')
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser('classify', help='classify image files with a zoo model')
    p.add_argument('images', nargs='+', help='image files (JPEG, PNG, ...)')
    p.add_argument('--model', '-m', default=DEFAULT_MODEL,
                   help=f'model name, optionally with a weights tag (default {DEFAULT_MODEL})')
    p.add_argument('--pretrained', action='store_true', help='load the published weights of --model')
    p.add_argument('--weights', help='a local model.safetensors to load instead')
    p.add_argument('--topk', type=int, default=5)
    p.set_defaults(func=_cmd_classify)

    for mod in _COMMAND_MODULES:
        importlib.import_module(mod).register_cli(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import aff_zoo  # noqa: F401  (registers the models with timm)
    try:
        return args.func(args) or 0
    except (ValueError, RuntimeError, KeyError) as e:
        # Our errors are written to be read: show the message, not a traceback.
        print(f'aff-zoo {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
