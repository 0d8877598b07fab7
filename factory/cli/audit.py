"""``prefab audit`` (label noise, biases, duplicates; JSON and HTML) and ``prefab review apply``."""

from __future__ import annotations

import argparse

from factory.cli import CommandResult, home_from


def register(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    audit = subparsers.add_parser(
        "audit", parents=parents, help="estimate label noise and biases of a dataset version",
        description=(
            "Estimated noise rate with an interval, the most suspect pairs with the signals that "
            "flagged them, noise by source, generator, attribute and task, annotator agreement, "
            "tie share, length and formatting biases, duplicate and contamination rates, and with "
            "--model its master-key false-positive rate and Contrast-Instructions consistency. "
            "Noise scores stored with the version are reused; missing ones are computed with the "
            "noise filter in-process (minutes on CPU; --no-compute reports only what is stored)."
        ),
    )
    audit.add_argument("ref", metavar="REF", help="dataset version: name, name@N or name@tag")
    audit.add_argument("--model", default=None, metavar="MODEL", help="also probe this reward model on the version")
    audit.add_argument("--html", default=None, metavar="PATH",
                       help="write a self-contained HTML report (plots and a review form for the suspects)")
    audit.add_argument("--top", type=int, default=50, metavar="N", help="suspects to list (default 50)")
    audit.add_argument("--no-compute", action="store_true",
                       help="do not score noise when no scores are stored; report only what is stored")
    audit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="a noise-filter parameter for the in-process scoring (repeatable)")
    audit.add_argument("--seed", type=int, default=0)
    audit.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    audit.set_defaults(handler=run_audit)

    review = subparsers.add_parser(
        "review", parents=parents, help="apply a reviewer's decisions from an audit report",
        description="Review loop: the audit report's suspects table saves keep/flip/drop decisions as JSON.")
    actions = review.add_subparsers(dest="review_command", metavar="ACTION")
    apply = actions.add_parser(
        "apply", parents=parents, help="validate a decisions file and commit the reviewed version",
        description=("Validate DECISIONS against REF (every pair id present, every action keep, flip or "
                     "drop) and commit NAME: dropped rows left out, flipped rows with chosen and rejected "
                     "swapped and votes negated; lineage records the file's sha256 and the counts."))
    apply.add_argument("ref", metavar="REF", help="the version the decisions were made on")
    apply.add_argument("decisions", metavar="DECISIONS", help="decisions JSON saved from the audit report")
    apply.add_argument("--name", required=True, help="dataset to commit the reviewed version to")
    apply.add_argument("--message", default="", help="version message")
    apply.set_defaults(handler=run_review_apply)


def run_audit(args: argparse.Namespace) -> CommandResult:
    from factory.audit import audit, summary_text
    from factory.steps.params import parse_settings

    progress = False if (args.no_progress or args.json) else None
    summary = audit(args.ref, home=home_from(args), model=args.model, html=args.html, compute=not args.no_compute,
                    top=args.top, settings=parse_settings(args.set), seed=args.seed, progress=progress)
    return CommandResult(summary, summary_text(summary))


def run_review_apply(args: argparse.Namespace) -> CommandResult:
    from factory.audit.review import apply_review

    result = apply_review(args.ref, args.decisions, args.name, home=home_from(args), message=args.message)
    text = (f"committed {result['ref']} from {result['input']}: {result['rows_in']} rows in, "
            f"{result['rows_kept']} kept ({result['rows_flipped']} flipped), {result['rows_dropped']} dropped; "
            f"decisions {result['review']['file']} (sha256 {result['review']['sha256'][:12]})")
    return CommandResult(result, text)
