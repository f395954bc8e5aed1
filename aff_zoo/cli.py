"""``aff-zoo``: the console command. ``list`` and ``classify`` live here; other subcommands are
registered by the module that implements them (see ``_COMMAND_MODULES``)."""
import argparse
import importlib
import sys
from typing import List, Optional

# Modules that define ``register_cli(subparsers)``; each adds its own subcommand(s).
_COMMAND_MODULES: List[str] = ['aff_zoo.export']


def _cmd_list(args) -> int:
    raise NotImplementedError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='aff-zoo', description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('list', help='list the zoo as a table')
    p.set_defaults(func=_cmd_list)
    for mod in _COMMAND_MODULES:
        importlib.import_module(mod).register_cli(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == '__main__':
    sys.exit(main())
