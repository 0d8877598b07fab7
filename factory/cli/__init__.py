"""The ``prefab`` command line: one module per command group, each registering its parsers.

Every handler returns a JSON-serialisable dict plus the human text for it; ``--json``
prints the dict. Any :class:`PrefabError` becomes one line on standard error and exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from factory.home import resolve_home
from schemas.errors import PrefabError

# Order is the order of ``prefab --help``. A new command group is one module here.
COMMAND_MODULES: tuple[str, ...] = (
    "factory.cli.ingest",
    "factory.cli.catalog",
    "factory.cli.steps",
    "factory.cli.train",
    "factory.cli.run",
    "factory.cli.audit",
)


@dataclass
class CommandResult:
    payload: dict[str, Any]
    text: str


Handler = Callable[[argparse.Namespace], CommandResult]


def common_options() -> argparse.ArgumentParser:
    """Options every command takes: where the catalog lives and the output format."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--home",
        default=None,
        help="catalog home folder (default: $PREFAB_HOME or ./.prefab)",
    )
    parent.add_argument("--json", action="store_true", help="print a JSON document")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefab",
        description="prefab: a preference dataset factory for reward-model engineers.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    parents = [common_options()]
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers, parents)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        result = handler(args)
    except PrefabError as exc:
        print(f"prefab: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prefab: interrupted; work committed so far is kept", file=sys.stderr)
        return 130
    try:
        if args.json:
            json.dump(result.payload, sys.stdout, indent=2, default=str, ensure_ascii=False)
            sys.stdout.write("\n")
        elif result.text:
            print(result.text)
        sys.stdout.flush()
    except BrokenPipeError:  # `prefab ... | head` closed the pipe: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def home_from(args: argparse.Namespace) -> str:
    return str(resolve_home(args.home))
