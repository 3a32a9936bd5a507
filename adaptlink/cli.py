"""The `adaptlink` command line.

Each subcommand lives in the module that owns its work; that module exposes
`add_parser(subparsers)`, which registers the subcommand and sets `func` on it.
Modules are imported only to register their parser, so they keep torch imports
inside functions.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from partitioner.errors import AdaptLinkError

# Module that registers each group of subcommands, in the order `--help` lists them.
COMMAND_MODULES = [
    "adaptlink.graph_cli",     # graph
    "adaptlink.tiny_cli",      # make-tiny
    "adaptlink.profiler",      # profile
    "adaptlink.plan_cli",      # plan, simulate, show
    "adaptlink.run_cli",       # run
    "adaptlink.serve_cli",     # serve
    "adaptlink.demo",          # demo
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptlink", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # not written yet
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except AdaptLinkError as e:
        print(f"adaptlink {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
