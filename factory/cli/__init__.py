"""The ``prefab`` command line: one module per command group, each registering its parsers.

Every handler returns a JSON-serialisable dict plus the human text for it; ``--json``
prints the dict. Any :class:`PrefabError` becomes one line on standard error and exit 1.

Only the module of the command being run is imported: ``prefab --help``, ``prefab
--version`` and light commands (``catalog``, ``ingest``) never load torch or transformers,
which cost seconds of CPU. :data:`COMMANDS` names each command's module and its help line
(a test checks them against what the modules register).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from factory.home import resolve_home
from schemas.errors import PrefabError

# command -> (the module that registers it, its line in ``prefab --help``), in listing order.
# A new command group is one module here; a module may register several commands.
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("factory.cli.ingest", "read a preference file into the catalog"),
    "catalog": ("factory.cli.catalog", "inspect and manage dataset versions"),
    "generate": ("factory.cli.steps", "build new preference pairs from seed pairs"),
    "filter": ("factory.cli.steps", "score pairs, then keep, drop, flip or reweight them by threshold"),
    "train": ("factory.cli.train", "train a reward model on a dataset version"),
    "eval": ("factory.cli.train", "evaluate a reward model on a dataset version"),
    "models": ("factory.cli.train", "list trained reward models"),
    "run": ("factory.cli.run", "run a recipe (YAML): ingest, generate, filter, tag, train"),
    "audit": ("factory.cli.audit", "estimate label noise and biases of a dataset version"),
    "review": ("factory.cli.audit", "apply a reviewer's decisions from an audit report"),
}
COMMAND_MODULES: tuple[str, ...] = tuple(dict.fromkeys(module for module, _ in COMMANDS.values()))


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
    parent.add_argument(
        "--catalog",
        default=None,
        metavar="URL",
        help="a shared DuckLake catalog, ducklake:<file> or 'ducklake:postgres:<dsn> DATA_PATH <path>' "
             "(default: $PREFAB_CATALOG, else the home's own catalog)",
    )
    parent.add_argument("--json", action="store_true", help="print a JSON document")
    return parent


def package_version() -> str:
    """The installed distribution's version (``0+unknown`` when run from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prefab")
    except PackageNotFoundError:
        return "0+unknown"


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser with ``commands`` fully registered (``None``: all of them).

    The other commands are listed with their help line only, so ``prefab --help`` and an
    unknown command's error name every command without importing their modules.
    """
    parser = argparse.ArgumentParser(
        prog="prefab",
        description="prefab: a preference dataset factory for reward-model engineers.",
    )
    parser.add_argument("--version", action="version", version=f"prefab {package_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    parents = [common_options()]
    wanted = set(COMMANDS) if commands is None else set(commands)
    loaded = {COMMANDS[name][0] for name in wanted if name in COMMANDS}
    registered: set[str] = set()
    for name, (module_name, help_line) in COMMANDS.items():
        if module_name not in loaded:
            subparsers.add_parser(name, help=help_line)
        elif module_name not in registered:
            importlib.import_module(module_name).register(subparsers, parents)
            registered.add(module_name)
    return parser


def command_of(argv: Sequence[str]) -> str | None:
    """The command ``argv`` runs: its first word, when that names one."""
    first = next((word for word in argv if not word.startswith("-")), None)
    return first if first in COMMANDS else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = command_of(argv)
    parser = build_parser([command] if command else [])
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    if getattr(args, "catalog", None):
        # Every catalog this command opens, its steps' and worker processes' included, reads it here.
        os.environ["PREFAB_CATALOG"] = args.catalog
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
