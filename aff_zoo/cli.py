"""``aff-zoo``: the console command, on top of every layer (nothing imports it).

``COMMANDS`` names each subcommand, the module that implements it (with ``register_cli(subparsers)``) and
its one-line help: the parser lists every command from this table, and imports a command's module only
when that command runs (or shows its own ``--help``). ``list`` and ``classify`` live here.
"""
import argparse
import importlib
import sys
from typing import Dict, List, NamedTuple, Optional

DESCRIPTION = """The Attentional Feature Fusion model zoo (Dai et al., WACV 2021) from the command line:
list the models, classify images, train, evaluate, fine-tune, export (ONNX, TorchScript, .pt2), quantise, benchmark,
and write Hub checkpoint folders and model cards."""
EPILOG = """`aff-zoo COMMAND --help` shows a command's options. Documentation: README.md and docs/*.md of
https://github.com/aff-zoo/aff_zoo."""


class Command(NamedTuple):
    module: str  # defines register_cli(subparsers)
    help: str


COMMANDS: Dict[str, Command] = {
    'list': Command('aff_zoo.cli', 'list the zoo as a table (parameters, GMACs, published weights)'),
    'classify': Command('aff_zoo.cli', 'classify image files with a zoo model'),
    'train': Command('aff_zoo.training.train', 'train a registered model on an image-folder dataset or archive'),
    'evaluate': Command('aff_zoo.training.evaluate', 'accuracy, per-class accuracy, confusion matrix and throughput'),
    'finetune': Command('aff_zoo.training.finetune',
                        'fine-tune a model on your ImageFolder; writes a Hub-layout checkpoint folder'),
    'convert': Command('aff_zoo.deploy.export',
                       'export models to ONNX / TorchScript / torch.export (.pt2), checked against the eager model'),
    'quantize': Command('aff_zoo.deploy.quantize',
                        'int8 post-training quantisation (PT2E, x86 Inductor): accuracy and speed against fp32'),
    'benchmark': Command('aff_zoo.deploy.benchmark', 'speed: our models vs timm peers, our AFF vs the port'),
    'export': Command('aff_zoo.publish.commands',
                      'training run dir -> Hub folder (safetensors, config, card) + registry record'),
    'publish': Command('aff_zoo.publish.commands', 'validate a Hub folder against the registry and upload it'),
    'cards': Command('aff_zoo.publish.commands',
                     'regenerate model cards, hub/*/README.md and the generated tables of README.md and docs/'),
    'runs-table': Command('aff_zoo.publish.report', 'markdown table (ablation or checkpoints) from run directories'),
    'pin-parents': Command('aff_zoo.publish.pin',
                           "pin the upcycled weights' timm parents (Hub commit + sha256) in models/weights.py"),
}

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
    from .data.images import load_rgb  # the one reader: 16-bit, alpha, CMYK, EXIF, animations (ImageError)
    return load_rgb(path)


def _parse_label_names(value: Optional[str]) -> Optional[List[str]]:
    """``--label-names``: a text file with one name per line, or names separated by commas."""
    import os
    if not value:
        return None
    if os.path.isfile(value):
        with open(value, encoding='utf-8') as f:
            return [line.strip() for line in f if line.strip()]
    return [n.strip() for n in value.split(',')]


def _label_names(model, given: Optional[List[str]] = None, weights_loaded: bool = True) -> Optional[List[str]]:
    """Names of the loaded weights only: ``--label-names``, else the weights' own (registry record, or the
    config.json beside a --weights file), else none (``class 3``); never another model's."""
    if given:
        if len(given) != model.num_classes:
            raise ValueError(f'--label-names gives {len(given)} names but the model has {model.num_classes} classes.')
        return given
    if not weights_loaded:
        return None
    names = model.pretrained_cfg.get('label_names')
    if names and len(names) == model.num_classes:
        return list(names)
    return None


def _cmd_classify(args) -> int:
    import torch
    from timm.data import create_transform, resolve_data_config
    from .models.pretrained import create_model
    given = _parse_label_names(args.label_names)
    if args.weights:
        model = create_model(args.model, weights=args.weights)
    else:
        model = create_model(args.model, pretrained=args.pretrained)
    model.eval()
    loaded = bool(args.weights or args.pretrained)
    if not loaded:
        from .models.weights import available_tags
        tags = available_tags(args.model.split('.', 1)[0])
        hint = (f'add --pretrained (trained weights: {", ".join(tags)})' if tags else
                f'{args.model} has no trained weights yet; give --weights FILE.safetensors, or try '
                f'--model aff_resnet20.cifar10_e12 --pretrained')
        print(f'WARNING: {args.model} is a randomly initialised network (no --pretrained or --weights): the labels '
              f'below are those of an untrained network, not predictions. To classify, {hint}.', file=sys.stderr)
    transform = create_transform(**resolve_data_config({}, model=model))
    labels = _label_names(model, given, loaded)
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


def register_cli(sub) -> None:
    p = sub.add_parser('list')
    p.add_argument('pattern', nargs='?', default='*', help='wildcard filter, e.g. "iaff_*"')
    p.add_argument('--format', choices=['text', 'markdown'], default='text')
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser('classify')
    p.add_argument('images', nargs='+', help='image files (JPEG, PNG, ...)')
    p.add_argument('--model', '-m', default=DEFAULT_MODEL,
                   help=f'model name, optionally with a weights tag (default {DEFAULT_MODEL})')
    p.add_argument('--pretrained', action='store_true', help='load the published weights of --model')
    p.add_argument('--weights', help='a local model.safetensors to load instead (its class names: the '
                   'config.json beside it, or --label-names)')
    p.add_argument('--label-names', help='class names: a text file (one per line) or "cat,dog,..."')
    p.add_argument('--topk', type=int, default=5)
    p.set_defaults(func=_cmd_classify)


class _Subparsers:
    """What a command module's ``register_cli`` receives: argparse's subparsers, with each command's help and
    description taken from ``COMMANDS``, the one place that holds them (a module's own are replaced)."""

    def __init__(self, sub):
        self._sub = sub

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        if name not in COMMANDS:
            raise KeyError(f'command {name!r} is registered by a module but missing from aff_zoo.cli.COMMANDS')
        kwargs['help'] = kwargs['description'] = COMMANDS[name].help
        return self._sub.add_parser(name, **kwargs)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``aff-zoo`` parser. Only ``command``'s module is imported (``'*'``: every module); the other
    commands are listed, with their help, from ``COMMANDS`` alone."""
    parser = argparse.ArgumentParser(prog='aff-zoo', description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for module in dict.fromkeys(c.module for name, c in COMMANDS.items() if command in (name, '*')):
        mod = sys.modules[__name__] if module == 'aff_zoo.cli' else importlib.import_module(module)
        mod.register_cli(_Subparsers(sub))
    for name, c in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=c.help, add_help=False)  # a placeholder: never parses arguments
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith('-')), None)
    args = build_parser(command).parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        # Our errors are written to be read: show the message, not a traceback.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f'aff-zoo {args.command}: error: {msg}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
