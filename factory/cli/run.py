"""``prefab run RECIPE.yaml``: a recipe's sources, steps, tag, training and evaluation."""

from __future__ import annotations

import argparse
from typing import Any

from factory.cli import CommandResult, home_from


def register(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "run", parents=parents, help="run a recipe (YAML): ingest, generate, filter, tag, train",
        description="Validate a recipe (every step, key, type, ref and backend, with file and line) "
                    "and run it. Steps that already ran with the same inputs and parameters are "
                    "reused, so a rerun or a resumed run does only what is missing.",
    )
    parser.add_argument("recipe", help="recipe file (see examples/quickstart.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; run nothing")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars and step lines")
    from factory.cli.steps import add_engine_options

    add_engine_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> CommandResult:
    from factory.recipe import run_recipe

    result = run_recipe(args.recipe, home=home_from(args), dry_run=args.dry_run,
                        quiet=args.json or args.no_progress, progress=False if args.no_progress else None,
                        engine=args.engine, ray_address=args.ray_address)
    if args.dry_run:
        return CommandResult(result, _plan_text(result))
    lines = [f"recipe {result['recipe']} done in {result['seconds']:.1f} s "
             f"({sum(1 for s in result['steps'] if s.get('reused'))} of {len(result['steps'])} steps reused)"]
    lines += [f"  {s['what']} -> {s.get('ref', '')}" + (" (reused)" if s.get("reused") else "")
              for s in result["steps"]]
    if result["model"]:
        lines.append(f"model: {result['model']['ref']} at {result['model']['path']}")
        for key, value in result["model"]["metrics"].items():
            shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items()) \
                if isinstance(value, dict) else (f"{value:.3f}" if isinstance(value, float) else value)
            lines.append(f"  {key}: {shown}")
    if result.get("audit"):
        audit = result["audit"]
        lines.append(f"audit report: {audit['html']} (JSON: {audit['json']}); {audit['noise_line']}")
    return CommandResult(result, "\n".join(lines))


def _plan_text(plan: dict[str, Any]) -> str:
    lines = [f"dry run of recipe {plan['recipe']} ({plan['file']}): valid; nothing was run, sent or committed"]
    for step in plan["steps"]:
        if step["kind"] in ("ingest", "source"):
            lines.append(f"  {step['kind']} {step['input']} as {step['name']}")
        else:
            lines.append(f"  {step['kind']} {step['step']} from {', '.join(step['inputs'])} -> {step['name']}"
                         + (" with " + ", ".join(f"{k}={v}" for k, v in step["settings"].items())
                            if step["settings"] else ""))
            if step.get("estimate") is not None:
                lines.append(f"      {step['estimate']['text']}")
    if plan["tag"]:
        lines.append(f"  tag {plan['tag']['dataset']} as {plan['tag']['tag']}")
    if plan["train"]:
        lines.append(f"  train {plan['train']['name']} on {plan['train']['data']}")
    if plan.get("audit"):
        lines.append(f"  audit {plan['audit']['dataset']} -> {plan['audit'].get('html', 'RECIPE-audit.html')}")
    return "\n".join(lines)
