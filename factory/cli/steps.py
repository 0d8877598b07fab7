"""``prefab generate`` and ``prefab filter``: run a registered step on catalog versions.

The parser, the ``--help`` listing and ``--set`` validation all come from the steps'
own declarations (:mod:`factory.steps`); nothing here names a particular step.
"""

from __future__ import annotations

import argparse
from typing import Any

from factory.cli import CommandResult, home_from
from factory.steps import describe, parse_settings, steps
from schemas.errors import PrefabError


def _catalogue(kind: str) -> str:
    lines = [f"{kind}s:"]
    for spec in steps(kind):  # type: ignore[arg-type]
        needs = {"required": "  [needs --backend]", "optional": "  [--backend optional]"}.get(spec.backend, "")
        lines.append(f"  {spec.name} (v{spec.version}){needs}: {spec.summary}")
        lines.extend(f"      {line}" for line in describe(spec.params))
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    for kind, verb, what in (
        ("generator", "generate", "build new preference pairs from seed pairs"),
        ("filter", "filter", "score pairs, then keep, drop, flip or reweight them by threshold"),
    ):
        parser = subparsers.add_parser(
            verb, parents=parents, help=what, description=f"{what[0].upper()}{what[1:]}.",
            epilog=_catalogue(kind) + "\n\nSet parameters with --set KEY=VALUE (lists: a,b,c or a JSON list).",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument("step", metavar=kind.upper(), help=f"the {kind} to run (listed below)")
        parser.add_argument("--from", dest="sources", nargs="+", required=True, metavar="REF",
                            help="input versions: name, name@N or name@tag (several are concatenated)")
        parser.add_argument("--name", required=True, help="dataset name to commit the result as")
        parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                            help="a step parameter (repeatable)")
        parser.add_argument("--backend", default=None, metavar="SPEC",
                            help="LLM backend for steps that use one, e.g. openai:gpt-4o-mini")
        parser.add_argument("--max-cost", type=float, default=None, metavar="USD",
                            help="LLM budget: refuse to start when the run's estimated cost (cached requests "
                                 "free) exceeds it, and stop cleanly when it is reached")
        parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
        parser.add_argument("--message", "-m", default="", help="version message")
        parser.add_argument("--dry-run", action="store_true",
                            help="validate the step, parameters and inputs; show the plan (LLM steps: requests, "
                                 "tokens and cost estimate, the first requests rendered); run nothing")
        parser.add_argument("--show-requests", type=int, default=2, metavar="N",
                            help="with --dry-run: how many LLM requests to render (default 2)")
        parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
        add_engine_options(parser)
        if kind == "generator":
            parser.add_argument("--with-input", action="store_true",
                                help="commit the seed pairs followed by the new ones (default: new ones only)")
        parser.set_defaults(handler=_handler(kind))


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="local: in this process; ray: row-local steps run as Ray Data map_batches "
                             "(pip install 'prefab[ray]'), workers write Parquet, this process commits")
    parser.add_argument("--ray-address", default=None, metavar="ADDRESS",
                        help="with --engine ray: an existing cluster (default: start a local Ray)")


def _handler(kind: str):
    def run(args: argparse.Namespace) -> CommandResult:
        from factory.steps import api

        settings = parse_settings(args.settings)
        common: dict[str, Any] = {"settings": settings, "backend": _backend(args), "home": home_from(args)}
        if args.dry_run:
            plan = api.plan(kind, args.step, args.sources, **common)
            lines = [f"dry run: {kind} {plan['step']} v{plan['step_version']} on "
                     + ", ".join(f"{i['ref']} ({i['rows']} rows)" for i in plan["inputs"]),
                     f"  params: {plan['params']}"]
            if plan["backend"] != "none":
                from factory.steps.llm import preview, preview_text

                plan["llm"] = preview(kind, args.step, args.sources, seed=args.seed, show=args.show_requests,
                                      **common)
                lines.append(preview_text(plan["llm"]))
            lines.append("  nothing was run, sent or committed")
            return CommandResult({"dry_run": True, **plan}, "\n".join(lines))
        options = {**common, "seed": args.seed, "message": args.message,
                   "progress": False if args.no_progress else None,
                   "engine": args.engine, "ray_address": args.ray_address}
        if kind == "generator":
            result = api.generate(args.step, args.sources, args.name, with_input=args.with_input, **options)
            return CommandResult(result, _generator_text(result))
        result = api.filter(args.step, args.sources, args.name, **options)
        return CommandResult(result, _filter_text(result))

    return run


def _unchanged(r: dict[str, Any]) -> list[str]:
    return [f"  no new version: the result equals {r['ref']}"] if r.get("unchanged") else []


def _backend(args: argparse.Namespace) -> Any:
    """The backend object: its request cache under --home, --max-cost as its budget."""
    if args.backend is None:
        if args.max_cost is not None:
            raise PrefabError("--max-cost needs --backend: it is the budget of an LLM backend")
        return None
    from factory.llm import parse_spec
    from factory.steps.runner import backend_for

    kind, _, _ = parse_spec(args.backend)
    overrides: dict[str, Any] = {}
    if args.max_cost is not None:
        if kind != "openai":
            raise PrefabError(f"--max-cost needs a priced API backend (openai:...), not {kind}:")
        overrides["max_cost"] = args.max_cost
    return backend_for(args.backend, home_from(args), **overrides)


def _generator_text(r: dict[str, Any]) -> str:
    lines = [
        f"committed {r['ref']}: {r['rows_out']} rows ({r['rows_generated']} generated by {r['step']}"
        + (f" + {r['rows_out'] - r['rows_generated']} seed rows" if r["rows_out"] != r["rows_generated"] else "") + ")",
        f"  seeds: {r['rows_in']} in = {r['seeds_used']} used + {r['seeds_without_output']} without output"
        f" + {r['seeds_failed']} failed",
        *_unchanged(r),
    ]
    if r["rows_failed"]:
        lines.append(f"  see failed rows with: prefab catalog failures {r['ref']}")
    return "\n".join(lines)


def _filter_text(r: dict[str, Any]) -> str:
    lines = [
        f"committed {r['ref']}: {r['rows_in']} rows in = {r['rows_kept']} kept + {r['rows_dropped']} dropped"
        f" + {r['rows_failed']} failed ({r['rows_flipped']} flipped, {r['rows_reweighted']} reweighted among kept)",
        f"  scores: {', '.join(r['score_columns'])}" + (" (reused, not recomputed)" if r["scores_reused"] else ""),
        *_unchanged(r),
    ]
    stats = r.get("stats") or {}  # a filter's own one-line summary and warnings, where it gives them
    lines += [f"  {stats['summary']}"] if stats.get("summary") else []
    lines += [f"  warning: {w}" for w in stats.get("warnings") or []]
    if r["rows_failed"]:
        lines.append(f"  see failed rows with: prefab catalog failures {r['ref']}")
    return "\n".join(lines)
