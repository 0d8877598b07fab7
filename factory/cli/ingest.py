"""``prefab ingest PATH --name NAME``: read external data and commit it as a version."""

from __future__ import annotations

import argparse

from factory.cli import CommandResult, home_from
from schemas.errors import InputError
from schemas.readers import READERS


def register(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    formats = ", ".join(f"{name} ({spec.description})" for name, spec in sorted(READERS.items()))
    parser = subparsers.add_parser(
        "ingest", parents=parents, help="read a preference file into the catalog",
        description=f"Read preference data and commit it as a new dataset version. Formats: {formats}.",
    )
    parser.add_argument("path", help="file or folder to read (.jsonl, .json, .parquet, .gz, datasets folder)")
    parser.add_argument("--name", required=True, help="dataset name in the catalog")
    parser.add_argument("--format", default="auto", choices=["auto", *sorted(READERS)],
                        help="input format (default: detect from the file and say what was chosen)")
    parser.add_argument("--message", "-m", default="", help="version message")
    parser.add_argument("--on-error", choices=["fail", "quarantine"], default="fail",
                        help="fail: stop at the first bad row; quarantine: store bad rows with their reason")
    parser.add_argument("--strict", action="store_true",
                        help="treat real-data quirks (one empty response, identical responses) as bad rows")
    parser.add_argument("--map", action="append", default=[], metavar="CANONICAL=SOURCE",
                        help="column mapping for column formats, e.g. --map prompt=question")
    parser.add_argument("--split", default=None, help="split of a saved DatasetDict")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=run)


def parse_column_map(items: list[str]) -> dict[str, str]:
    mapping = {}
    for item in items:
        canonical, sep, source = item.partition("=")
        if not sep or not canonical or not source:
            raise InputError(f"--map expects CANONICAL=SOURCE, got {item!r}")
        mapping[canonical.strip()] = source.strip()
    return mapping


def run(args: argparse.Namespace) -> CommandResult:
    from factory.ingest import ingest

    result = ingest(
        args.path, args.name, format=args.format, on_error=args.on_error, strict=args.strict,
        column_map=parse_column_map(args.map), split=args.split, message=args.message,
        home=home_from(args), progress=not args.no_progress,
    )
    counts = f"{result['rows_in']} rows in = {result['committed']} committed + {result['quarantined']} quarantined"
    if result["unchanged"]:
        outcome = f"unchanged: content equals {result['ref']}, no new version ({counts.replace('committed', 'kept')})"
    else:
        outcome = f"committed {result['ref']}: {counts} ({result['ties']} ties)"
    lines = [f"read {args.path} as {result['format']} ({result['format_reason']})", outcome]
    if result["coerced"]:
        lines.append("coerced: " + ", ".join(f"{k} x{v}" for k, v in result["coerced"].items()))
    if result["warnings"]:
        lines.append("kept with warnings: " + ", ".join(f"{k} x{v}" for k, v in result["warnings"].items()))
    if result["unknown_columns"]:
        lines.append("unknown columns kept in metadata: "
                     + ", ".join(f"{k} ({v} rows)" for k, v in result["unknown_columns"].items()))
    if result["quarantined"] and not result["unchanged"]:
        lines.append(f"see them with: prefab catalog quarantine {result['ref']}")
    return CommandResult(result, "\n".join(lines))
